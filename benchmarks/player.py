"""One simulated player: a raw ``websockets`` asyncio client speaking protocol v1.

Deliberately lean, so that the generator costs little per frame: no client
library; a reading player takes each binary frame straight from the connection's
event processing (no message queue, no task wake-up per frame), feeds it to one
``msgpack.Unpacker`` (a frame may hold several messages back to back), and reads
the clock once per frame. Each move is an EVENT ``[1, seq, [send_time_ns,
sender, padding]]``; a receiver computes its latency from the send time, so every
generator process must share the clock (they run on one machine).
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

WELCOME, EVENT, ERROR, DROPPED = 0, 1, 7, 8
FAR_FUTURE = 1 << 62
# A slow reader's receive buffer: small, like a congested mobile link, so that its
# backlog builds up in the server (where the policy under test lives), not in our kernel.
SLOW_RCVBUF = 4096


# Every player's websockets client: no compression or keepalive of its own, no proxy
# lookup, no size limit (the relay's limits are what is measured).
CONNECT_OPTIONS: dict[str, Any] = {
    "compression": None, "ping_interval": None, "proxy": None, "max_size": None, "close_timeout": 1,
}


@dataclass(frozen=True)
class Seat:
    """Where one player goes: its room, which server, and whether it reads slowly."""

    index: int  # global player number, also its id on the wire
    room: int
    server: int
    slow: bool = False


@dataclass
class Window:
    """The measurement window in ``time.time_ns()``; moves stamped inside it count."""

    start: int = FAR_FUTURE
    end: int = FAR_FUTURE
    slow_senders: frozenset[int] = frozenset()  # seats of the slow readers


@dataclass
class Tally:
    """What the players of one worker process observed (merged by the parent)."""

    received: int = 0  # EVENTs stamped in the window, received by reading players
    received_from_slow: int = 0  # ... of which slow readers sent
    frames: int = 0  # frames received during the window
    messages: int = 0  # messages in those frames (any type)
    dropped: int = 0  # sum of DROPPED counts
    errors: int = 0  # ERROR messages
    error_sample: list[str] = field(default_factory=list)  # the first few, as code: message
    closes: dict[int, int] = field(default_factory=dict)  # close code -> connections
    hist: dict[int, int] = field(default_factory=dict)  # latency us (7 significant bits) -> n
    # per room: [moves sent by readers in window, moves sent by slow readers in window]
    sent: dict[int, list[int]] = field(default_factory=dict)

    def closed(self, code: int | None) -> None:
        code = 1006 if code is None else code
        self.closes[code] = self.closes.get(code, 0) + 1


def bucket(us: int) -> int:
    """Round a latency down to 7 significant bits: under 1 % error, few distinct keys."""
    if us < 128:
        return us
    shift = us.bit_length() - 7
    return (us >> shift) << shift


class FrameConnection(ClientConnection):
    """A client connection that hands each binary frame straight to a callback.

    websockets does the handshake, sends, pings and the closing handshake. Once
    the player is told to go :attr:`fast`, this class also parses incoming frames
    itself: a server's frames are unmasked, so a frame is a 2-10 byte header and
    its payload, and websockets' general parser was half of the generator's CPU.
    Anything but a whole binary frame, a ping or a pong (a close, a text or a
    fragmented frame) hands the stream back to websockets from that frame on.
    """

    def __init__(
        self, *args: Any, on_frame: Callable[[bytes | bytearray], None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_frame = on_frame
        self.fast = False  # set by the player once WELCOME is in
        self._parsing = False  # parsing frames ourselves
        self._pending = b""

    def process_event(self, event: Any) -> None:
        if type(event) is Frame and event.opcode is Opcode.BINARY and event.fin:
            self.on_frame(bytes(event.data))
        else:
            super().process_event(event)

    def data_received(self, data: bytes) -> None:
        if not self._parsing:
            super().data_received(data)
            # Take over only at a frame boundary: websockets' buffer must be empty.
            self._parsing = self.fast and not self.protocol.reader.buffer
            return
        buf = self._pending + data if self._pending else data
        size, pos = len(buf), 0
        on_frame = self.on_frame
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + header + length
            if end > size:
                break
            if b0 == 0x82 and not b1 & 0x80:  # FIN + binary, unmasked: the hot path
                on_frame(buf[pos + header : end])
            elif b0 == 0x89:  # ping: answered through websockets while the connection is open
                if self.protocol.state is State.OPEN:
                    self.protocol.send_pong(buf[pos + header : end])
                    self.send_data()
            elif b0 != 0x8A:  # not a pong either: websockets takes the stream back
                self._parsing, self._pending = False, b""
                super().data_received(buf[pos:])
                return
            pos = end
        self._pending = buf[pos:] if pos < size else b""


class Player:
    def __init__(self, seat: Seat, url: str, window: Window, tally: Tally) -> None:
        self.seat = seat
        self.url = url
        self.window = window
        self.tally = tally
        self.ws: ClientConnection | None = None
        self.unpacker = msgpack.Unpacker()
        self.welcomed: asyncio.Future[None] | None = None

    async def join(self, timeout: float) -> None:
        """Connect and wait for WELCOME, which must come first."""
        if self.seat.slow:
            self.ws = await self._connect_slow(timeout)
            welcome = await asyncio.wait_for(self.ws.recv(decode=False), timeout)
            self._check_welcome(welcome)
            return  # and never read again
        self.welcomed = asyncio.get_running_loop().create_future()
        self.ws = await connect(
            self.url,
            open_timeout=timeout,
            create_connection=functools.partial(  # type: ignore[arg-type]
                FrameConnection, on_frame=self.on_frame
            ),
            **CONNECT_OPTIONS,
        )
        closed = asyncio.ensure_future(self.ws.wait_closed())
        await asyncio.wait((self.welcomed, closed), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not self.welcomed.done():
            if self.ws.close_code is not None:  # refused: say why (a token required, a full room, ...)
                raise ConnectionError(f"closed with {self.ws.close_code} {self.ws.close_reason!r} before WELCOME")
            raise TimeoutError(f"no WELCOME within {timeout:g} s")
        self.welcomed.result()
        self.ws.fast = True  # type: ignore[attr-defined]

    async def _connect_slow(self, timeout: float) -> ClientConnection:
        url = urlsplit(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
        # Not reading: websockets queues a few frames, then stops reading the socket.
        return await connect(self.url, sock=sock, open_timeout=timeout, **CONNECT_OPTIONS)

    def _check_welcome(self, frame: bytes | bytearray) -> None:
        self.unpacker.feed(frame)
        first = next(self.unpacker)
        if first[0] != WELCOME:
            raise RuntimeError(f"first message is not WELCOME: {first[:3]!r}")
        for _ in self.unpacker:  # whatever else came in that frame predates the window
            pass

    def on_frame(self, frame: bytes | bytearray) -> None:
        """Count the window's EVENTs and their latency (runs inside data_received)."""
        now = time.time_ns()
        if self.welcomed is not None and not self.welcomed.done():
            try:
                self._check_welcome(frame)
                self.welcomed.set_result(None)
            except Exception as exc:  # noqa: BLE001 - join() raises it
                self.welcomed.set_exception(exc)
            return
        tally, window = self.tally, self.window
        start, end, slow = window.start, window.end, window.slow_senders
        self.unpacker.feed(frame)
        n = 0
        for msg in self.unpacker:
            n += 1
            kind = msg[0]
            # Micro-optimization: EVENT is by far the most common message.
            if kind == EVENT:
                sent_at = msg[3][0]
                if start <= sent_at < end:
                    tally.received += 1
                    if slow and msg[3][1] in slow:
                        tally.received_from_slow += 1
                    us = (now - sent_at) // 1000
                    key = us if us < 128 else bucket(us)
                    tally.hist[key] = tally.hist.get(key, 0) + 1
            elif kind == DROPPED:
                tally.dropped += msg[1]
            elif kind == ERROR:
                tally.errors += 1
                if len(tally.error_sample) < 3:
                    tally.error_sample.append(f"{msg[2]}: {msg[3]}")
        if start <= now < end:
            tally.frames += 1
            tally.messages += n

    async def watch(self) -> None:
        """Wait until the connection closes, and count why (cancelled when the run ends)."""
        assert self.ws is not None
        await self.ws.wait_closed()
        self.tally.closed(self.ws.close_code)

    async def play(self, rate: float, size: int, go: float, tick: bool = False) -> None:
        """Send ``rate`` moves/s from loop time ``go`` until the window ends; with ``tick``
        at the phase of the player's room (the same in every worker process)."""
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        window, send = self.window, self.ws.send
        period = 1.0 / rate
        padding = b"x" * max(0, size - 24)  # ~24 bytes of envelope, ints and headers
        counts = self.tally.sent.setdefault(self.seat.room, [0, 0])
        slot = 1 if self.seat.slow else 0
        me = self.seat.index
        phase = random.Random(self.seat.room).random() if tick else random.random()
        due = go + phase * period  # spread players (or rooms) over the period
        seq = 0
        try:
            while True:
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                now = time.time_ns()
                if now >= window.end:
                    return
                seq += 1
                await send(msgpack.packb([EVENT, seq, [now, me, padding]]))
                if now >= window.start:
                    counts[slot] += 1
                due += period
                if due < loop.time() - period:  # fell behind: don't burst to catch up
                    due = loop.time()
        except ConnectionClosed:
            pass  # counted by watch()

    async def leave(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 1.0)
            except (TimeoutError, OSError):
                self.ws.transport.abort()
