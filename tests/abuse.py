"""Attacker helpers for the abuse end-to-end test: hostile frames, hostile clients, raw sockets.

Everything here talks to 127.0.0.1 only, sends a bounded number of frames, and
closes every socket it opens (in ``finally`` blocks), however the attack ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import websockets

from relay_client import Error, Message, RelayClosed, open_client
from tests.relayproc import timeout

MOVE_TYPES = (1, 2, 3)  # EVENT, STATE, DIRECT: the messages that would be relayed


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# --- hostile frames --------------------------------------------------------------------


def looks_like_move(frame: bytes) -> bool:
    """Whether any message the frame decodes to (before it stops decoding) could be relayed.

    Independent of the server's decoder: a msgpack array whose first element is
    the integer 1, 2 or 3 counts, whatever follows. Used to keep random garbage
    from being an honest-looking move by chance (it would then rightly be relayed).
    """
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, max_buffer_size=max(len(frame), 1)
    )
    unpacker.feed(frame)
    try:
        for value in unpacker:
            if isinstance(value, list) and value and type(value[0]) is int:
                if value[0] in MOVE_TYPES:
                    return True
    except Exception:  # noqa: BLE001 - garbage ends decoding in many ways
        return False
    return False


def garbage_frames(rng: random.Random, count: int, max_len: int = 2048) -> list[bytes]:
    """Random byte frames of several flavours, none of which holds a relayable move."""
    valid = [
        pack([1, 7, {"x": [1, 2, 3], "s": "hello"}]),
        pack([2, 8, "pos", [3, 4]]),
        pack([3, 9, 1, b"hi"]),
    ]
    frames: list[bytes] = []
    while len(frames) < count:
        flavour = rng.randrange(4)
        if flavour == 0:  # uniformly random bytes
            frame = rng.randbytes(rng.randint(1, max_len))
        elif flavour == 1:  # an array header, then noise
            head = rng.choice([0x91, 0x92, 0x93, 0x94, 0xDC, 0xDD])
            frame = bytes([head]) + rng.randbytes(rng.randint(1, 64))
        elif flavour == 2:  # a valid move with a few bytes flipped, cut or repeated
            frame = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            if rng.random() < 0.5:
                frame = frame[: rng.randint(1, len(frame))]
            frame = bytes(frame) * rng.randint(1, 3)
        else:  # msgpack type bytes only: headers of every kind, no payloads
            frame = bytes(rng.choice(range(0xC0, 0x100)) for _ in range(rng.randint(1, 32)))
        if not looks_like_move(frame):
            frames.append(frame)
    return frames


def deep(levels: int, opener: bytes = b"\x91", leaf: bytes = b"\xc0") -> bytes:
    """Raw msgpack nested ``levels`` deep (``\\x91``: array of one; ``\\x81\\xc0``: {nil: ...})."""
    return opener * levels + leaf


def event_raw(seq: int, data_raw: bytes) -> bytes:
    """``[1, seq, data]`` with ``data`` spliced in as raw msgpack bytes."""
    return b"\x93\x01" + pack(seq) + data_raw


ATTACK_MARK = "ATTACK"  # the data of well-formed-looking moves hidden in bad frames


def c1_frames() -> list[bytes]:
    """0xc1 is never valid msgpack; a valid move after it must be skipped with the rest."""
    hidden = pack([1, 10**6, ATTACK_MARK])
    return [b"\xc1", b"\xc1" + hidden, b"\x93\x01\x05\xc1", b"\x92\x09\xc1", b"\x91\xc1" + hidden]


def bomb_frames() -> list[bytes]:
    return [
        event_raw(1, deep(33)),  # one past max_depth (32)
        event_raw(2, deep(1000)),  # deep, within msgpack's own stack limit
        event_raw(3, deep(5000)),  # beyond msgpack's stack limit
        event_raw(4, deep(4000, b"\x81\xc0")),  # maps: {nil: {nil: ...}}
        b"\x91" * 16000,  # a frame that is nothing but array headers
        b"\x81\xc0" * 8000,
        pack([2, 5, "pos", 0])[:-1] + deep(40),  # STATE with a deep value
        b"\x92\x09" + deep(5000),  # PING with a deep client_time
        event_raw(6, b"\xdc\xff\xff" + b"\x90" * 8000),  # wide: 65535 elements announced, 8000 sent
    ]


def header_frames() -> list[bytes]:
    """Length headers that promise far more than the frame holds."""
    heads = [
        b"\xdd\xff\xff\xff\xff",  # array32
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xc9\xff\xff\xff\xff\x05",  # ext32
        b"\xdc\xff\xff",  # array16
        b"\xda\xff\xff",  # str16
    ]
    in_data = [event_raw(10 + i, h) for i, h in enumerate(heads)]
    return heads + in_data + [b"\xdd\xff\xff\xff\xff\x01\x05"]


def ext_frames() -> list[bytes]:
    """Extension types where the protocol wants an integer or a key, and broken timestamps
    (an extension type as data is data, relayed as sent)."""
    ext = msgpack.ExtType(5, b"payload")
    return [
        pack([ext, 1, "x"]),  # message type
        pack([1, ext, "x"]),  # seq
        pack([2, 3, ext, "x"]),  # STATE key
        pack([3, 4, ext, "x"]),  # to_actor
        event_raw(5, b"\xd4\xff\x00"),  # a timestamp of an impossible length
        event_raw(6, b"\x91\xd7\xff" + b"\xff" * 8),  # a timestamp with nanoseconds past 10**9
    ]


def unhashable_key_frames() -> list[bytes]:
    return [
        event_raw(1, b"\x81\x91\x01\x02"),  # {[1]: 2}
        event_raw(2, b"\x81\x81\x01\x02\x03"),  # {{1: 2}: 3}
        event_raw(3, b"\x91\x81\x92\x01\x02\x02"),  # [{[1, 2]: 2}]
        b"\x94\x02\x04" + b"\x81\x91\x01\x02" + b"\x01",  # STATE whose key is {[1]: 2}
        b"\x92\x09\x81\x81\xc0\xc0\xc0",  # PING {{nil: nil}: nil}
    ]


def bad_seq_type_frames() -> list[bytes]:
    """Moves whose seq is not an integer (malformed), sent where bad_seq cannot be shown."""
    return [pack([1, s, ATTACK_MARK]) for s in ("1", 1.5, None, True, [1], {"s": 1}, b"\x01")]


def too_large_frames(max_message_bytes: int) -> list[bytes]:
    big = b"x" * (max_message_bytes + 100)
    return [pack([1, 1, big]), pack([2, 2, "pos", big]), pack([3, 3, 1, big])]


def direct_frames(count: int) -> list[bytes]:
    """DIRECTs to actors that cannot be in the room (never reused, never this big, or negative)."""
    targets = [0, -1, 10**6, 2**63 - 1, 2**64 - 1, -(2**63)]
    return [pack([3, seq, targets[seq % len(targets)], ATTACK_MARK]) for seq in range(1, count + 1)]


def bad_seq_frames(count: int) -> list[bytes]:
    """One accepted move at a huge seq, then moves whose seq is not greater."""
    return [pack([1, 10**9, "first"])] + [pack([1, k, "again"]) for k in range(count)]


def cycle(frames: list[bytes], count: int) -> list[bytes]:
    return [frames[i % len(frames)] for i in range(count)]


# --- attackers that speak the protocol (badly) -----------------------------------------


@dataclass
class Outcome:
    """What one attacker saw: the close code the server gave it, and its ERRORs."""

    kind: str
    room: str
    player: str
    code: int | None = None
    errors: list[Error] = field(default_factory=list)
    other: list[Message] = field(default_factory=list)
    sent: int = 0
    note: str = ""

    def codes(self) -> set[str]:
        return {e.code for e in self.errors}


async def send_frames(
    url: str,
    room: str,
    kind: str,
    player: str,
    frames: Iterable[bytes | str],
    *,
    pace: float = 0.0,
    seconds: float = 10,
) -> Outcome:
    """Join, send ``frames`` (str: a text frame) until the server closes; read to the close."""
    outcome = Outcome(kind, room, player)
    client = await open_client(url, room, player=player, auto_resume=False)  # no resuming
    try:
        async with asyncio.timeout(timeout(seconds)):
            for frame in frames:
                if client.close_code is not None:
                    break
                try:
                    if isinstance(frame, str):
                        await client.ws.send(frame)
                    else:
                        await client.send_raw(frame)
                except websockets.ConnectionClosed:
                    break
                outcome.sent += 1
                await asyncio.sleep(pace)  # pacing, so the attack overlaps the honest game
            while True:
                try:
                    message = await client.recv()
                except RelayClosed as exc:
                    outcome.code = exc.code
                    break
                (outcome.errors if isinstance(message, Error) else outcome.other).append(message)
    except TimeoutError:
        outcome.note = "the server did not close the connection in time"
    finally:
        await client.close()
    return outcome


async def flood(
    url: str,
    room: str,
    kind: str,
    player: str,
    message: Callable[[int], bytes],
    *,
    per_frame: int,
    frames: int,
    seconds: float = 10,
) -> Outcome:
    """Many messages per frame, frame after frame, as fast as the socket takes them."""
    batches = []
    n = 0
    for _ in range(frames):
        batches.append(b"".join(message(n + i) for i in range(per_frame)))
        n += per_frame
    return await send_frames(url, room, kind, player, batches, seconds=seconds)


# --- raw sockets -----------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
             mask: bool = True, length: int | None = None) -> bytes:
    """One WebSocket frame as a client would send it (``length`` may lie about the payload)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    size = len(payload)
    mask_bytes = (key * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(mask_bytes, "big")
    return head + key + masked.to_bytes(size, "big")


def handshake(port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawSocket:
    """A TCP connection to the relay driven by hand: WebSocket frames, or half an HTTP request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, first: bytes = b"") -> RawSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        if first:
            writer.write(first)
            try:
                await writer.drain()
            except BaseException:
                await raw.close()
                raise
        return raw

    @classmethod
    async def websocket(cls, port: int, room: str, player: str, seconds: float = 5) -> RawSocket:
        """Complete a WebSocket handshake (the server's WELCOME is left unread)."""
        raw = await cls.connect(port, handshake(port, f"/ws/{room}?player={player}"))
        try:
            async with asyncio.timeout(timeout(seconds)):
                head = await raw.reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise AssertionError(f"no WebSocket upgrade: {head[:80]!r}")
        except BaseException:
            await raw.close()
            raise
        return raw

    async def send(self, data: bytes) -> bool:
        """Write bytes; False once the server has gone."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    def go_silent(self) -> None:
        """Stop reading: the kernel buffer fills and no pong is ever sent."""
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    async def read_frame(self) -> tuple[int, bytes]:
        r = self.reader
        b0, b1 = await r.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await r.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await r.readexactly(8), "big")
        if b1 & 0x80:
            await r.readexactly(4)  # a server does not mask; tolerate it anyway
        return b0 & 0x0F, await r.readexactly(n)

    async def close_code(self, seconds: float = 5) -> int | None:
        """Read frames until the server's close frame (its code) or the end of the stream (None)."""
        async with asyncio.timeout(timeout(seconds)):
            while True:
                try:
                    opcode, payload = await self.read_frame()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return None
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005

    async def closed_by_server(self, seconds: float = 5) -> bool:
        """Wait for EOF from the server (discarding whatever it sends first)."""
        async with asyncio.timeout(timeout(seconds)):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    async def close(self, *, reset: bool = False) -> None:
        """Close without a WebSocket close frame; ``reset`` sends a TCP RST instead of FIN."""
        writer = self.writer
        if reset:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Sockets:
    """Every raw socket an attack opened, closed in one place."""

    def __init__(self) -> None:
        self.open: list[RawSocket] = []

    def keep(self, raw: RawSocket) -> RawSocket:
        self.open.append(raw)
        return raw

    async def close_all(self) -> None:
        while self.open:
            await self.open.pop().close(reset=True)
