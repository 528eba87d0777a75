"""A room's game rules, run at arm's length: a bug in them costs a move, never the room.

Rules are the game's own code, called inside the relay's event loop (base.py). If
a call raised into the relay, a join would leave a member behind that nobody was
told of, a delivery would stop half way through a room, and with Redis the whole
node would lose its link. So every call goes through :class:`GuardedRules`:

* ``validate`` that raises, or returns something that is not a verdict, refuses
  the move with ERROR ``internal``: the player is told, nothing is relayed.
* A :class:`Reject`'s code is an ``ErrorCode`` or a code of the game's own
  (``not_your_turn``: 1-32 characters ``a-z 0-9 _``, starting with a letter), and
  its reason is cut to ``MAX_REASON`` characters.
* :class:`Replace` data is held to what a client's data is held to: it must pack,
  and pass ``max_message_bytes``, ``max_depth`` and the map-key rule, or the move
  is refused with ERROR ``internal`` (receivers could not read it, and every late
  joiner's WELCOME would carry it).
* ``on_join``, ``on_leave`` and ``observe`` that raise are skipped: the room's
  order is decided already, and its members must get it.
* A rules class whose constructor raises leaves the room refusing every move
  (ERROR ``internal``), so that a room is never played without its rules.

Each failure is counted (``relay_rules_failures_total{hook}``) and logged with its
traceback, at most once a minute per room type and hook; so is a ``validate`` that
took longer than ``SLOW_VALIDATE_S`` (hook ``slow_validate``: the move is relayed,
but the whole process waited for it).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

import msgpack

from relay import protocol
from relay.protocol import EVENT, JOIN, LEAVE, STATE, ErrorCode, Event, Invalid
from relay.room import Entry, RoomState
from relay.rules.base import ACCEPT, Move, Reject, Replace, RoomView, Rules

log = logging.getLogger("relay.rules")
GAME_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # an ERROR code of the game's own
RELAY_CODES = frozenset(code.value for code in ErrorCode)
MAX_REASON = 200  # characters of a Reject's reason sent to the player
LOG_EVERY_S = 60.0
SLOW_VALIDATE_S = 0.005  # a validate this slow holds up every room of the process
FAILED = "the room's game rules failed on this move (see the server's log); it was not relayed"
NOT_STARTED = "the room's game rules could not start (see the server's log); moves are refused"
_EVENT_HEAD = b"\x93\x01\x00"  # [1, 0, ...]: an EVENT with seq 0, to check data as a client's


class RulesFailures:
    """Counts the failures of game rules by hook, and logs them without flooding the log."""

    def __init__(self, counts: Counter[str]) -> None:
        self.counts = counts
        self._logged: dict[tuple[str, str], float] = {}

    def report(self, room: str, hook: str, what: str, exc: BaseException | None = None) -> None:
        self.counts[hook] += 1
        key = (room.partition(":")[0], hook)
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY_S:
            return
        self._logged[key] = now
        log.error(
            "game rules of room %s: %s (further %s failures of this room type: at most one log line a "
            "minute; relay_rules_failures_total counts them all)",
            room, what, hook, exc_info=exc,
        )


class GuardedRules:
    """One room's rules instance and its view, called as the module docstring says."""

    __slots__ = ("rules", "view", "room", "failures", "max_message_bytes", "max_depth")

    def __init__(
        self, cls: type[Rules], state: RoomState, failures: RulesFailures, *, max_message_bytes: int, max_depth: int
    ) -> None:
        self.room = state.room
        self.view = RoomView(state)
        self.failures = failures
        self.max_message_bytes = max_message_bytes
        self.max_depth = max_depth
        self.rules: Rules | None
        try:
            self.rules = cls(state.room)
        except Exception as exc:  # noqa: BLE001 - the game's code: anything may come out of it
            self.rules = None
            failures.report(self.room, "start", f"{cls.__name__}({state.room!r}) raised {exc!r}; every move is refused", exc)
            return
        # What the room had before this node served it: its members, then its snapshot.
        for actor in state.members:
            self._call("on_join", actor)
        for actor, values in state.snapshot.items():
            for key, raw in values.items():
                self._call("observe", actor, Move("state", _decode(raw), key))

    def validate(
        self, actor: int, seq: int, kind: str, data: bytes, key: str | int | None = None, to_actor: int | None = None
    ) -> bytes | Invalid:
        """The data to relay (``data`` itself, or the rules' replacement), or why not."""
        rules = self.rules
        if rules is None:
            return Invalid(seq, ErrorCode.INTERNAL, NOT_STARTED)
        started = time.perf_counter()
        try:
            verdict = rules.validate(self.view, actor, Move(kind, _decode(data), key, to_actor))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the game's code: anything may come out of it
            return self._failed(seq, f"validate raised {exc!r}", exc)
        spent = time.perf_counter() - started
        if spent > SLOW_VALIDATE_S:  # the whole process waited for it
            self.failures.report(self.room, "slow_validate", f"validate took {spent * 1000:.1f} ms")
        if verdict is ACCEPT:
            return data
        if isinstance(verdict, Reject):
            code, reason = verdict.code, verdict.reason
            if type(code) is str and code in RELAY_CODES:
                code = ErrorCode(code)  # one of the relay's own, named as a string
            if not isinstance(code, ErrorCode) and not (type(code) is str and GAME_CODE.fullmatch(code)):
                return self._failed(seq, f"Reject code {code!r} is neither an ErrorCode nor 1-32 of a-z 0-9 _")
            if type(reason) is not str or not _encodable(reason[:MAX_REASON]):
                return self._failed(seq, f"Reject reason {reason!r} is not a str of valid Unicode")
            return Invalid(seq, code, reason[:MAX_REASON])
        if isinstance(verdict, Replace):
            return self._replacement(seq, verdict.data)
        return self._failed(seq, f"validate returned {verdict!r}, not ACCEPT, a Reject or a Replace")

    def tell(self, entry: Entry, local: bool) -> None:
        """An entry of the room order; a local player's moves were seen by ``validate``."""
        kind = entry.kind
        if kind is JOIN:
            self._call("on_join", entry.actor)
        elif kind is LEAVE:
            self._call("on_leave", entry.actor)
        elif not local and (kind is STATE or kind is EVENT):
            data = _decode(entry.value) if entry.value is not None else None
            move = Move("state", data, entry.key) if kind is STATE else Move("event", data)
            self._call("observe", entry.actor, move)

    def _call(self, hook: str, actor: int, *args: Any) -> None:
        rules = self.rules
        if rules is None:
            return
        try:
            getattr(rules, hook)(self.view, actor, *args)
        except Exception as exc:  # noqa: BLE001 - the game's code: anything may come out of it
            self.failures.report(self.room, hook, f"{hook} for actor {actor} raised {exc!r}; skipped", exc)

    def _replacement(self, seq: int, data: Any) -> bytes | Invalid:
        try:
            packed = protocol.pack(data)
        except (TypeError, ValueError, OverflowError) as exc:
            return self._failed(seq, f"Replace data cannot be sent as msgpack: {exc!r}")
        checked = protocol.decode_frame(
            _EVENT_HEAD + packed, max_message_bytes=self.max_message_bytes, max_depth=self.max_depth
        )
        if len(checked) != 1 or type(checked[0]) is not Event:
            why = checked[0].message if checked and type(checked[0]) is Invalid else "not one msgpack value"
            return self._failed(seq, f"Replace data would not be relayed from a client: {why}")
        return packed

    def _failed(self, seq: int, what: str, exc: BaseException | None = None) -> Invalid:
        self.failures.report(self.room, "validate", what, exc)
        return Invalid(seq, ErrorCode.INTERNAL, FAILED)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: msgpack could not send it
        return False
    return True


def _decode(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)
