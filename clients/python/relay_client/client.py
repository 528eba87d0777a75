"""The asyncio client for relay (protocol v1).

::

    async with connect("ws://127.0.0.1:8000", "grid:lobby", player="ann") as room:
        room.send_state("pos", [3, 4])
        async for message in room:
            print(message)

Sends are batched: ``send_*`` queue a message and return its seq at once; all
messages queued in one event-loop iteration go out together, in as few frames as
the server's ``max_frame_bytes`` allows. A background
task reads frames, keeps :attr:`Client.members` and :attr:`Client.snapshot`
current, and queues typed messages for iteration. When that queue is full
(``max_queue``) it stops reading the socket, so the server sees a slow reader.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import msgpack
import websockets
from websockets.asyncio.client import ClientConnection

from relay_client.messages import (
    Dropped,
    Error,
    Event,
    Join,
    Leave,
    Member,
    Message,
    Pong,
    Resumed,
    Resynced,
    State,
    Welcome,
    parse,
)


class RelayClosed(Exception):
    """The connection ended; ``code`` and ``reason`` are the server's close frame."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
RESEND_BUFFER = 1024  # own moves kept for re-sending after a resume
RESUMABLE = frozenset({1001, 1006, 1011, 1012, 1013, 4008})  # a broken link, not a verdict
_END = object()
_NO_STATE = object()


@dataclass(slots=True)
class _Move:
    """One of this client's own moves, kept until the server is known to have it."""

    seq: int
    wire: bytes
    state_key: Any = _NO_STATE  # a STATE's key and value, to keep our own snapshot
    state_data: Any = None
    direct: bool = False  # a DIRECT: its to_actor means nothing in another epoch of the room


class Client:
    def __init__(
        self,
        ws: ClientConnection,
        welcome: Welcome,
        *,
        max_queue: int,
        address: str | list[str] = "",
        query: dict[str, str] | None = None,
        token: Callable[[], str] | None = None,
        auto_resume: bool = True,
        resume_for_s: float = 10.0,
        open_timeout: float = 10.0,
    ) -> None:
        self.ws = ws
        self.auto_resume = auto_resume
        self.resume_for_s = resume_for_s
        self.resume_token = welcome.resume_token
        # The room's address on every relay node given; a resume tries them in turn.
        self._addresses = [address] if isinstance(address, str) else list(address)
        self._at = 0  # the node of the current connection
        self._query = {k: v for k, v in (query or {}).items() if k not in ("resume", "offset", "epoch")}
        self._token = token  # asked again for each reconnect (a token may expire meanwhile)
        self.echo = self._query.get("echo") == "1"
        self._open_timeout = open_timeout
        self._closing = False
        self._verdict: RelayClosed | None = None  # a reconnect refused for good
        self._sent: collections.deque[_Move] = collections.deque(maxlen=RESEND_BUFFER)
        self.welcome = welcome
        self.actor = welcome.actor
        self.room = welcome.room
        self.epoch = welcome.epoch
        self.offset = welcome.offset
        self.limits = welcome.limits
        self.members: dict[int, Member] = {m.actor: m for m in welcome.members}
        self.snapshot: dict[int, dict[Any, Any]] = {a: dict(v) for a, v in welcome.snapshot.items()}
        self.dropped = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self._seq = itertools.count(1)
        # Messages not yet written to a socket, with their seq (None: a PING). A write that
        # fails puts its messages back: they go out after the resume.
        self._outgoing: list[tuple[int | None, bytes]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue(max_queue)
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    # --- sending ---------------------------------------------------------------------

    def send_event(self, data: Any) -> int:
        """Queue an EVENT (relayed to every other member in room order); returns its seq."""
        seq = next(self._seq)
        self._queue_out(_Move(seq, _pack([1, seq, data])))
        return seq

    def send_state(self, key: str | int, data: Any) -> int:
        """Queue a STATE: this player's value under ``key`` (``None`` deletes it).

        Without ``echo`` the server does not send it back, so :attr:`snapshot` takes
        it at once, as sent: if the server refuses it (an Error with its seq), the
        snapshot keeps it all the same. Join with ``echo=True`` for a snapshot that
        holds only what the room accepted.
        """
        seq = next(self._seq)
        self._queue_out(_Move(seq, _pack([2, seq, key, data]), key, data))
        if not self.echo:
            self._set_state(self.actor, key, data)
        return seq

    def send_direct(self, to_actor: int, data: Any) -> int:
        """Queue a DIRECT to one member; returns its seq."""
        seq = next(self._seq)
        self._queue_out(_Move(seq, _pack([3, seq, to_actor, data]), direct=True))
        return seq

    async def send_raw(self, frame: bytes) -> None:
        """Send bytes as a frame of their own, as they are (to test a server's validation)."""
        await self.flush()
        await self.ws.send(frame)

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time to the server, in seconds."""
        ping_id = next(self._ping_ids)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        sent = time.perf_counter()
        self._queue_out(None, _pack([9, ping_id]))
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(ping_id, None)
        return time.perf_counter() - sent

    async def flush(self) -> None:
        """Wait until everything queued so far has been written to the socket (or, while
        the client reconnects, has been tried once: it goes out after the resume)."""
        while self._flush_task is not None and not self._flush_task.done():
            await asyncio.shield(self._flush_task)
        if self._outgoing:  # one writer at a time: a batch's frames must not interleave
            self._schedule_write()
            await asyncio.shield(self._flush_task)  # type: ignore[arg-type]

    def _queue_out(self, move: _Move | None, ping: bytes = b"") -> None:
        if self.close_code is not None:
            raise RelayClosed(self.close_code, self.close_reason)
        wire = ping if move is None else move.wire
        limit = self.limits.get("max_frame_bytes")
        if isinstance(limit, int) and len(wire) > limit:
            # Alone in a frame it would still be too big: the server would close with 1009.
            raise ValueError(
                f"a message of {len(wire)} bytes is larger than the server's max_frame_bytes ({limit})"
            )
        if move is not None:
            self._sent.append(move)  # kept to re-send after a resume
            self._outgoing.append((move.seq, wire))
        else:
            self._outgoing.append((None, wire))
        self._schedule_write()

    def _schedule_write(self) -> None:
        if self._outgoing and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        await asyncio.sleep(0)  # let the caller queue the rest of this iteration's messages
        limit = self.limits.get("max_frame_bytes")
        if not isinstance(limit, int) or limit <= 0:
            limit = 1 << 62
        while self._outgoing:
            pending, self._outgoing = self._outgoing, []
            start = 0
            while start < len(pending):
                end, size = start + 1, len(pending[start][1])
                while end < len(pending) and size + len(pending[end][1]) <= limit:
                    size += len(pending[end][1])
                    end += 1
                try:
                    await self.ws.send(b"".join(wire for _, wire in pending[start:end]))
                except websockets.ConnectionClosed:
                    # These never left: they wait for the reader's resume (or its close).
                    self._outgoing[:0] = pending[start:]
                    return
                start = end

    # --- receiving -------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; raises RelayClosed once the connection is over."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _END:
            self._queue.put_nowait(_END)  # every later call raises too
            raise RelayClosed(self.close_code, self.close_reason)
        return item  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except RelayClosed:
                return

    async def _read(self) -> None:
        try:
            while True:
                await self._read_connection(self.ws)
                rcvd = self.ws.protocol.close_rcvd
                code = rcvd.code if rcvd is not None else 1006
                if self._closing or not self.auto_resume or code not in RESUMABLE:
                    break
                if not await self._resume(code):
                    break
        finally:
            rcvd = self.ws.protocol.close_rcvd
            if self._verdict is not None:  # a reconnect was refused for good: that is why
                self.close_code, self.close_reason = self._verdict.code, self._verdict.reason
            else:
                self.close_code = rcvd.code if rcvd is not None else 1006
                self.close_reason = rcvd.reason if rcvd is not None else ""
            for future in self._pings.values():
                if not future.done():
                    future.set_exception(RelayClosed(self.close_code, self.close_reason))
            await self._queue.put(_END)

    async def _read_connection(self, ws: ClientConnection) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    continue
                unpacker.feed(frame)
                for raw in unpacker:
                    message = parse(raw)
                    if message is None:
                        continue  # a type this client does not know: ignored, as the protocol says
                    self._track(message)
                    if isinstance(message, Pong) and message.client_time in self._pings:
                        future = self._pings[message.client_time]
                        if not future.done():
                            future.set_result(0.0)
                        continue
                    await self._queue.put(message)
        except websockets.ConnectionClosed:
            pass

    async def _resume(self, code: int) -> bool:
        """Reconnect with backoff and take the seat back; False when that is not possible.

        With several nodes, a node that is going away (1001) or cannot be reached
        is left for the next one: the resume token works on any node.
        """
        me = self.members.get(self.actor)
        query = dict(self._query, resume=self.resume_token, offset=str(self.offset), epoch=self.epoch)
        if me is not None:
            query["player"] = me.player
        delay = 0.05
        deadline = asyncio.get_running_loop().time() + self.resume_for_s
        if code == 1001:
            self._at = (self._at + 1) % len(self._addresses)
        while asyncio.get_running_loop().time() < deadline and not self._closing:
            if self._token is not None:
                try:
                    query["token"] = self._token()
                except Exception as exc:  # the app's token source failed: that ends it
                    self._verdict = RelayClosed(None, f"the token function failed: {exc!r}")
                    return False
            try:
                ws, welcome, rest = await _open(self._addresses[self._at], query, self._open_timeout)
            except RelayClosed as exc:
                if exc.code not in RESUMABLE:  # a verdict (4001, 4003, 4009, 4400): every node's
                    self._verdict = exc
                    return False
                ws = None
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake):
                ws = None
            if ws is None:
                self._at = (self._at + 1) % len(self._addresses)
                if self._at == 0 or len(self._addresses) == 1:
                    await asyncio.sleep(delay)  # backoff between rounds of reconnection attempts
                    delay = min(delay * 2, 2.0)
                continue
            if self._closing:  # close() was called while we were reconnecting
                await ws.close()
                return False
            await self._queue.put(self._take_welcome(ws, welcome))
            for message in rest:
                if message is not None:
                    self._track(message)
                    await self._queue.put(message)
            return True
        return False

    def _take_welcome(self, ws: ClientConnection, welcome: Welcome) -> Message:
        """Take a reconnect's WELCOME; returns the notice for the app (Resumed or Resynced)."""
        exact = (welcome.actor, welcome.epoch, welcome.offset) == (self.actor, self.epoch, self.offset)
        same_seat = (welcome.actor, welcome.epoch) == (self.actor, self.epoch)
        same_epoch = welcome.epoch == self.epoch
        unsent_directs: list[int] = []
        self.ws = ws
        self.welcome = welcome
        self.limits = welcome.limits
        if not exact:  # a fresh snapshot: the state starts over from here
            self.members = {m.actor: m for m in welcome.members}
            self.snapshot = {a: dict(v) for a, v in welcome.snapshot.items()}
        self.actor, self.epoch, self.offset = welcome.actor, welcome.epoch, welcome.offset
        self.resume_token = welcome.resume_token
        if same_seat:
            # Re-send, in order, every own move the server had not got (nil: it had none),
            # the ones that never left included; the PINGs that never left follow.
            last = welcome.last_seq if welcome.last_seq is not None else -1
            again = [m for m in self._sent if m.seq > last]
            pings = [o for o in self._outgoing if o[0] is None]
            self._outgoing = [(m.seq, m.wire) for m in again] + pings
        else:
            # A new seat has none of the old one's moves, and the old seat may have applied
            # any move that left: only those that never left go out, as they are.
            unsent = {seq for seq, _ in self._outgoing}
            again = [m for m in self._sent if m.seq in unsent]
            if not same_epoch:  # a new room order numbers its members anew: those DIRECTs are not sent
                unsent_directs = [m.seq for m in again if m.direct]
                again = [m for m in again if not m.direct]
                self._outgoing = [o for o in self._outgoing if o[0] not in unsent_directs]
        self._sent = collections.deque(again, maxlen=RESEND_BUFFER)
        if not exact and not self.echo:  # the fresh snapshot predates these STATEs
            for move in again:
                if move.state_key is not _NO_STATE:
                    self._set_state(self.actor, move.state_key, move.state_data)
        self._schedule_write()
        return Resumed(welcome.actor, welcome.offset) if exact else Resynced(welcome, unsent_directs)

    def _set_state(self, actor: int, key: Any, data: Any) -> None:
        if data is None:
            values = self.snapshot.get(actor)
            if values is not None:
                values.pop(key, None)
                if not values:
                    del self.snapshot[actor]
        else:
            self.snapshot.setdefault(actor, {})[key] = data

    def _track(self, message: Message) -> None:
        if isinstance(message, State):
            if message.actor in self.members:
                self._set_state(message.actor, message.key, message.data)
        elif isinstance(message, Join):
            self.members[message.actor] = Member(message.actor, message.player, message.meta)
        elif isinstance(message, Leave):
            self.members.pop(message.actor, None)
            self.snapshot.pop(message.actor, None)
        elif isinstance(message, Dropped):
            self.dropped += message.count
        elif isinstance(message, Error) and message.ref_seq is not None:
            # Answered: refused for good, so never re-sent after a resume (where the rules
            # might take it, out of its time).
            for move in self._sent:
                if move.seq == message.ref_seq:
                    self._sent.remove(move)
                    break
        if isinstance(message, (Event, State, Join, Leave)):
            self.offset = max(self.offset, message.offset)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._closing = True
        await self.flush()
        await self.ws.close(code, reason)
        await asyncio.wait([self._reader], timeout=5)


@asynccontextmanager
async def connect(url: str | Sequence[str], room: str, **options: Any) -> AsyncIterator[Client]:
    """Join ``room`` on the relay at ``url`` (``ws://host:port``, or a list of nodes); yields
    once WELCOME is in.

    Takes the options of :func:`open_client`, and closes the client on the way out.
    Raises :class:`RelayClosed` when the server refuses the connection with a close code.
    """
    client = await open_client(url, room, **options)
    try:
        yield client
    finally:
        await client.close()


async def open_client(
    url: str | Sequence[str],
    room: str,
    *,
    player: str | None = None,
    name: str | None = None,
    token: str | Callable[[], str] | None = None,
    echo: bool = False,
    max_queue: int = 10000,
    open_timeout: float = 10.0,
    auto_resume: bool = True,
    resume_for_s: float = 10.0,
    **params: str,
) -> Client:
    """Like :func:`connect` without the context manager; close the client yourself.

    ``url`` may be a list of relay nodes sharing rooms (through Redis): the first
    that answers is used, and a resume goes on to the next when a node goes away.
    ``token`` may be a function that returns a token: it is asked again for every
    reconnect, so that a session can outlive the token it started with.
    """
    query: dict[str, str] = dict(params)
    if player is not None:
        query["player"] = player
    if name is not None:
        query["name"] = name
    if callable(token):
        query["token"] = token()
    elif token is not None:
        query["token"] = token
    if echo:
        query["echo"] = "1"
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("no relay url given")
    addresses = [f"{_ws_url(u).rstrip('/')}/ws/{quote(room, safe='')}" for u in urls]
    for at, address in enumerate(addresses):
        try:
            ws, welcome, rest = await _open(address, query, open_timeout)
            break
        except RelayClosed as exc:
            if exc.code not in RESUMABLE or at == len(addresses) - 1:
                raise  # a verdict (a bad token, a full room) would be every node's answer
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake):
            if at == len(addresses) - 1:
                raise  # no node could be reached: the last one's failure
    addresses = addresses[at:] + addresses[:at]  # the one that answered first
    client = Client(
        ws, welcome, max_queue=max_queue, address=addresses, query=query,
        token=token if callable(token) else None, auto_resume=auto_resume,
        resume_for_s=resume_for_s, open_timeout=open_timeout,
    )
    for message in rest:  # anything batched with WELCOME comes next, in order
        if message is not None:
            client._track(message)
            client._queue.put_nowait(message)
    return client


def _ws_url(url: str) -> str:
    """``http://`` and ``https://`` name the same relay as ``ws://`` and ``wss://``."""
    scheme, sep, rest = url.partition("://")
    return {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme) + sep + rest if sep else url


async def _open(
    address: str, query: dict[str, str], open_timeout: float
) -> tuple[ClientConnection, Welcome, list[Message | None]]:
    """Connect and read WELCOME; RelayClosed if the server closes instead."""
    if query:
        address += "?" + urlencode(query)
    ws = await websockets.connect(address, max_size=None, open_timeout=open_timeout)
    try:
        first = await asyncio.wait_for(ws.recv(), open_timeout)
    except websockets.ConnectionClosed:
        rcvd = ws.protocol.close_rcvd
        raise RelayClosed(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "") from None
    except BaseException:
        await ws.close()
        raise
    if isinstance(first, str):
        await ws.close()
        raise RelayClosed(None, "server sent a text frame; is this a relay?")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(first)
    messages = [parse(raw) for raw in unpacker]
    welcome = messages[0] if messages else None
    if not isinstance(welcome, Welcome):
        await ws.close()
        raise RelayClosed(None, "the first message was not WELCOME")
    return ws, welcome, messages[1:]


__all__ = ["Client", "RelayClosed", "connect", "open_client"]
