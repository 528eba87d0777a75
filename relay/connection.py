"""One WebSocket connection: its checks, its reader path, its writer, its close.

Binary frames arrive through relay's fast path (``relay/websocket.py``) straight
from uvicorn's ``data_received``, or through ASGI ``receive`` when served by
another protocol. Frames leave through the node's direct writes, the outbox
flush (``wake``), or a writer task that waits for the socket to drain. Nothing
here awaits another client's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from relay import auth, protocol
from relay.backplane.base import RoomFull, Unavailable
from relay.node import LocalRoom, Seat
from relay.outbox import Outbox
from relay.protocol import CloseCode, Direct, ErrorCode, Event, Invalid, Ping, State
from relay.room import event_entry, state_entry
from relay.session import Session
from relay.websocket import EXTENSION, RelayWebSocketProtocol

if TYPE_CHECKING:
    from relay.server import Relay

# ASGI's shapes, without importing a framework for them.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

log = logging.getLogger("relay")

MAX_PLAYER_ID = 64
MAX_NAME = 64
FLAGS = {"1": True, "true": True, "0": False, "false": False, "": False}
OFFSET = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes "²"


class Connection:
    """One WebSocket: the reader loop, the writer task, and the close."""

    # Slots: thousands of these live as long as their games do.
    __slots__ = (
        "relay", "settings", "stats", "scope", "receive", "send", "_wakeup", "close_code",
        "close_reason", "writer", "seat", "session", "proto", "__weakref__",
    )

    def __init__(self, relay: Relay, scope: Scope, receive: Receive, send: Send) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.stats = relay.stats
        self.scope = scope
        self.receive = receive
        self.send = send
        self._wakeup: asyncio.Event | None = None  # made when a writer task first needs it
        self.close_code: int | None = None
        self.close_reason = ""
        self.writer: asyncio.Task[None] | None = None
        self.seat: Seat | None = None
        self.session = Session(self.settings, time.monotonic())
        # uvicorn's protocol with relay's fast path (relay/websocket.py), when served by it
        self.proto: RelayWebSocketProtocol | None = scope.get("extensions", {}).get(EXTENSION)

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        await self.send({"type": "websocket.accept"})
        self.scope["headers"] = ()  # read already (origin); not kept for the connection's life
        if self.proto is not None:
            self.proto.forget_handshake()
        self.stats.connections_total += 1
        if self.relay.closing:
            return await self._close_now(CloseCode.GOING_AWAY, "server shutting down")
        room, params, problem = parse_request(self.scope)
        if problem:
            return await self._close_now(CloseCode.BAD_REQUEST, problem)
        s = self.settings
        if s.secret:
            try:
                grant = auth.verify(params["token"], s.secret, room)
            except auth.AuthError as exc:
                return await self._close_now(exc.code, exc.reason)
            params["player"] = grant.player
            if grant.name:
                params["meta"]["name"] = grant.name
        # Resuming a seat held here takes over the place it holds under the limits.
        resuming = self.relay.node.holds(params["resume"], params["player"], room)
        full = None if resuming else self._capacity_problem(room)
        if full:
            return await self._close_now(CloseCode.AT_CAPACITY, full)
        ip = client_ip(self.scope)
        relay = self.relay
        relay.open_total += 1
        relay.open_per_ip[ip] += 1

        def release() -> None:
            relay.open_total -= 1
            relay.open_per_ip[ip] -= 1
            if not relay.open_per_ip[ip]:
                del relay.open_per_ip[ip]

        try:
            await self._play(room, params)
        finally:
            seat = self.seat
            if seat is not None and seat.held is not None and seat.release is None:
                # A held seat keeps its room and memory: it counts against the limits
                # (max_connections, max_connections_per_ip) until its hold ends, so that
                # dropped connections cannot pile up held seats past them.
                seat.release = release
            else:
                release()

    def _capacity_problem(self, room: str) -> str | None:
        s, relay = self.settings, self.relay
        if relay.open_total >= s.max_connections:
            return "the server is at its connection limit; try again later"
        if relay.open_per_ip[client_ip(self.scope)] >= s.max_connections_per_ip:
            return "too many connections from this address; try again later"
        if room not in relay.node.rooms and len(relay.node.rooms) >= s.max_rooms:
            return "the server is at its room limit; try again later"
        return None

    async def _play(self, room: str, params: dict[str, Any]) -> None:
        s = self.settings
        outbox = Outbox(
            soft_bytes=s.outbox_soft_bytes,
            hard_bytes=s.outbox_hard_bytes,
            max_frame_bytes=s.max_out_frame_bytes,
        )
        self.seat = seat = Seat(
            room=LocalRoom(room),
            player=params["player"],
            meta=params["meta"],
            echo=params["echo"],
            outbox=outbox,
            wake=self.wake,
            close=self.close,
            owner=self,
        )
        node = self.relay.node
        try:
            resumed = None
            if params["resume"]:
                resumed = await node.resume(params["resume"], seat.player, room, params["offset"], params["epoch"], seat)
            if resumed is not None:
                self.seat = seat = resumed
                self.session.last_seq = seat.last_seq
            else:
                await node.join(seat)
        except RoomFull:
            return await self._close_now(CloseCode.ROOM_FULL, "the room is full")
        except Unavailable:
            return await self._close_now(CloseCode.AT_CAPACITY, "the backplane is unavailable; try again later")
        self.relay.connections.add(self)
        if self.proto is not None:
            seat.send_framed = self._send_framed
            self.proto.attach(self._on_frame_guarded)
        else:
            self.writer = asyncio.create_task(self._write())
        self.wake()
        leave_code = CloseCode.INTERNAL_ERROR
        try:
            leave_code = await self._read()
        except Exception:
            log.exception("connection to %s failed", room)
            self.close(CloseCode.INTERNAL_ERROR, "internal error", flush=False)
        finally:
            if self.close_code is not None:
                leave_code = self.close_code
            if seat.owner is self:  # not taken over by a resuming connection
                seat.last_seq = self.session.last_seq
                try:
                    if self._holds_seat(leave_code):
                        node.hold(seat, leave_code)
                    elif self._hands_off_seat():
                        node.hand_off(seat)
                    else:
                        await node.leave(seat, leave_code)
                except Exception:  # a bug: the connection is let go all the same (no leak)
                    log.exception("leaving %s failed", room)
            await self._finish()
            self.relay.connections.discard(self)
            self.stats.closes[leave_code] += 1
            self._let_go_of(seat)

    def _let_go_of(self, seat: Seat) -> None:
        """This connection is over: drop the references that tie it to its seat (which
        may wait for a resume) and its protocol in cycles. Reference counting then frees
        it at once; the cycle collector runs rarely here (server.py)."""
        if seat.owner is self:
            seat.owner = None
        if getattr(seat.wake, "__self__", None) is self:  # not handed to a resuming connection
            seat.unplug()
        if self.proto is not None:
            self.proto.detach()
        self.scope.get("extensions", {}).pop(EXTENSION, None)

    def _hands_off_seat(self) -> bool:
        """A node shutting down leaves its seats to the backplane, for a resume on another node."""
        return (
            self.relay.closing
            and self.settings.resume_window_s > 0
            and self.relay.node.backplane.hands_off_seats
            and self.close_code == CloseCode.GOING_AWAY
        )

    def _holds_seat(self, code: int) -> bool:
        """Broken links keep the seat for a resume; deliberate closes give it up."""
        if self.settings.resume_window_s <= 0 or self.relay.closing:
            return False
        if code == 1006 or code == CloseCode.SLOW_CONSUMER:
            return True
        return code == CloseCode.GOING_AWAY and self.close_code == CloseCode.GOING_AWAY

    async def _read(self) -> int:
        receive = self.receive
        on_frame = self._on_frame
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                frame = message.get("bytes")
                if frame is None:
                    self.close(CloseCode.TEXT_FRAME, "only binary frames are accepted", flush=True)
                    continue
                if self.close_code is None:
                    on_frame(frame)
            elif message["type"] == "websocket.disconnect":
                code = message.get("code", 1006)
                if code == 1005:  # uvicorn's code for a close frame with no status and for no close frame
                    return CloseCode.NORMAL if self._close_received() else 1006
                return code

    def _close_received(self) -> bool:
        """Whether the peer sent a close frame (a browser's plain ``ws.close()`` has no status)."""
        return getattr(getattr(self.proto, "conn", None), "close_rcvd", None) is not None

    def _send_framed(self, frame: bytes) -> bool:
        """The node's fast path: a ready frame, written now if nothing holds it back
        (a writer task waiting for the socket, a close, a socket that cannot take more).

        Called once per recipient of every room batch, so the checks are inlined
        rather than asked of the protocol (a call costs as much as the checks).
        """
        proto = self.proto
        if (
            self.writer is not None
            or self.close_code is not None
            or not proto.writable.value  # type: ignore[union-attr]
            or proto.close_sent  # type: ignore[union-attr]
            or proto.disconnected  # type: ignore[union-attr]
        ):
            return False
        proto.transport.write(frame)  # type: ignore[union-attr]
        return True

    def wakeup(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    def wake(self) -> None:
        """Send what the outbox holds: right now if the socket can take it, else from a task."""
        proto = self.proto
        if proto is None or self.writer is not None:
            self.wakeup().set()
            return
        outbox = self.seat.outbox  # type: ignore[union-attr]
        stats = self.stats
        while proto.writable_now():
            frame = outbox.take()
            if frame is None:
                return
            proto.send_frame_now(frame)
            stats.frames_out += 1
            stats.bytes_out += len(frame)
        if not proto.disconnected and not proto.close_sent:
            # The socket is full: a writer task waits for it to drain (uvicorn's send).
            self.writer = asyncio.create_task(self._write(until_drained=True))
            self.wakeup().set()

    def close(self, code: int, reason: str, flush: bool) -> None:
        """Close from the server side; ``flush`` sends what is queued first."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        if flush and self.seat is not None:
            if self.writer is None:
                self.writer = asyncio.create_task(self._write())
            elif self.proto is not None:  # a writer may wait for the socket: it writes on (see _write)
                self.proto.writable.set()  # type: ignore[attr-defined]
            self.wakeup().set()
            return
        if self.writer is not None:
            self.writer.cancel()
        self.writer = asyncio.create_task(self._close_now(code, reason))

    async def _close_now(self, code: int, reason: str) -> None:
        if self not in self.relay.connections:  # refused before joining: run() never counts it
            self.stats.closes[code] += 1
        self.close_code = code
        with contextlib.suppress(OSError, RuntimeError):
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    async def _finish(self) -> None:
        if self.close_code is None:
            self.close_code = CloseCode.NORMAL
        writer = self.writer
        if writer is None:
            return
        if not writer.done():
            self.wakeup().set()
            try:
                await asyncio.wait_for(writer, self.settings.shutdown_timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        elif not writer.cancelled() and writer.exception() is not None:
            log.debug("writer ended with %r", writer.exception())

    async def _write(self, until_drained: bool = False) -> None:
        """Send through ASGI, waiting for the socket: the slow path, and the close.

        ``until_drained``: hand back to the fast path once the outbox is empty.
        """
        take = self.seat.outbox.take  # type: ignore[union-attr]
        send = self.send
        stats = self.stats
        wakeup = self.wakeup()
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                while (frame := take()) is not None:
                    proto = self.proto
                    if self.close_code is not None and proto is not None:
                        if proto.disconnected or proto.close_sent:
                            return
                        # Closing: the rest goes behind what the socket holds, without
                        # waiting for a peer that may read nothing; the close frame's
                        # deadline (close_timeout_s) then covers all of it.
                        proto.send_frame_now(frame)
                    else:
                        await send({"type": "websocket.send", "bytes": frame})
                    stats.frames_out += 1
                    stats.bytes_out += len(frame)
                if self.close_code is not None:
                    await send(
                        {"type": "websocket.close", "code": self.close_code, "reason": self.close_reason}
                    )
                    return
                if until_drained:
                    self.writer = None
                    return
        except (OSError, RuntimeError):
            return  # the peer is gone; the reader will see the disconnect

    # --- the hot path ----------------------------------------------------------------

    def _on_frame_guarded(self, frame: bytes) -> None:
        """The fast path calls this from uvicorn's data_received: nothing may escape."""
        if self.close_code is not None:
            return
        try:
            self._on_frame(frame)
        except Exception:
            log.exception("frame from %s failed", self.seat.room.name if self.seat else "?")
            self.close(CloseCode.INTERNAL_ERROR, "internal error", flush=False)

    def _on_frame(self, frame: bytes) -> None:
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += len(frame)
        if len(frame) > self.settings.max_frame_bytes:  # uvicorn enforces this too
            self.close(CloseCode.FRAME_TOO_LARGE, "frame larger than max_frame_bytes", flush=True)
            return
        seat = self.seat
        assert seat is not None
        session = self.session
        now = time.monotonic()
        over = session.admit_frame(len(frame), now)
        if over is not None:
            self._refuse_frame(frame, over, now)
            return
        try:
            self._handle_messages(frame, now)
        finally:
            seat.last_seq = session.last_seq

    def _refuse_frame(self, frame: bytes, over: Invalid, now: float) -> None:
        """A frame past the bytes/s budget is not played. Each move in it gets its own
        ERROR, so that the client knows which seqs were refused (the frame is decoded for
        them, no further); a frame with none (PINGs, garbage) gets one, with seq nil."""
        s = self.settings
        told = False
        for msg in protocol.decode_frame(frame, max_message_bytes=s.max_message_bytes, max_depth=s.max_depth):
            seq = getattr(msg, "seq", None)
            if seq is not None:
                told = True
                if self._reject(Invalid(seq, over.code, over.message), now):
                    return
        if not told:
            self._reject(over, now)

    def _handle_messages(self, frame: bytes, now: float) -> None:
        seat = self.seat
        assert seat is not None
        node, session, stats, s = self.relay.node, self.session, self.stats, self.settings
        ruled = seat.room.rules is not None
        for msg in protocol.decode_frame(frame, max_message_bytes=s.max_message_bytes, max_depth=s.max_depth):
            if self.close_code is not None:  # closed by a message before (its replies overran the outbox: 4008)
                return
            kind = type(msg)
            if kind is Invalid:
                if self._reject(msg, now):  # type: ignore[arg-type]
                    return
                continue
            problem = session.admit(None if kind is Ping else msg.seq, now)  # type: ignore[union-attr]
            if problem is not None:
                if self._reject(problem, now):
                    return
                continue
            if kind is Ping:
                stats.messages_in["PING"] += 1
                node.reply(seat, protocol.pong(msg.client_time, int(time.time() * 1000)))  # type: ignore[union-attr]
                continue
            data = msg.data  # type: ignore[union-attr]
            change = 0  # a STATE's change to the snapshot's size
            if kind is not Event:  # the relay's own refusals first: the rules never hear of those moves
                refused = None
                if kind is State:
                    change = node.snapshot_change(seat, msg.key, data)  # type: ignore[union-attr]
                    if change is None:
                        refused = self._snapshot_full(msg.seq)  # type: ignore[union-attr]
                elif not node.has_actor(seat, msg.to_actor):  # type: ignore[union-attr]
                    why = f"no member with actor {msg.to_actor} in this room"  # type: ignore[union-attr]
                    refused = Invalid(msg.seq, ErrorCode.NO_SUCH_ACTOR, why)  # type: ignore[union-attr]
                if refused is not None:
                    if self._reject(refused, now):
                        return
                    continue
            if ruled and node.backplane.ready():  # else refused as unavailable below, unseen by the rules
                checked = self._check_rules(msg)  # type: ignore[arg-type]
                if type(checked) is not Invalid and checked is not data and kind is State:
                    change = node.snapshot_change(seat, msg.key, checked)  # type: ignore[union-attr]  # replaced
                    if change is None:
                        checked = self._snapshot_full(msg.seq)  # type: ignore[union-attr]
                if type(checked) is Invalid:
                    if self._reject(checked, now):
                        return
                    continue
                data = checked
            if kind is Event:
                stats.messages_in["EVENT"] += 1
                if not node.submit(seat, event_entry(seat.actor, msg.seq, data), msg.seq):  # type: ignore[union-attr]
                    continue
            elif kind is State:
                stats.messages_in["STATE"] += 1
                if not node.submit(seat, state_entry(seat.actor, msg.key, data), msg.seq, change):  # type: ignore[union-attr, arg-type]
                    continue
            else:
                stats.messages_in["DIRECT"] += 1
                if not node.direct(seat, msg.to_actor, msg.seq, data):  # type: ignore[union-attr]
                    continue
            session.accepted(msg.seq)  # type: ignore[union-attr]

    def _check_rules(self, msg: Event | State | Direct) -> bytes | Invalid:
        """The room's rules on a move: the data to relay (maybe replaced), or why not."""
        seat = self.seat
        assert seat is not None and seat.room.rules is not None
        validate, actor = seat.room.rules.validate, seat.actor
        if type(msg) is Event:
            return validate(actor, msg.seq, "event", msg.data)
        if type(msg) is State:
            return validate(actor, msg.seq, "state", msg.data, key=msg.key)
        return validate(actor, msg.seq, "direct", msg.data, to_actor=msg.to_actor)  # type: ignore[union-attr]

    def _snapshot_full(self, seq: int) -> Invalid:
        why = f"the room's snapshot would pass max_snapshot_bytes ({self.settings.max_snapshot_bytes})"
        return Invalid(seq, ErrorCode.TOO_LARGE, why)

    def _reject(self, invalid: Invalid, now: float) -> bool:
        """Answer ERROR; True when the connection has used up its error budget."""
        code = invalid.code
        self.stats.errors[code.value if isinstance(code, ErrorCode) else "game"] += 1  # a game's own code
        seat = self.seat
        assert seat is not None
        self.relay.node.reply(seat, protocol.error(invalid.seq, invalid.code, invalid.message))
        close = self.session.rejected(invalid, now)
        if close is None:
            return False
        reason = "too many rejected messages" if close == CloseCode.TOO_MANY_ERRORS else "rate limit exceeded repeatedly"
        self.relay.node.kick(seat, close, reason, flush=True)
        return True


def parse_request(scope: Scope) -> tuple[str, dict[str, Any], str | None]:
    """The room and query parameters of a connection, or a 4400 reason."""
    room = scope.get("path_params", {}).get("room", "")
    if not protocol.ROOM_ID.fullmatch(room):
        return room, {}, "room must be 1-64 characters from A-Z a-z 0-9 _ . : -"
    try:
        # errors="strict": percent-escapes that are not UTF-8 are refused, not replaced
        # with U+FFFD (two different player ids would then be the same one).
        query = parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return room, {}, "query string is not UTF-8"
    one = {k: v[-1] for k, v in query.items()}
    echo = FLAGS.get(one.get("echo", "0").lower())
    if echo is None:
        return room, {}, "echo must be 0, 1, true or false"
    player = one.get("player") or "p-" + secrets.token_hex(6)
    if len(player.encode()) > MAX_PLAYER_ID or not player.isprintable():
        return room, {}, f"player must be printable, 1-{MAX_PLAYER_ID} bytes in UTF-8"
    meta: dict[str, Any] = {}
    if "name" in one:
        name = one["name"]
        if len(name) > MAX_NAME or not name.isprintable():
            return room, {}, f"name must be at most {MAX_NAME} printable characters"
        meta["name"] = name
    resume = one.get("resume") or None
    offset = one.get("offset")
    if offset is not None and not OFFSET.fullmatch(offset):
        return room, {}, "offset must be a non-negative integer"
    params = {
        "player": player, "echo": echo, "meta": meta, "token": one.get("token"),
        "resume": resume, "offset": int(offset) if offset else None, "epoch": one.get("epoch"),
    }
    return room, params, None


def client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def origin_allowed(scope: Scope, allowed: str) -> bool:
    """Browsers send Origin; a page from another site must not join (CSWSH). Others pass,
    and so do the relay's own pages (the demo): an Origin naming the host asked for."""
    if allowed.strip() == "*":
        return True
    headers = dict(scope.get("headers", []))
    origin = headers.get(b"origin")
    if origin is None:
        return True
    origin_text = origin.decode("latin-1").rstrip("/")
    host = headers.get(b"host")
    if host is not None and origin_text.partition("://")[2] == host.decode("latin-1"):
        return True
    return origin_text in {o.strip().rstrip("/") for o in allowed.split(",")}


