"""The game-rules interface.

A room's *type* is the part of its id before the first ``:`` (``grid:lobby-7``
has type ``grid``). Settings map types to rules classes
(``--rules grid=relay.rules.grid:GridRules``). Each node makes one instance per
room it has players in, and calls it:

* ``validate(view, actor, move)`` for every EVENT, STATE and DIRECT a local
  player sends, in the order they were sent, before the move is relayed. It
  returns :data:`ACCEPT`, :class:`Reject` (the sender gets ERROR with its code
  and reason, nothing is relayed) or :class:`Replace` (the data is replaced, for
  example clamped or normalised, before it is relayed). ``validate`` is the last
  check: a move the relay refuses on its own (``too_large`` for the snapshot, a
  DIRECT to ``no_such_actor``, ``unavailable``) never reaches it, so a move it
  accepts is relayed. (One exception: Replace data that makes a STATE too big
  for ``max_snapshot_bytes``.) A Reject's code is an ``ErrorCode`` or one of the
  game's own (``"not_your_turn"``: 1-32 characters ``a-z 0-9 _``, starting with a
  letter). Replace data is held to a client's limits (``max_message_bytes``,
  ``max_depth``, map keys). The sender learns of a Replace only with ``echo=1``:
  without it, its client keeps the data it sent.
* ``on_join`` and ``on_leave`` for every member in the room order (in
  ``on_join`` ``view.actors()`` includes the new member, in ``on_leave`` it no
  longer has the one leaving), and ``observe`` for every STATE or EVENT of a
  player seated on *another* node, so an instance can keep its own view of the
  game (a player's own moves reach it through ``validate``). No hook sees
  DIRECTs from other nodes: a game that deals hidden information by DIRECT
  checks it where it is dealt.

An instance made for a room that is already under way (with Redis, a node whose
first player joins a room mid-game) is given the room as it is: ``on_join`` for
each member, then ``observe`` for each STATE in the snapshot. EVENTs before that
are gone, so state that only EVENTs build (whose turn it is) is unknown to it:
``view.offset`` tells whether anything but these joins has happened yet
(turns.py shows one way to cope).

Failures are contained (guard.py): a hook that raises is logged and skipped; a
``validate`` that raises, or returns anything but a verdict, refuses the move
with ERROR ``internal``; a class whose constructor raises makes the room refuse
every move. Counted in ``relay_rules_failures_total``.

Cost: rules run on the hot path, in the event loop, once per move. A move's data
is decoded from msgpack only for rooms that have rules (a few microseconds for
small moves). ``validate`` must not block or await: keep it to dictionary
lookups and arithmetic, well under 10 microseconds per move, or the whole
process slows down. The view is the room as this node has sequenced it. Moves are
validated in the order they are sequenced, but batched: the moves a player sends
in one frame (the Python and JS clients send everything queued in one tick as one
frame), and other players' moves of the same event-loop iteration, are validated
before any of them is in the view. Rules that compare a move with the ones before
it keep their own record, updated in ``validate`` (grid.py and turns.py do).
Across nodes, two moves that race from different nodes are each validated
against the state their own node had seen.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgpack

from relay.protocol import ErrorCode
from relay.room import RoomState


@dataclass(slots=True, frozen=True)
class Move:
    kind: Literal["event", "state", "direct"]
    data: Any  # the decoded msgpack value
    key: str | int | None = None  # STATE only
    to_actor: int | None = None  # DIRECT only


@dataclass(slots=True, frozen=True)
class Reject:
    reason: str
    code: ErrorCode | str = ErrorCode.REJECTED  # or the game's own: 1-32 of a-z 0-9 _, a letter first


@dataclass(slots=True, frozen=True)
class Replace:
    data: Any


class _Accept:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ACCEPT"


ACCEPT = Accept = _Accept()
Verdict = _Accept | Reject | Replace


class RoomView:
    """Read-only access to the room's members and snapshot, as this node knows them."""

    __slots__ = ("_state",)

    def __init__(self, state: RoomState) -> None:
        self._state = state

    @property
    def room(self) -> str:
        return self._state.room

    @property
    def offset(self) -> int:
        """The room offset this view includes (JOIN, LEAVE, EVENT and STATE each add one)."""
        return self._state.offset

    def actors(self) -> list[int]:
        """Members' actor numbers, in join order."""
        return list(self._state.members)

    def player(self, actor: int) -> str | None:
        member = self._state.members.get(actor)
        return member.player if member is not None else None

    def state(self, actor: int, key: str | int) -> Any:
        """The decoded STATE value of ``actor`` under ``key`` in the snapshot, or None."""
        raw = self._state.snapshot.get(actor, {}).get(key)
        return None if raw is None else msgpack.unpackb(raw, raw=False, strict_map_key=False)


class Rules(Protocol):
    def __init__(self, room: str) -> None: ...

    def on_join(self, view: RoomView, actor: int) -> None: ...

    def on_leave(self, view: RoomView, actor: int) -> None: ...

    def observe(self, view: RoomView, actor: int, move: Move) -> None: ...

    def validate(self, view: RoomView, actor: int, move: Move) -> Verdict: ...


class BaseRules:
    """A convenient base: accepts everything; override what your game needs."""

    def __init__(self, room: str) -> None:
        self.room = room

    def on_join(self, view: RoomView, actor: int) -> None:
        pass

    def on_leave(self, view: RoomView, actor: int) -> None:
        pass

    def observe(self, view: RoomView, actor: int, move: Move) -> None:
        pass

    def validate(self, view: RoomView, actor: int, move: Move) -> Verdict:
        return ACCEPT


def load(spec: str) -> type[Rules]:
    """``module.path:ClassName`` to the class; ValueError with a clear message if not."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"rules {spec!r} must look like package.module:ClassName")
    if os.getcwd() not in sys.path:  # as uvicorn does for an app: a module of the current directory
        sys.path.append(os.getcwd())  # imports under `relay serve` as under `python3 -m relay serve`
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"rules {spec!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None or not callable(getattr(cls, "validate", None)):
        raise ValueError(f"rules {spec!r}: {module_name} has no rules class {class_name}")
    return cls  # type: ignore[no-any-return]


def parse_rules_setting(value: str) -> dict[str, str]:
    """``grid=a.b:C,turns=d.e:F`` to ``{"grid": "a.b:C", ...}``; ``none`` for no rules."""
    table: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        if item == "none":
            table.clear()  # "none" drops the rules named before it (defaults included)
            continue
        room_type, sep, spec = item.partition("=")
        if not sep or not room_type or not spec:
            raise ValueError(f"--rules {item!r} must look like TYPE=package.module:ClassName")
        table[room_type] = spec
    return table
