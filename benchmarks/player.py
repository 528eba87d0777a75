"""One simulated player: a raw ``websockets`` asyncio client speaking protocol v1.

Deliberately lean, so that the generator costs little per frame: no client
library, one ``msgpack.Unpacker`` per connection (a frame may hold several
messages back to back), one clock read per frame. Each move is an EVENT
``[1, seq, [send_time_ns, sender, padding]]``; a receiver computes its latency
from the send time, so every process of the generator must share the clock
(they run on one machine).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

WELCOME, EVENT, ERROR, DROPPED = 0, 1, 7, 8
FAR_FUTURE = 1 << 62


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


@dataclass
class Tally:
    """What the players of one worker process observed (merged by the parent)."""

    received: int = 0  # EVENTs stamped in the window, received by reading players
    frames: int = 0  # frames received during the window
    messages: int = 0  # messages in those frames (any type)
    dropped: int = 0  # sum of DROPPED counts
    errors: int = 0  # ERROR messages
    closes: dict[int, int] = field(default_factory=dict)  # close code -> connections
    hist: dict[int, int] = field(default_factory=dict)  # latency us (3 significant bits+) -> n
    # per room: [moves sent by readers in window, moves sent by slow readers in window]
    sent: dict[int, list[int]] = field(default_factory=dict)

    def closed(self, exc: ConnectionClosed) -> None:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        self.closes[code] = self.closes.get(code, 0) + 1


def bucket(us: int) -> int:
    """Round a latency down to 7 significant bits: under 1 % error, few distinct keys."""
    if us < 128:
        return us
    shift = us.bit_length() - 7
    return (us >> shift) << shift


class Player:
    def __init__(self, seat: Seat, url: str) -> None:
        self.seat = seat
        self.url = url
        self.ws: ClientConnection | None = None
        self.unpacker = msgpack.Unpacker()

    async def join(self, timeout: float) -> None:
        """Connect and wait for WELCOME, which must come first."""
        self.ws = await connect(
            self.url, compression=None, ping_interval=None, proxy=None,
            max_size=None, open_timeout=timeout, close_timeout=1,
        )
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        self.unpacker.feed(frame)
        first = next(self.unpacker)
        if first[0] != WELCOME:
            raise RuntimeError(f"first message is not WELCOME: {first[:3]!r}")
        for _ in self.unpacker:  # whatever else came in that frame predates the window
            pass

    async def read(self, window: Window, tally: Tally) -> None:
        """Receive until cancelled; count the window's EVENTs and their latency."""
        assert self.ws is not None
        recv, unpacker, hist = self.ws.recv, self.unpacker, tally.hist
        try:
            while True:
                frame = await recv()
                now = time.time_ns()
                unpacker.feed(frame)
                in_window = window.start <= now < window.end
                n = 0
                # Micro-optimization: EVENT is by far the most common message.
                for msg in unpacker:
                    n += 1
                    kind = msg[0]
                    if kind == EVENT:
                        sent_at = msg[3][0]
                        if window.start <= sent_at < window.end:
                            tally.received += 1
                            us = (now - sent_at) // 1000
                            key = us if us < 128 else bucket(us)
                            hist[key] = hist.get(key, 0) + 1
                    elif kind == DROPPED:
                        tally.dropped += msg[1]
                    elif kind == ERROR:
                        tally.errors += 1
                if in_window:
                    tally.frames += 1
                    tally.messages += n
        except ConnectionClosed as exc:
            tally.closed(exc)

    async def play(self, rate: float, size: int, go: float, window: Window, tally: Tally) -> None:
        """Send ``rate`` moves/s from loop time ``go`` until the window ends."""
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        period = 1.0 / rate
        padding = b"x" * max(0, size - 24)  # ~24 bytes of envelope, ints and headers
        counts = tally.sent.setdefault(self.seat.room, [0, 0])
        slot = 1 if self.seat.slow else 0
        me = self.seat.index
        due = go + random.random() * period  # spread players over the period
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
                await self.ws.send(msgpack.packb([EVENT, seq, [now, me, padding]]))
                if now >= window.start:
                    counts[slot] += 1
                due += period
                if due < loop.time() - period:  # fell behind: don't burst to catch up
                    due = loop.time()
        except ConnectionClosed as exc:
            if self.seat.slow:  # a reader would have seen and counted the close
                tally.closed(exc)

    async def leave(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 1.0)
            except (asyncio.TimeoutError, OSError):
                self.ws.transport.abort()
