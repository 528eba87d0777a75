"""relay.protocol: the codec, checked with literal bytes and with a standard msgpack decoder.

Client messages go in as the bytes a client would put on the wire; server messages
come out of the encoders and are read back with ``msgpack.Unpacker`` exactly as a
client would, then compared with the shapes in the protocol's tables.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import protocol
from relay.protocol import (
    CloseCode,
    Direct,
    ErrorCode,
    Event,
    Invalid,
    MsgType,
    Ping,
    State,
    decode_frame,
)

MAX = 8192
CLIENT_CLASSES = (Event, State, Direct, Ping, Invalid)

# Fast and reproducible: the same examples on every run (no flaky CI), no example database.
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def decode(frame: bytes, max_message_bytes: int = MAX) -> list[Any]:
    return decode_frame(frame, max_message_bytes=max_message_bytes)


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack_all(frame: bytes) -> list[Any]:
    """Read a server frame the way a client does: a streaming unpacker."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    return list(unpacker)


def unpack_one(wire: bytes) -> Any:
    [message] = unpack_all(wire)
    return message


def malformed_frame(result: list[Any]) -> None:
    """The frame ends in one Invalid: malformed, with no seq to refer to."""
    assert isinstance(result[-1], Invalid)
    assert result[-1].code is ErrorCode.MALFORMED
    assert result[-1].seq is None


# --- the protocol's numbers -------------------------------------------------------


def test_message_type_numbers_match_the_protocol_tables() -> None:
    assert protocol.PROTOCOL_VERSION == 1
    assert {t.name: t.value for t in MsgType} == {
        "WELCOME": 0,
        "EVENT": 1,
        "STATE": 2,
        "DIRECT": 3,
        "JOIN": 5,
        "LEAVE": 6,
        "ERROR": 7,
        "DROPPED": 8,
        "PING": 9,
    }
    assert MsgType.PONG is MsgType.PING


def test_close_codes_match_the_protocol_table() -> None:
    assert sorted(c.value for c in CloseCode) == [
        1000, 1001, 1003, 1008, 1009, 1011, 1013, 4001, 4003, 4008, 4009, 4029, 4400, 4409,
    ]
    assert CloseCode.TOO_MANY_ERRORS == 1008
    assert CloseCode.RATE_LIMITED == 4029
    assert CloseCode.SLOW_CONSUMER == 4008


def test_error_codes_are_the_documented_strings() -> None:
    documented = {
        "too_large", "malformed", "bad_type", "bad_seq", "rate_limited", "no_such_actor", "rejected",
    }
    assert documented <= {c.value for c in ErrorCode}


@pytest.mark.parametrize(
    "room, ok",
    [("a", True), ("grid:lobby-7", True), ("A.b_c:d-9", True), ("x" * 64, True),
     ("", False), ("x" * 65, False), ("has space", False), ("sl/ash", False), ("é", False)],
)
def test_room_id_pattern(room: str, ok: bool) -> None:
    assert (protocol.ROOM_ID.fullmatch(room) is not None) is ok


# --- decode_frame: valid client messages -----------------------------------------


def test_event_from_literal_bytes() -> None:
    assert decode(b"\x93\x01\x05\xa2hi") == [Event(5, b"\xa2hi")]


def test_state_from_literal_bytes() -> None:
    # [2, 7, "pos", [1, 2]]
    assert decode(b"\x94\x02\x07\xa3pos\x92\x01\x02") == [State(7, "pos", b"\x92\x01\x02")]


def test_state_with_integer_key_and_nil_data() -> None:
    # [2, 8, 3, nil]: nil data deletes the key
    assert decode(b"\x94\x02\x08\x03\xc0") == [State(8, 3, protocol.NIL)]


def test_direct_from_literal_bytes() -> None:
    # [3, 9, 2, {"a": 1}]
    assert decode(b"\x94\x03\x09\x02\x81\xa1a\x01") == [Direct(9, 2, b"\x81\xa1a\x01")]


def test_ping_keeps_client_time_raw() -> None:
    # [9, 1.5] with a float64 client time
    raw = b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00"
    assert decode(b"\x92\x09" + raw) == [Ping(raw)]


def test_data_is_the_exact_slice_of_the_frame() -> None:
    data = packb({"move": "e4", "t": [1, 2.5, None, b"\x00\xff"]})
    [event] = decode(b"\x93\x01\x2a" + data)
    assert event == Event(42, data)
    assert msgpack.unpackb(event.data, raw=False) == {"move": "e4", "t": [1, 2.5, None, b"\x00\xff"]}


def test_several_messages_in_one_frame() -> None:
    frame = b"\x93\x01\x01\xa1a" + b"\x94\x02\x02\xa1k\x05" + b"\x94\x03\x03\x04\xc3" + b"\x92\x09\x00"
    assert decode(frame) == [
        Event(1, b"\xa1a"),
        State(2, "k", b"\x05"),
        Direct(3, 4, b"\xc3"),
        Ping(b"\x00"),
    ]


def test_trailing_unknown_elements_are_ignored() -> None:
    # [1, 1, "a", "future", {}] then [9, 0, 0] then a normal EVENT
    frame = b"\x95\x01\x01\xa1a\xa6future\x80" + b"\x93\x09\x00\x00" + b"\x93\x01\x02\xa1b"
    assert decode(frame) == [Event(1, b"\xa1a"), Ping(b"\x00"), Event(2, b"\xa1b")]


def test_trailing_elements_on_state_and_direct_are_ignored() -> None:
    frame = packb([2, 1, "k", 1, "extra"]) + packb([3, 2, 5, 1, [1, 2], None])
    assert decode(frame) == [State(1, "k", b"\x01"), Direct(2, 5, b"\x01")]


def test_extreme_integers_are_valid_seq_and_keys() -> None:
    messages = [[1, 2**64 - 1, 0], [1, -(2**63), 0], [2, 1, 2**64 - 1, 0], [2, 2, -(2**63), 0]]
    frame = b"".join(packb(m) for m in messages)
    assert decode(frame) == [
        Event(2**64 - 1, b"\x00"),
        Event(-(2**63), b"\x00"),
        State(1, 2**64 - 1, b"\x00"),
        State(2, -(2**63), b"\x00"),
    ]


def test_state_key_of_exactly_64_bytes_is_accepted() -> None:
    key = "é" * 32  # 64 bytes of UTF-8, 32 characters
    assert decode(packb([2, 1, key, 0])) == [State(1, key, b"\x00")]


def test_empty_frame_has_no_messages() -> None:
    assert decode(b"") == []


# --- decode_frame: messages the relay refuses ------------------------------------


def test_unknown_type_is_bad_type_and_names_its_seq() -> None:
    [invalid] = decode(b"\x93\x04\x01\xc0")
    assert isinstance(invalid, Invalid)
    assert invalid.code is ErrorCode.BAD_TYPE
    assert invalid.seq == 1  # element 1, the seq of every client message that has one


@pytest.mark.parametrize("frame", [packb([4]), packb([4, "one"]), packb([4, 1.5, 2]), packb([4, True])])
def test_unknown_type_without_an_integer_seq_refers_to_none(frame: bytes) -> None:
    [invalid] = decode(frame)
    assert isinstance(invalid, Invalid) and invalid.code is ErrorCode.BAD_TYPE
    assert invalid.seq is None


@pytest.mark.parametrize("kind", [0, 4, 5, 6, 7, 8, 10, 127, -1, 2**64 - 1])
def test_server_only_and_unknown_types_are_bad_type(kind: int) -> None:
    [invalid] = decode(packb([kind, 1, 2, 3]))
    assert isinstance(invalid, Invalid) and invalid.code is ErrorCode.BAD_TYPE


@pytest.mark.parametrize(
    "frame, why",
    [
        (b"\xa5hello", "a string, not an array"),
        (b"\x01", "an integer, not an array"),
        (b"\x81\x01\x02", "a map, not an array"),
        (b"\xc0", "nil"),
        (b"\x90", "an empty array"),
        (b"\x93\xa1\x01\x01\x01", "type is a string"),
        (b"\x93\xc3\x01\x01", "type is a bool"),
        (b"\x93\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\x01\x01", "type is a float"),
        (b"\x91\x01", "EVENT without seq"),
        (b"\x93\x01\xc3\x01", "bool as seq"),
        (b"\x93\x01\xc2\x01", "false as seq"),
        (b"\x93\x01\xa1\x31\x01", "string as seq"),
        (b"\x93\x01\xc0\x01", "nil as seq"),
        (b"\x93\x01\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\x01", "float as seq"),
        (b"\x91\x09", "PING without client_time"),
    ],
)
def test_malformed_without_a_seq(frame: bytes, why: str) -> None:
    [invalid] = decode(frame)
    assert isinstance(invalid, Invalid), why
    assert invalid.code is ErrorCode.MALFORMED, why
    assert invalid.seq is None, why


@pytest.mark.parametrize(
    "frame, why",
    [
        (b"\x92\x01\x05", "EVENT without data"),
        (b"\x93\x02\x05\xa1k", "STATE without data"),
        (b"\x92\x02\x05", "STATE without key"),
        (b"\x93\x03\x05\x02", "DIRECT without data"),
        (b"\x94\x02\x05\xc0\x01", "nil STATE key"),
        (b"\x94\x02\x05\xc3\x01", "bool STATE key"),
        (b"\x94\x02\x05\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\x01", "float STATE key"),
        (b"\x94\x02\x05\xc4\x01k\x01", "bin STATE key"),
        (b"\x94\x02\x05\x91\x01\x01", "array STATE key"),
        (b"\x94\x02\x05\x81\xa1k\x01\x01", "map STATE key"),
        (b"\x94\x02\x05\xd9\x41" + b"k" * 65 + b"\x01", "65-byte STATE key"),
        (b"\x94\x03\x05\xa1\x32\x01", "string to_actor"),
        (b"\x94\x03\x05\xc3\x01", "bool to_actor"),
        (b"\x94\x03\x05\xc0\x01", "nil to_actor"),
        (b"\x94\x03\x05\xcb\x40\x00\x00\x00\x00\x00\x00\x00\x01", "float to_actor"),
    ],
)
def test_malformed_with_the_message_seq(frame: bytes, why: str) -> None:
    [invalid] = decode(frame)
    assert isinstance(invalid, Invalid), why
    assert invalid.code is ErrorCode.MALFORMED, why
    assert invalid.seq == 5, why


def test_state_key_length_is_counted_in_utf8_bytes() -> None:
    key = "é" * 33  # 33 characters, 66 bytes
    [invalid] = decode(packb([2, 4, key, 0]))
    assert isinstance(invalid, Invalid)
    assert (invalid.seq, invalid.code) == (4, ErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "frame, why",
    [
        (b"\x93\x01\x05", "truncated: data missing from a 3-element array"),
        (b"\x93\x01\x05\xa5hi", "truncated inside a string"),
        (b"\x93", "only an array header"),
        (b"\xc1", "0xc1 is never valid msgpack"),
        (b"\x93\x01\x05\xc1", "0xc1 as data"),
        (b"\x91" * 5000 + b"\xc0", "nested 5000 deep"),
        (b"\x93\x01\x05" + b"\x91" * 5000 + b"\xc0", "data nested 5000 deep"),
        (b"\xdd\xff\xff\xff\xff", "array32 header claiming 4G elements"),
        (b"\xdc\xff\xff", "array16 header claiming 65535 elements"),
        (b"\xdb\xff\xff\xff\xff", "str32 header claiming 4 GB"),
        (b"\xc6\xff\xff\xff\xff", "bin32 header claiming 4 GB"),
        (b"\x93\x01\x05\xdb\xff\xff\xff\xff", "data claiming 4 GB"),
        (b"\x93\x01\x05\xdd\xff\xff\xff\xff", "data array claiming 4G elements"),
        (b"\x93\x01\x05\xdf\xff\xff\xff\xff", "data map claiming 4G pairs"),
        (b"\x92\xa1\x01" + b"\x93\x01\x05\xa1\xff", "invalid UTF-8 in a string"),
    ],
)
def test_undecodable_frames_give_malformed_without_seq(frame: bytes, why: str) -> None:
    result = decode(frame)
    assert all(isinstance(m, CLIENT_CLASSES) for m in result), why
    malformed_frame(result)
    assert len(result) <= 2, why


def test_ext_type_as_a_whole_message_is_malformed() -> None:
    # fixext1 type 1: a well-formed value that is not an array, so it is stepped over
    assert decode(b"\xd4\x01\x00" + b"\x93\x01\x05\x01") == [
        Invalid(None, ErrorCode.MALFORMED, "a message must be a msgpack array"),
        Event(5, b"\x01"),
    ]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"\x93\x01\x05\xd4\x01\x00", Event(5, b"\xd4\x01\x00")),
        (b"\x93\x01\x0b\xc7\x03\x05abc", Event(11, b"\xc7\x03\x05abc")),
        (b"\x94\x02\x05\xa1k\xd4\x01\x00", State(5, "k", b"\xd4\x01\x00")),
        (b"\x94\x03\x05\x02\xd4\x01\x00", Direct(5, 2, b"\xd4\x01\x00")),
        (b"\x93\x01\x05\x91\xd4\x01\x00", Event(5, b"\x91\xd4\x01\x00")),
        (b"\x93\x01\x05\xd6\xff\x00\x00\x00\x01", Event(5, b"\xd6\xff\x00\x00\x00\x01")),
        (b"\x92\x09\xd4\x01\x00", Ping(b"\xd4\x01\x00")),
    ],
    ids=["event", "ext8", "state", "direct", "nested", "timestamp", "ping"],
)
def test_ext_types_in_data_are_data_relayed_as_sent(frame: bytes, expected: Any) -> None:
    # The protocol: data is any msgpack value the game chooses.
    assert decode(frame) == [expected]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b"\x91\xd4\x01\x00", Invalid(None, ErrorCode.MALFORMED, "message type (element 0) must be an integer")),
        (b"\x93\x01\xc7\x01\x05\x00\x00", Invalid(None, ErrorCode.MALFORMED, "seq (element 1) must be an integer")),
        (b"\x94\x02\x05\xd5\x07\x00\x00\x01", Invalid(5, ErrorCode.MALFORMED, "STATE key must be a string or an integer")),
        (b"\x94\x03\x05\xd4\x02\x00\x01", Invalid(5, ErrorCode.MALFORMED, "DIRECT to_actor must be an integer")),
    ],
    ids=["type", "seq", "key", "to_actor"],
)
def test_ext_type_where_the_protocol_wants_an_integer_or_key_is_malformed(frame: bytes, expected: Invalid) -> None:
    assert decode(frame) == [expected]


def test_why_a_broken_timestamp_in_data_must_be_refused() -> None:
    # Relayed as is, a bad timestamp ext would be unreadable by every receiver.
    wire = protocol.with_offset(protocol.event_head(1, 5, b"\xd4\xff\x00"), 1)
    with pytest.raises(ValueError):
        unpack_all(wire)


def test_ext_type_in_ignored_trailing_elements_is_just_skipped() -> None:
    assert decode(b"\x94\x01\x05\x01\xd4\x01\x00") == [Event(5, b"\x01")]


@pytest.mark.parametrize(
    "frame",
    [
        b"\x91\x81\x91\x01\x02",  # [{[1]: 2}] as the message type
        b"\x93\x01\x81\x80\x01\x00",  # [1, {{}: 1}, 0] as seq
        b"\x94\x02\x01\x81\x90\xc0\x00",  # [2, 1, {[]: nil}, 0] as STATE key
        b"\x94\x03\x01\x81\x90\xc0\x00",  # [3, 1, {[]: nil}, 0] as to_actor
    ],
    ids=["type", "seq", "key", "to_actor"],
)
def test_unhashable_map_keys_do_not_raise(frame: bytes) -> None:
    result = decode(frame)
    [invalid] = result
    assert isinstance(invalid, Invalid) and invalid.code is ErrorCode.MALFORMED


def test_unhashable_map_key_inside_data_is_malformed() -> None:
    # receivers could not decode it either (msgpack.Unpacker raises TypeError)
    result = decode(b"\x93\x01\x05\x81\x91\x01\x02")
    assert result == [Invalid(5, ErrorCode.MALFORMED, "map keys must be strings, numbers, booleans or nil")]
    with pytest.raises(TypeError):
        unpack_all(b"\x81\x91\x01\x02")


def test_non_string_map_keys_in_data_are_fine() -> None:
    data = packb({1: "a", None: 2, 2.5: 3, -5: [{"x": 1}]})
    assert decode(b"\x93\x01\x05" + data) == [Event(5, data)]


# --- decode_frame: nesting ---------------------------------------------------------


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "message, seq",
    [([1, 5, None], 5), ([2, 5, "k", None], 5), ([3, 5, 2, None], 5), ([9, None], None)],
    ids=["EVENT", "STATE", "DIRECT", "PING"],
)
def test_data_nested_deeper_than_max_depth_is_malformed(message: list[Any], seq: int | None) -> None:
    ok, deep = list(message), list(message)
    ok[-1], deep[-1] = nested(4), nested(5)
    [accepted] = decode_frame(packb(ok), max_message_bytes=MAX, max_depth=4)
    assert not isinstance(accepted, Invalid)
    result = decode_frame(packb(deep) + GOOD_2, max_message_bytes=MAX, max_depth=4)
    assert len(result) == 2 and result[1] == Event(2, b"\xa1b")  # skippable: the next one is kept
    assert isinstance(result[0], Invalid)
    assert (result[0].seq, result[0].code) == (seq, ErrorCode.MALFORMED)


def test_maps_count_as_nesting_too() -> None:
    frame = packb([1, 5, {"a": [{"b": 1}]}])  # map, array, map: depth 3
    assert decode_frame(frame, max_message_bytes=MAX, max_depth=3) == [Event(5, frame[3:])]
    [invalid] = decode_frame(frame, max_message_bytes=MAX, max_depth=2)
    assert isinstance(invalid, Invalid) and (invalid.seq, invalid.code) == (5, ErrorCode.MALFORMED)


def test_default_max_depth_is_32() -> None:
    assert isinstance(decode(packb([1, 5, nested(32)]))[0], Event)
    assert isinstance(decode(packb([1, 5, nested(33)]))[0], Invalid)


# --- decode_frame: too large ------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        [1, 11, "x" * 100],
        [2, 11, "k", "x" * 100],
        [3, 11, 2, "x" * 100],
    ],
    ids=["EVENT", "STATE", "DIRECT"],
)
def test_data_larger_than_max_message_bytes_is_too_large_with_its_seq(message: list[Any]) -> None:
    [invalid] = decode(packb(message), max_message_bytes=100)  # data is 102 bytes
    assert isinstance(invalid, Invalid)
    assert (invalid.seq, invalid.code) == (11, ErrorCode.TOO_LARGE)


@pytest.mark.parametrize(
    "message",
    [[1, 2**64 - 1, "x" * 98], [3, 2**64 - 1, 2**64 - 1, "x" * 98], [2, 2**64 - 1, 2**64 - 1, "x" * 98]],
    ids=["EVENT", "DIRECT", "STATE-int-key"],
)
def test_data_of_exactly_max_message_bytes_is_accepted(message: list[Any]) -> None:
    [ok] = decode(packb(message), max_message_bytes=100)  # data is 100 bytes
    assert isinstance(ok, (Event, State, Direct))
    assert ok.data == packb("x" * 98)


def test_state_with_64_byte_key_and_data_of_exactly_max_message_bytes_is_accepted() -> None:
    message = [2, 1, "k" * 64, "x" * 98]  # data is 100 bytes, the key the longest allowed
    assert decode(packb(message), max_message_bytes=100) == [State(1, "k" * 64, packb("x" * 98))]


def test_only_data_counts_against_max_message_bytes() -> None:
    # trailing elements are ignored, whatever their size (the frame limit bounds them)
    [event] = decode(packb([1, 3, "ok", "t" * 500]), max_message_bytes=100)
    assert event == Event(3, packb("ok"))


def test_too_large_message_does_not_hide_the_next_one() -> None:
    frame = packb([1, 1, "x" * 200]) + packb([1, 2, "ok"])
    result = decode(frame, max_message_bytes=100)
    assert [type(m) for m in result] == [Invalid, Event]
    assert (result[0].seq, result[0].code) == (1, ErrorCode.TOO_LARGE)
    assert result[1] == Event(2, packb("ok"))


def test_huge_ping_is_too_large() -> None:
    [invalid] = decode(packb([9, "x" * 300]), max_message_bytes=100)
    assert isinstance(invalid, Invalid) and invalid.code is ErrorCode.TOO_LARGE


# --- decode_frame: a bad message among good ones ---------------------------------


GOOD_1 = b"\x93\x01\x01\xa1a"
GOOD_2 = b"\x93\x01\x02\xa1b"


@pytest.mark.parametrize(
    "bad, code",
    [
        (b"\x93\x04\x01\xc0", ErrorCode.BAD_TYPE),
        (b"\xa3abc", ErrorCode.MALFORMED),
        (b"\x90", ErrorCode.MALFORMED),
        (b"\x93\x01\xc3\x00", ErrorCode.MALFORMED),
        (b"\x94\x02\x07\xc3\x00", ErrorCode.MALFORMED),
        (b"\x94\x03\x07\xa1x\x00", ErrorCode.MALFORMED),
        (b"\x92\x01\x07", ErrorCode.MALFORMED),
        (b"\xd4\x01\x00", ErrorCode.MALFORMED),
        (b"\x93\x01\x05\x81\x91\x01\x02", ErrorCode.MALFORMED),  # data {[1]: 2}
        (b"\x93\x01\x05\xd4\xff\x00", ErrorCode.MALFORMED),  # data: a timestamp of an impossible length
        (b"\x93\x01\x05\xa1\xff", ErrorCode.MALFORMED),  # data: a string that is not UTF-8
        (b"\x94\x02\x05\x81\x81\x01\x02\x03\x01", ErrorCode.MALFORMED),  # STATE key {{1: 2}: 3}
        (b"\x92\x09\x81\x81\xc0\xc0\xc0", ErrorCode.MALFORMED),  # PING {{nil: nil}: nil}
        (b"\x91\x81\x91\x01\x02", ErrorCode.MALFORMED),  # [{[1]: 2}] as the type
    ],
)
def test_skippable_bad_message_hides_nothing(bad: bytes, code: ErrorCode) -> None:
    result = decode(GOOD_1 + bad + GOOD_2)
    assert len(result) == 3
    assert result[0] == Event(1, b"\xa1a")
    assert isinstance(result[1], Invalid) and result[1].code is code
    assert result[2] == Event(2, b"\xa1b")


@pytest.mark.parametrize(
    "bad",
    [b"\xc1", b"\x93\x01\x05", b"\x91" * 5000 + b"\xc0", b"\xdd\xff\xff\xff\xff", b"\x93\x01\x05\x81\x91\x01"],
    ids=["0xc1", "truncated", "deep", "huge-header", "truncated-unhashable"],
)
def test_unskippable_bad_message_keeps_the_messages_before_it(bad: bytes) -> None:
    result = decode(GOOD_1 + GOOD_2 + bad)
    assert result[:2] == [Event(1, b"\xa1a"), Event(2, b"\xa1b")]
    assert len(result) == 3
    malformed_frame(result)


def test_an_unreadable_value_names_its_message_seq() -> None:
    [_, invalid, _] = decode(GOOD_1 + b"\x93\x01\x07\xd4\xff\x00" + GOOD_2)
    assert invalid.seq == 7 and "timestamp" in invalid.message


def test_a_frame_of_unreadable_messages_is_refused_after_a_bound() -> None:
    # Each one costs a fresh Unpacker: past MAX_RESTARTS the rest is refused whole.
    bad = b"\x93\x01\x05\x81\x91\x01\x02"
    result = decode(bad * 1000 + GOOD_1)
    assert len(result) == protocol.MAX_RESTARTS + 1
    assert all(r == Invalid(5, ErrorCode.MALFORMED, protocol.UNHASHABLE_KEY) for r in result[:-1])
    malformed_frame(result)
    assert decode(bad * (protocol.MAX_RESTARTS - 1) + GOOD_1)[-1] == Event(1, b"\xa1a")
    assert decode(bad * protocol.MAX_RESTARTS)[-1] == Invalid(5, ErrorCode.MALFORMED, protocol.UNHASHABLE_KEY)


def test_many_trailing_elements_are_ignored_too() -> None:
    long_event = packb([1, 5, "x"] + [None] * 100)  # 103 elements
    assert decode(GOOD_1 + long_event + GOOD_2) == [Event(1, b"\xa1a"), Event(5, b"\xa1x"), Event(2, b"\xa1b")]


# --- encoders: server messages as a client reads them ----------------------------


def test_event_is_head_plus_offset() -> None:
    head = protocol.event_head(3, 17, b"\xa2hi")
    assert head == b"\x95\x01\x03\x11\xa2hi"
    wire = protocol.with_offset(head, 1000)
    assert wire == head + b"\xcd\x03\xe8"
    assert unpack_one(wire) == [1, 3, 17, "hi", 1000]


def test_event_with_large_numbers() -> None:
    data = packb({"k": [1, 2]})
    wire = protocol.with_offset(protocol.event_head(70000, 2**64 - 1, data), 2**40)
    assert unpack_one(wire) == [1, 70000, 2**64 - 1, {"k": [1, 2]}, 2**40]


def test_state_is_head_plus_offset() -> None:
    wire = protocol.with_offset(protocol.state_head(2, "pos", b"\x92\x01\x02"), 5)
    assert wire == b"\x95\x02\x02\xa3pos\x92\x01\x02\x05"
    assert unpack_one(wire) == [2, 2, "pos", [1, 2], 5]
    assert unpack_one(protocol.with_offset(protocol.state_head(2, 9, protocol.NIL), 6)) == [2, 2, 9, None, 6]


def test_join_is_head_plus_offset() -> None:
    wire = protocol.with_offset(protocol.join_head(4, "bob", {"name": "Bob"}), 12)
    assert unpack_one(wire) == [5, 4, "bob", {"name": "Bob"}, 12]


def test_leave_is_head_plus_offset() -> None:
    wire = protocol.with_offset(protocol.leave_head(4, 1000), 13)
    assert wire == b"\x94\x06\x04\xcd\x03\xe8\x0d"
    assert unpack_one(wire) == [6, 4, 1000, 13]


def test_direct_has_no_offset() -> None:
    wire = protocol.direct(2, 44, b"\x81\xa1a\x01")
    assert wire == b"\x94\x03\x02\x2c\x81\xa1a\x01"
    assert unpack_one(wire) == [3, 2, 44, {"a": 1}]


def test_error() -> None:
    assert unpack_one(protocol.error(7, ErrorCode.BAD_SEQ, "seq 7 is not greater than 9")) == [
        7, 7, "bad_seq", "seq 7 is not greater than 9",
    ]
    assert unpack_one(protocol.error(None, ErrorCode.MALFORMED, "no")) == [7, None, "malformed", "no"]


def test_dropped() -> None:
    assert protocol.dropped(3) == b"\x92\x08\x03"
    assert unpack_one(protocol.dropped(100000)) == [8, 100000]


def test_pong_echoes_client_time_untouched() -> None:
    [ping] = decode(b"\x92\x09\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00")
    wire = protocol.pong(ping.client_time, 1_700_000_000_123)
    assert wire.startswith(b"\x93\x09\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00")
    assert unpack_one(wire) == [9, 1.5, 1_700_000_000_123]


def test_pong_with_any_client_time() -> None:
    client_time = packb({"t": [1, "x"]})
    assert unpack_one(protocol.pong(client_time, 5)) == [9, {"t": [1, "x"]}, 5]


def welcome(**overrides: Any) -> bytes:
    fields: dict[str, Any] = dict(
        actor=2,
        room="grid:lobby-7",
        members=[(1, "ann", {}), (2, "bob", {"name": "Bob"})],
        snapshot={1: {"pos": b"\x92\x01\x02", 7: b"\xc3"}},
        server_time_ms=1_700_000_000_000,
        limits={"max_frame_bytes": 16384, "max_msgs_per_s": 120.0},
        offset=42,
        epoch="abc123",
        resume_token="tok",
        last_seq=None,
    )
    fields.update(overrides)
    return protocol.welcome(**fields)


def test_welcome_has_the_twelve_fields() -> None:
    message = unpack_one(welcome())
    assert len(message) == 12
    assert message == [
        0,
        1,
        2,
        "grid:lobby-7",
        [[1, "ann", {}], [2, "bob", {"name": "Bob"}]],
        {1: {"pos": [1, 2], 7: True}},
        1_700_000_000_000,
        {"max_frame_bytes": 16384, "max_msgs_per_s": 120.0},
        42,
        "abc123",
        "tok",
        None,
    ]


def test_welcome_last_seq_and_empty_room() -> None:
    message = unpack_one(welcome(members=[(1, "ann", {})], snapshot={}, last_seq=99))
    assert message[4] == [[1, "ann", {}]]
    assert message[5] == {}
    assert message[11] == 99


@pytest.mark.parametrize("n", [15, 16, 300])
def test_welcome_snapshot_of_many_actors_and_keys(n: int) -> None:
    # 15 fits a fixmap header, 16 and more need map16
    snapshot = {actor: {f"k{i}": packb(i) for i in range(n)} for actor in range(1, n + 1)}
    message = unpack_one(welcome(snapshot=snapshot))
    assert message[5] == {actor: {f"k{i}": i for i in range(n)} for actor in range(1, n + 1)}
    assert message[8:] == [42, "abc123", "tok", None]


def test_encode_snapshot_with_map32_header() -> None:
    snapshot = {1: {i: b"\xc0" for i in range(70000)}}
    assert unpack_one(protocol.encode_snapshot(snapshot)) == {1: {i: None for i in range(70000)}}


def test_server_frame_of_many_messages_reads_back_in_order() -> None:
    frame = b"".join(
        (
            protocol.dropped(2),
            protocol.with_offset(protocol.event_head(1, 1, b"\x01"), 10),
            protocol.with_offset(protocol.state_head(1, "k", b"\x02"), 11),
            protocol.with_offset(protocol.join_head(3, "cy", {}), 12),
            protocol.with_offset(protocol.leave_head(3, 1001), 13),
            protocol.direct(1, 2, b"\x03"),
            protocol.pong(b"\x04", 5),
            protocol.error(9, ErrorCode.RATE_LIMITED, "slow down"),
        )
    )
    assert unpack_all(frame) == [
        [8, 2],
        [1, 1, 1, 1, 10],
        [2, 1, "k", 2, 11],
        [5, 3, "cy", {}, 12],
        [6, 3, 1001, 13],
        [3, 1, 2, 3],
        [9, 4, 5],
        [7, 9, "rate_limited", "slow down"],
    ]


# --- properties -------------------------------------------------------------------


def check_decoded(result: list[Any]) -> None:
    assert isinstance(result, list)
    for message in result:
        assert type(message) in CLIENT_CLASSES
        if isinstance(message, Invalid):
            assert isinstance(message.code, ErrorCode)
            assert message.seq is None or type(message.seq) is int
            assert isinstance(message.message, str) and message.message
        elif isinstance(message, Ping):
            assert isinstance(message.client_time, bytes)
        else:
            assert type(message.seq) is int
            assert isinstance(message.data, bytes) and message.data
            assert len(message.data) <= MAX
            if isinstance(message, State):
                assert type(message.key) is int or isinstance(message.key, str)
            if isinstance(message, Direct):
                assert type(message.to_actor) is int
    # anything after a frame-ending Invalid would be a decoder that lost its place
    for message in result[:-1]:
        assert not (isinstance(message, Invalid) and message.message.startswith("frame is not valid"))


@FAST
@given(st.binary(max_size=256))
def test_random_bytes_never_raise(frame: bytes) -> None:
    check_decoded(decode(frame))


# Bytes that often start or fill a message, so random frames look like messages more often.
PIECES = [
    b"\x93", b"\x94", b"\x92", b"\x91", b"\x81", b"\x01", b"\x02", b"\x03", b"\x09", b"\xa1a",
    b"\xc0", b"\xc3", b"\xc1", b"\xcb", b"\xd4\x01\x00", b"\xdd\xff\xff\xff\xff",
]


@FAST
@given(st.lists(st.sampled_from(PIECES), max_size=40))
def test_random_message_like_bytes_never_raise(chunks: list[bytes]) -> None:
    check_decoded(decode(b"".join(chunks)))


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | TEXT
    | st.binary(max_size=20)
)
# Map keys are scalars so that values stay valid data (an array or map as key is refused, above).
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(min_value=-(2**63), max_value=2**64 - 1) | TEXT, inner, max_size=5),
    max_leaves=10,
)
WIRE_VALUES = st.recursive(
    SCALARS | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(min_value=0, max_value=1000) | TEXT, inner, max_size=5),
    max_leaves=10,
)
TYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 9, 10, -1, 2**64 - 1]) | SCALARS
MESSAGE_LIKE = st.builds(lambda kind, rest: [kind, *rest], TYPES, st.lists(WIRE_VALUES, max_size=5))


@FAST
@given(st.lists(WIRE_VALUES | MESSAGE_LIKE, max_size=5))
def test_random_msgpack_values_never_raise(values: list[Any]) -> None:
    frame = b"".join(packb(v) for v in values)
    result = decode(frame)
    check_decoded(result)
    # Each well-formed array (ext values included) is one message: nothing is lost.
    if all(isinstance(v, list) for v in values):
        assert len(result) == len(values)


MOVES = st.one_of(
    st.builds(lambda seq, data: ([1, seq, data], Event), st.integers(-(2**63), 2**64 - 1), VALUES),
    st.builds(
        lambda seq, key, data: ([2, seq, key, data], State),
        st.integers(-(2**63), 2**64 - 1),
        st.integers(-(2**63), 2**64 - 1) | st.text(max_size=16),
        VALUES,
    ),
    st.builds(
        lambda seq, to, data: ([3, seq, to, data], Direct),
        st.integers(-(2**63), 2**64 - 1),
        st.integers(0, 2**32),
        VALUES,
    ),
)


@FAST
@given(st.lists(MOVES, min_size=1, max_size=6))
def test_valid_moves_round_trip(moves: list[tuple[list[Any], type]]) -> None:
    frame = b"".join(packb(message) for message, _ in moves)
    result = decode(frame, max_message_bytes=1 << 20)
    assert [type(m) for m in result] == [kind for _, kind in moves]
    for decoded, (message, _) in zip(result, moves):
        assert decoded.seq == message[1]
        assert msgpack.unpackb(decoded.data, raw=False, strict_map_key=False) == message[-1]
        assert decoded.data == packb(message[-1])
        if isinstance(decoded, State):
            assert decoded.key == message[2]
        if isinstance(decoded, Direct):
            assert decoded.to_actor == message[2]


@FAST
@given(st.integers(0, 2**32), st.integers(-(2**63), 2**64 - 1), VALUES, st.integers(0, 2**63))
def test_relayed_event_reads_back(actor: int, seq: int, value: Any, offset: int) -> None:
    [event] = decode(packb([1, seq, value]), max_message_bytes=1 << 20)
    wire = protocol.with_offset(protocol.event_head(actor, event.seq, event.data), offset)
    assert unpack_one(wire) == [1, actor, seq, value, offset]


# The first-EVENT shortcut (a frame that is or starts with [1, seq, data]) must answer as
# the general decoder does, refusals included: it hands every doubtful frame on to it.
SEQ_LIKE = st.integers(-(2**63), 2**64 - 1) | SCALARS
LONE_EVENT_LIKE = st.one_of(
    st.builds(lambda seq, data: packb([1, seq, data]), st.integers(-(2**63), 2**64 - 1), VALUES),
    st.builds(lambda seq, data: packb([1, seq, data]), SEQ_LIKE, WIRE_VALUES),
    st.builds(lambda seq, rest: b"\x93\x01" + packb(seq) + rest, SEQ_LIKE, st.binary(max_size=24)),
    st.builds(lambda head, tail: head + tail, st.sampled_from([b"\x93\x01", b"\x93\x01\xcd"]), st.binary(max_size=40)),
    st.builds(lambda seq, data, more: packb([1, seq, data]) + packb(more), SEQ_LIKE, VALUES, MESSAGE_LIKE),
)


@settings(FAST, max_examples=600)
@given(LONE_EVENT_LIKE, st.sampled_from([8, 1 << 20, 1 << 20]), st.sampled_from([1, 2, 32, 32]))
def test_first_event_shortcut_answers_as_the_general_decoder(frame: bytes, limit: int, depth: int) -> None:
    expected = protocol._decode_frame(frame, limit, depth, len(frame))
    assert protocol.decode_frame(frame, max_message_bytes=limit, max_depth=depth) == expected


def test_first_event_shortcut_reads_every_integer_width_of_seq() -> None:
    for seq in (0, 127, -1, -32, -33, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -(2**63)):
        assert decode(packb([1, seq, "x"])) == [Event(seq, packb("x"))]


def test_a_frame_of_refused_messages_is_read_only_so_far():
    # 16 K one-byte messages: each refused, and the connection closes after max_errors
    # anyway. Reading them all was 16 K ERRORs' worth of work for nothing.
    out = protocol.decode_frame(b"\x01" * 16384, max_message_bytes=8192)
    assert len(out) == protocol.MAX_REFUSED + 2
    assert all(type(m) is protocol.Invalid for m in out)
    assert out[-1].message.startswith("too many refused messages")
    good = protocol.decode_frame(b"\x01" * 3 + b"\x93\x01\x07\xa2hi", max_message_bytes=8192)
    assert good[-1] == protocol.Event(7, b"\xa2hi")  # a few bad ones do not hide the good
