"""Relay wire protocol v1: message types, close codes, error codes and the codec.

Pure functions over bytes; no asyncio, no sockets. The contract is
``docs/protocol.md``. Two rules shape this module:

* Bytes stay bytes. A client's ``data`` is never decoded to Python objects to be
  forwarded: the decoder returns its raw msgpack slice, and the encoders splice
  that slice into the outgoing message, which is then encoded once for every
  recipient.
* Room-ordered messages (EVENT, STATE, JOIN, LEAVE) end with their room offset,
  which is only known once the backplane has put them in order. So they are
  built in two parts: a ``head`` (everything but the offset, made where the
  message enters the relay) and the offset, appended by :func:`with_offset`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
NIL = b"\xc0"

ROOM_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
MAX_KEY_BYTES = 64


class MsgType(enum.IntEnum):
    WELCOME = 0
    EVENT = 1
    STATE = 2
    DIRECT = 3
    JOIN = 5
    LEAVE = 6
    ERROR = 7
    DROPPED = 8
    PING = 9  # PONG shares the number: a client sends PING, the server answers PONG
    PONG = 9


# Looking up an enum member costs about 0.3 us in Python 3.11 (EnumType has a
# __getattr__, so the interpreter's attribute caches do not apply), ten times a
# global's: code that runs per message compares with these instead.
EVENT, STATE, DIRECT, JOIN, LEAVE = MsgType.EVENT, MsgType.STATE, MsgType.DIRECT, MsgType.JOIN, MsgType.LEAVE


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    TEXT_FRAME = 1003
    TOO_MANY_ERRORS = 1008
    FRAME_TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    AT_CAPACITY = 1013
    BAD_TOKEN = 4001
    ROOM_FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    ROOM_FULL = 4009
    RATE_LIMITED = 4029
    BAD_REQUEST = 4400
    REPLACED = 4409


class ErrorCode(enum.StrEnum):
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    BAD_TYPE = "bad_type"
    BAD_SEQ = "bad_seq"
    RATE_LIMITED = "rate_limited"
    NO_SUCH_ACTOR = "no_such_actor"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"  # the room's game rules failed on the move (relay/rules/guard.py)


# --- client to server ------------------------------------------------------------


@dataclass(slots=True)
class Event:
    seq: int
    data: bytes  # raw msgpack


@dataclass(slots=True)
class State:
    seq: int
    key: str | int
    data: bytes  # raw msgpack; NIL deletes the key


@dataclass(slots=True)
class Direct:
    seq: int
    to_actor: int
    data: bytes  # raw msgpack


@dataclass(slots=True)
class Ping:
    client_time: bytes  # raw msgpack, echoed back untouched


@dataclass(slots=True)
class Invalid:
    """A message the decoder refused; answered with ERROR and never relayed."""

    seq: int | None
    code: ErrorCode | str  # a str: a code of the game's own, from its rules (relay/rules/guard.py)
    message: str


ClientMessage = Event | State | Direct | Ping | Invalid


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass but not a valid seq or actor


class _TooDeep(Exception):
    pass


def decode_frame(frame: bytes, *, max_message_bytes: int, max_depth: int = 32) -> list[ClientMessage]:
    """Split one binary frame into client messages.

    Never raises: anything wrong becomes an :class:`Invalid`. A message whose
    structure cannot be followed (truncated, not msgpack) ends the frame, since
    the messages after it cannot be found.
    """
    if frame[:2] == b"\x93\x01":  # most frames are one EVENT, or start with one: [1, seq, data]
        first = _first_event(frame, max_message_bytes, max_depth)
        if first is not None:
            event, rest = first
            if not rest:
                return [event]
            # The whole frame's size bounds the rest's headers, as it would in one pass.
            return [event, *_decode_frame(rest, max_message_bytes, max_depth, len(frame))]
    return _decode_frame(frame, max_message_bytes, max_depth, len(frame))


# The width of a msgpack integer, by its first byte (fixints are one byte).
_INT_WIDTH = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}


def _first_event(frame: bytes, max_message_bytes: int, max_depth: int) -> tuple[Event, bytes] | None:
    """The frame's first message when it is a valid EVENT, found in one C call, and
    the bytes after it (for the general decoder); None for anything else.

    The general decoder walks a frame value by value, which costs about as much
    as the rest of a move's way through the relay. None sends the frame there, so
    every refusal keeps its exact wording.
    """
    first = frame[2] if len(frame) > 3 else 0xC1  # 0xC1: never used by msgpack
    if first < 0x80 or first >= 0xE0:
        width = 1
    else:
        width = _INT_WIDTH.get(first, 0)
        if not width:
            return None
    data = frame[2 + width :]
    rest = b""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except msgpack.ExtraData as more:  # other messages follow this one
        value, rest = more.unpacked, more.extra
        data = data[: len(data) - len(rest)]
    except Exception:  # noqa: BLE001 - truncated, not msgpack, a broken timestamp: the general path
        return None
    if len(data) > max_message_bytes:
        return None
    if (type(value) is list or type(value) is dict) and _deeper_than(value, max_depth):
        return None
    if width == 1:
        seq = first if first < 0x80 else first - 0x100
    else:
        seq = int.from_bytes(frame[3 : 2 + width], "big", signed=first >= 0xD0)
    return Event(seq, data), rest


def _decode_frame(frame: bytes, max_message_bytes: int, max_depth: int, frame_size: int) -> list[ClientMessage]:
    out: list[ClientMessage] = []
    frame = _decode_messages(frame, max_message_bytes, max_depth, frame_size, out)
    for _ in range(MAX_RESTARTS - 1):
        if not frame:
            return out
        frame = _decode_messages(frame, max_message_bytes, max_depth, frame_size, out)
    if frame:
        out.append(Invalid(None, ErrorCode.MALFORMED, "too many unreadable messages in one frame"))
    return out


def _decode_messages(
    frame: bytes, max_message_bytes: int, max_depth: int, frame_size: int, out: list[ClientMessage]
) -> bytes:
    """Decode ``frame``'s messages into ``out``; what is left of the frame to decode
    afresh after a message whose values could not be built (an unhashable map key, a
    broken timestamp): msgpack's Unpacker cannot go on after one, but the message's
    end can still be found, and the messages after it are someone's valid moves."""
    unpacker = msgpack.Unpacker(
        None,
        raw=False,
        max_buffer_size=max(frame_size, 1),
        strict_map_key=False,
    )
    unpacker.feed(frame)
    end = len(frame)
    begin = 0
    refused = sum(type(m) is Invalid for m in out)  # before a restart
    try:
        while (begin := unpacker.tell()) < end:
            message = _decode_message(unpacker, frame, max_message_bytes, max_depth)
            out.append(message)
            if type(message) is Invalid:
                refused += 1
                if refused > MAX_REFUSED:
                    why = "too many refused messages in one frame: the rest is not read"
                    out.append(Invalid(None, ErrorCode.MALFORMED, why))
                    return b""
    except _Unbuildable as exc:
        length = _length_of(frame[begin:], frame_size)
        if length is not None:
            out.append(Invalid(exc.seq, ErrorCode.MALFORMED, exc.why))
            return frame[begin + length :]
        out.append(Invalid(None, ErrorCode.MALFORMED, f"frame is not valid msgpack: {exc.why}"))
    except (msgpack.OutOfData, msgpack.StackError, msgpack.FormatError, ValueError, TypeError) as exc:
        out.append(Invalid(None, ErrorCode.MALFORMED, f"frame is not valid msgpack: {_why(exc)}"))
    return b""


# Each unreadable message costs a fresh Unpacker and a copy of the rest of the frame:
# past this many in one frame the rest is refused whole, so that a frame of tiny bad
# messages cannot cost time that grows with the square of its size.
MAX_RESTARTS = 16
# Refused messages one frame may hold before the rest of it is not read: a frame of
# 16 K one-byte messages cost 30 ms for a connection closed after max_errors anyway.
MAX_REFUSED = 32


class _Unbuildable(Exception):
    """A message whose structure is sound but whose values msgpack cannot build."""

    def __init__(self, seq: int | None, why: str) -> None:
        self.seq, self.why = seq, why


def _length_of(frame: bytes, frame_size: int) -> int | None:
    """The length of the msgpack value at the start of ``frame``; None when it is not whole."""
    unpacker = msgpack.Unpacker(None, max_buffer_size=max(frame_size, 1))
    unpacker.feed(frame)
    try:
        unpacker.skip()  # follows the structure without building values
    except (msgpack.OutOfData, msgpack.StackError, msgpack.FormatError, ValueError):
        return None
    return unpacker.tell()


def _why(exc: Exception) -> str:
    if isinstance(exc, msgpack.OutOfData):
        return "truncated message"
    if isinstance(exc, msgpack.StackError):
        return "nested too deeply"
    if isinstance(exc, TypeError):
        return UNHASHABLE_KEY
    return str(exc) or type(exc).__name__


UNHASHABLE_KEY = "map keys must be strings, numbers, booleans or nil"


def _unbuildable(exc: Exception) -> str:
    return UNHASHABLE_KEY if isinstance(exc, TypeError) else f"a value is not valid msgpack: {str(exc) or type(exc).__name__}"


def _decode_message(
    up: msgpack.Unpacker, frame: bytes, max_message_bytes: int, max_depth: int
) -> ClientMessage:
    try:
        n = up.read_array_header()
    except ValueError:
        up.skip()  # a well-formed value of the wrong kind: step over it and go on
        return Invalid(None, ErrorCode.MALFORMED, "a message must be a msgpack array")
    if n == 0:
        return Invalid(None, ErrorCode.MALFORMED, "empty message array")
    kind = _unpack(up, None)
    read = 1
    result: ClientMessage
    if not _is_int(kind):
        result = Invalid(None, ErrorCode.MALFORMED, "message type (element 0) must be an integer")
    elif kind == MsgType.PING:
        if n < 2:
            result = Invalid(None, ErrorCode.MALFORMED, "PING is [9, client_time]")
        else:
            try:
                result = Ping(_raw_next(up, frame, max_depth))
            except _TooDeep:
                result = Invalid(None, ErrorCode.MALFORMED, f"nested deeper than {max_depth}")
            except (msgpack.FormatError, msgpack.StackError):
                raise
            except (TypeError, ValueError) as exc:
                raise _Unbuildable(None, _unbuildable(exc)) from None
            read = 2
    else:
        seq = _unpack(up, None) if n >= 2 else None
        read = min(n, 2)
        if kind not in (EVENT, STATE, DIRECT):
            # Element 1 is a seq in every client message that has one: name it if it is.
            result = Invalid(seq if _is_int(seq) else None, ErrorCode.BAD_TYPE, f"unknown message type {kind!r}")
        elif not _is_int(seq):
            result = Invalid(None, ErrorCode.MALFORMED, "seq (element 1) must be an integer")
        else:
            try:
                result, read = _decode_move(kind, seq, n, up, frame, max_message_bytes, max_depth)
            except _TooDeep as exc:
                why = f"data nested deeper than max_depth ({max_depth})"
                result, read = Invalid(seq, ErrorCode.MALFORMED, why), exc.args[0]
            except (msgpack.FormatError, msgpack.StackError):
                raise
            except (TypeError, ValueError) as exc:
                raise _Unbuildable(seq, _unbuildable(exc)) from None
    # Trailing elements we do not know are ignored, as the protocol says. Each
    # skip consumes at least a byte, so a lying length header ends at OutOfData.
    for _ in range(n - read):
        up.skip()
    if type(result) is Ping and len(result.client_time) > max_message_bytes:
        return Invalid(None, ErrorCode.TOO_LARGE, "PING client_time is too large")
    return result


def _unpack(up: msgpack.Unpacker, seq: int | None) -> Any:
    try:
        return up.unpack()
    except (msgpack.FormatError, msgpack.StackError):
        raise  # the structure itself is broken: the frame ends here
    except (TypeError, ValueError) as exc:
        raise _Unbuildable(seq, _unbuildable(exc)) from None


def _raw_next(up: msgpack.Unpacker, frame: bytes, max_depth: int, fields_read: int = 0) -> bytes:
    """The next value's raw bytes.

    Unpacked, not skipped: skip() would let a broken timestamp through (relayed, it
    would be unreadable by every receiver), and the depth is checked. The objects live only until this returns, and decoding is
    synchronous, so the memory a frame can make the server allocate is a
    bounded, short-lived multiple of ``max_frame_bytes`` for the whole process.
    """
    begin = up.tell()
    value = up.unpack()
    if (type(value) is list or type(value) is dict) and _deeper_than(value, max_depth):
        raise _TooDeep(fields_read)
    return frame[begin : up.tell()]


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and maps nest more than ``limit`` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item if type(item) is list else item.values()
        for child in children:
            if type(child) is list or type(child) is dict:
                stack.append((child, depth + 1))
    return False


def _decode_move(
    kind: int,
    seq: int,
    n: int,
    up: msgpack.Unpacker,
    frame: bytes,
    max_message_bytes: int,
    max_depth: int,
) -> tuple[ClientMessage, int]:
    if kind == EVENT:
        if n < 3:
            return Invalid(seq, ErrorCode.MALFORMED, "EVENT is [1, seq, data]"), 2
        data = _raw_next(up, frame, max_depth, 3)
        if len(data) > max_message_bytes:
            return Invalid(seq, ErrorCode.TOO_LARGE, _too_large(len(data), max_message_bytes)), 3
        return Event(seq, data), 3
    if kind == STATE:
        if n < 4:
            return Invalid(seq, ErrorCode.MALFORMED, "STATE is [2, seq, key, data]"), 2
        key = up.unpack()
        data = _raw_next(up, frame, max_depth, 4)
        problem = _key_problem(key)
        if problem:
            return Invalid(seq, ErrorCode.MALFORMED, problem), 4
        if len(data) > max_message_bytes:
            return Invalid(seq, ErrorCode.TOO_LARGE, _too_large(len(data), max_message_bytes)), 4
        return State(seq, key, data), 4
    if n < 4:
        return Invalid(seq, ErrorCode.MALFORMED, "DIRECT is [3, seq, to_actor, data]"), 2
    to_actor = up.unpack()
    data = _raw_next(up, frame, max_depth, 4)
    if not _is_int(to_actor):
        return Invalid(seq, ErrorCode.MALFORMED, "DIRECT to_actor must be an integer"), 4
    if len(data) > max_message_bytes:
        return Invalid(seq, ErrorCode.TOO_LARGE, _too_large(len(data), max_message_bytes)), 4
    return Direct(seq, to_actor, data), 4


def _key_problem(key: Any) -> str | None:
    if _is_int(key):
        return None if -(2**63) <= key < 2**64 else "STATE key integer out of range"
    if isinstance(key, str):
        if len(key.encode()) > MAX_KEY_BYTES:
            return f"STATE key longer than {MAX_KEY_BYTES} bytes"
        return None
    return "STATE key must be a string or an integer"


def _too_large(size: int, limit: int) -> str:
    return f"data is {size} bytes, more than max_message_bytes ({limit})"


# --- server to client ------------------------------------------------------------

_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def pack(value: Any) -> bytes:
    return _pack(value)


def with_offset(head: bytes, offset: int) -> bytes:
    """Complete a room-ordered message: its head followed by its room offset."""
    return head + _pack(offset)


def event_head(actor: int, seq: int, data: bytes) -> bytes:
    return b"\x95\x01" + _pack(actor) + _pack(seq) + data


def state_head(actor: int, key: str | int, data: bytes) -> bytes:
    return b"\x95\x02" + _pack(actor) + _pack(key) + data


def join_head(actor: int, player: str, meta: dict[str, Any]) -> bytes:
    return b"\x95\x05" + _pack(actor) + _pack(player) + _pack(meta)


def leave_head(actor: int, close_code: int) -> bytes:
    return b"\x94\x06" + _pack(actor) + _pack(close_code)


def direct(from_actor: int, seq: int, data: bytes) -> bytes:
    return b"\x94\x03" + _pack(from_actor) + _pack(seq) + data


def error(ref_seq: int | None, code: ErrorCode | str, message: str) -> bytes:
    return _pack([MsgType.ERROR.value, ref_seq, str(code), message])


def dropped(count: int) -> bytes:
    return _pack([MsgType.DROPPED.value, count])


def pong(client_time: bytes, server_time_ms: int) -> bytes:
    return b"\x93\x09" + client_time + _pack(server_time_ms)


def welcome(
    *,
    actor: int,
    room: str,
    members: list[tuple[int, str, dict[str, Any]]],
    snapshot: dict[int, dict[str | int, bytes]],
    server_time_ms: int,
    limits: dict[str, int],
    offset: int,
    epoch: str,
    resume_token: str,
    last_seq: int | None,
) -> bytes:
    """WELCOME; ``snapshot`` values are raw msgpack, spliced in without decoding."""
    return b"".join(
        (
            b"\x9c\x00\x01",
            _pack(actor),
            _pack(room),
            _pack([list(m) for m in members]),
            encode_snapshot(snapshot),
            _pack(server_time_ms),
            _pack(limits),
            _pack(offset),
            _pack(epoch),
            _pack(resume_token),
            _pack(last_seq),
        )
    )


def encode_snapshot(snapshot: dict[int, dict[str | int, bytes]]) -> bytes:
    parts = [_map_header(len(snapshot))]
    for actor, values in snapshot.items():
        parts.append(_pack(actor))
        parts.append(_map_header(len(values)))
        for key, raw in values.items():
            parts.append(_pack(key))
            parts.append(raw)
    return b"".join(parts)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")
