"""Client frames read past websockets' parser (relay/websocket.py): same answers, every chunking.

The splitter may only take a read that websockets would turn into the same binary
messages; everything else must go to websockets untouched. The first half checks
the pure function against websockets' own parser; the second sends awkward
chunkings over a real socket to `relay serve`.
"""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from relay_client import Event, Leave, open_client
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from relay.websocket import read_binary_frames, split_binary_frames
from tests.abuse import RawSocket, ws_frame
from tests.helpers import collect

FAST = settings(max_examples=400, deadline=None, derandomize=True, database=None)
MAX = 16384


def open_server_protocol(max_size: int | None) -> ServerProtocol:
    conn = ServerProtocol(max_size=max_size)
    conn.state = State.OPEN
    conn.parser = conn.parse()  # the parser a completed handshake leaves
    next(conn.parser)
    return conn


def websockets_reads(data: bytes, max_size: int | None) -> tuple[list[Frame], bool, bytes]:
    """What websockets makes of ``data`` on an open connection: frames, error, leftover bytes."""
    conn = open_server_protocol(max_size)
    conn.receive_data(data)
    frames = [e for e in conn.events_received() if isinstance(e, Frame)]
    return frames, conn.parser_exc is not None, bytes(conn.reader.buffer)


PAYLOADS = st.binary(max_size=40) | st.binary(min_size=120, max_size=300)
FRAMES = st.one_of(
    st.builds(lambda p: ws_frame(2, p), PAYLOADS),  # what a game client sends
    st.builds(lambda p: ws_frame(2, p), PAYLOADS),
    st.builds(lambda p: ws_frame(2, p, fin=False), PAYLOADS),
    st.builds(lambda p: ws_frame(0, p), PAYLOADS),
    st.builds(lambda p: ws_frame(1, p), st.text(max_size=10).map(str.encode)),
    st.builds(lambda p: ws_frame(9, p), st.binary(max_size=8)),
    st.builds(lambda p: ws_frame(10, p), st.binary(max_size=8)),
    st.builds(lambda p: ws_frame(2, p, mask=False), st.binary(max_size=8)),
    st.builds(lambda p: ws_frame(2, p, rsv=4), st.binary(max_size=8)),
    st.just(ws_frame(2, b"", length=2**40)),
    st.just(ws_frame(8, b"\x03\xe8")),
)


@FAST
@given(st.lists(FRAMES, max_size=6), st.integers(0, 400), st.sampled_from([None, 100, MAX]))
def test_split_takes_only_what_websockets_reads_as_the_same_binary_messages(
    frames: list[bytes], cut: int, max_size: int | None
) -> None:
    data = b"".join(frames)[: cut or None]  # sometimes a read ends inside a frame
    payloads = split_binary_frames(data, max_size)
    if payloads is None:
        return
    parsed, failed, leftover = websockets_reads(data, max_size)
    assert not failed and not leftover
    assert [(f.opcode, f.fin) for f in parsed] == [(Opcode.BINARY, True)] * len(payloads)
    assert [f.data for f in parsed] == payloads


def messages_of(frames: list[Frame], partial: list[bytes]) -> list[tuple[str, bytes]]:
    """Whole messages from data frames, as uvicorn assembles them (``partial``: a fragmented one)."""
    out = []
    for frame in frames:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            if frame.opcode is not Opcode.CONT:
                partial[:] = [b"t" if frame.opcode is Opcode.TEXT else b"b"]
            partial.append(bytes(frame.data))
            if frame.fin:
                out.append((partial[0].decode(), b"".join(partial[1:])))
        elif frame.opcode is Opcode.PING:
            out.append(("ping", bytes(frame.data)))
    return out


def unmasked_payload_frame(payload: bytes) -> bytes:
    """A valid client frame whose mask is zero: its payload goes on the wire as is."""
    assert len(payload) < 126
    return bytes((0x82, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


VALID = st.one_of(
    st.builds(lambda p: [ws_frame(2, p)], PAYLOADS),
    # A move whose bytes look like a whole frame: a read starting inside it must not pass.
    st.builds(lambda p: [unmasked_payload_frame(ws_frame(2, p))], st.binary(max_size=40)),
    st.builds(lambda p: [ws_frame(2, p)], PAYLOADS),
    st.builds(lambda p: [ws_frame(9, p)], st.binary(max_size=8)),
    st.builds(lambda p: [ws_frame(1, p)], st.text(max_size=10).map(str.encode)),
    st.builds(
        lambda a, b: [ws_frame(2, a, fin=False), ws_frame(9, b"x"), ws_frame(0, b)], PAYLOADS, PAYLOADS
    ),
)


@FAST
@given(st.lists(VALID, max_size=8), st.lists(st.integers(1, 12) | st.integers(1, 400), max_size=12))
def test_every_chunking_of_a_stream_gives_websockets_messages(groups: list[list[bytes]], cuts: list[int]) -> None:
    stream = b"".join(b"".join(g) for g in groups)
    expected = messages_of(websockets_reads(stream, MAX)[0], [])
    assert read_like_the_relay(stream, cuts) == expected


def read_like_the_relay(stream: bytes, cuts: list[int]) -> list[tuple[str, bytes]]:
    """The messages of ``stream`` read in pieces of the sizes ``cuts`` (then the rest), each
    taken by the shortcut when it says so and by websockets otherwise, with the ``idle``
    flag carried from read to read, as RelayWebSocketProtocol.data_received does."""
    conn, got, partial, at = open_server_protocol(MAX), [], [], 0
    idle = False
    for size in [*cuts, len(stream)]:
        chunk, at = stream[at : at + size], at + size
        if not chunk:
            continue
        payloads = read_binary_frames(conn, chunk, idle)
        idle = payloads is not None
        if payloads is None:
            conn.receive_data(chunk)
            got += messages_of([e for e in conn.events_received() if isinstance(e, Frame)], partial)
        else:
            got += [("b", p) for p in payloads]
    assert conn.parser_exc is None
    return got


def test_a_read_split_here_does_not_let_a_later_read_inside_a_frame_take_the_shortcut() -> None:
    # Whole frames (split here, websockets' parser not fed), then half a frame (websockets
    # parses it), then its other half, which looks like a whole frame of its own: the
    # first read's "between frames" must not carry over to the third.
    inner = ws_frame(2, b"ABCD")
    outer = b"\x82\x8a" + b"\x00\x00\x00\x00" + inner  # mask 0: the payload is ``inner`` as is
    first = ws_frame(2, b"hello")
    got = read_like_the_relay(first + outer, [len(first), 6])
    assert got == [("b", b"hello"), ("b", inner)]


def test_a_read_that_ends_inside_a_frame_keeps_the_next_read_from_the_shortcut() -> None:
    # A frame cut after its header and mask: websockets' buffer is empty, but the next
    # read is the rest of that frame, even though it looks like a whole frame itself.
    inner = ws_frame(2, b"ABCD")  # 10 bytes, the payload of the outer frame below
    outer = b"\x82\x8a" + b"\x00\x00\x00\x00" + inner  # mask 0: the payload is ``inner`` as is
    conn = open_server_protocol(MAX)
    assert read_binary_frames(conn, outer[:6]) is None  # half a frame: websockets parses it
    conn.receive_data(outer[:6])
    assert not conn.reader.buffer
    assert read_binary_frames(conn, outer[6:]) is None
    conn.receive_data(outer[6:])
    assert [e.data for e in conn.events_received()] == [inner]


def test_a_new_binary_frame_in_the_middle_of_a_fragmented_message_stays_a_protocol_error() -> None:
    conn = open_server_protocol(MAX)
    conn.receive_data(ws_frame(2, b"first half", fin=False))  # a fragmented message begins
    assert not conn.reader.buffer and conn.current_size is not None
    intruder = ws_frame(2, b"whole")  # must be a continuation, not a new message
    assert read_binary_frames(conn, intruder) is None
    conn.receive_data(intruder)
    assert conn.parser_exc is not None  # websockets closes it 1002


def test_split_takes_a_client_stream_of_binary_frames() -> None:
    sizes = [0, 1, 125, 126, 300, 65535]
    payloads = [os.urandom(n) for n in sizes]
    data = b"".join(ws_frame(2, p) for p in payloads)
    assert split_binary_frames(data, None) == payloads


@pytest.mark.parametrize(
    "data",
    [
        ws_frame(2, b"ab") + ws_frame(9, b""),  # a ping after a move
        ws_frame(2, b"ab")[:-1],  # the move's last byte is still on its way
        ws_frame(2, b"ab", fin=False),  # a fragment
        ws_frame(2, b"x" * 70000),  # 64-bit length: left to websockets
        ws_frame(2, b"x" * 200),  # over max_size below
    ],
    ids=["ping-after", "partial", "fragment", "64-bit-length", "over-max-size"],
)
def test_split_leaves_everything_else_to_websockets(data: bytes) -> None:
    assert split_binary_frames(data, 100 if len(data) < 1000 else None) is None


# --- over a real socket -----------------------------------------------------------


def move(seq: int) -> bytes:
    return msgpack.packb([1, seq, seq], use_bin_type=True)



@pytest.mark.asyncio
async def test_moves_arrive_in_order_however_the_client_cuts_its_writes(relay, room) -> None:
    watcher = await open_client(relay.url, room, player="watcher")
    raw = await RawSocket.websocket(relay.port, room, "raw")
    try:
        frames = [ws_frame(2, move(seq)) for seq in range(1, 41)]
        big = ws_frame(2, msgpack.packb([1, 41, "x" * 300], use_bin_type=True))  # 16-bit length
        writes = [
            b"".join(frames[0:5]),  # five moves in one read
            frames[5][:3],  # a move cut after its header byte...
            frames[5][3:] + frames[6][:1],  # ...finished with the start of the next
            frames[6][1:] + ws_frame(9, b"hi") + frames[7],  # a ping between moves
            *[bytes([b]) for b in frames[8]],  # a move a byte at a time
            ws_frame(2, move(10)[:4], fin=False) + ws_frame(0, move(10)[4:]),  # fragmented
            *frames[10:40],
            big[:100],
            big[100:],
        ]
        for chunk in writes:
            assert await raw.send(chunk)
            await asyncio.sleep(0)  # let each write be its own read where the kernel allows
        seen = await collect(watcher, lambda ms: sum(isinstance(m, Event) for m in ms) >= 41, seconds=10)
        events = [m for m in seen if isinstance(m, Event)]
        assert [e.seq for e in events] == list(range(1, 42))
        assert [e.data for e in events[:40]] == list(range(1, 41))
        # The ping was answered: a PONG with its payload among the frames the raw socket got.
        async with asyncio.timeout(10):
            while True:
                opcode, payload = await raw.read_frame()
                if opcode == 0xA:
                    assert payload == b"hi"
                    break
    finally:
        await raw.close()
        await watcher.close()


@pytest.mark.asyncio
async def test_an_unmasked_frame_after_good_moves_still_closes_1002(relay, room) -> None:
    raw = await RawSocket.websocket(relay.port, room, "raw")
    try:
        assert await raw.send(ws_frame(2, move(1)) + ws_frame(2, move(2), mask=False))
        assert await raw.close_code() == 1002
    finally:
        await raw.close()


async def moves_relayed_before_the_close(server, room: str, one_write: bytes) -> tuple[int | None, list, int]:
    """Send ``one_write`` from a raw player: its close code, the moves a watcher saw from
    it, and the close code in its LEAVE."""
    watcher = await open_client(server.url, room, player="watcher")
    raw = await RawSocket.websocket(server.port, room, "raw")
    try:
        assert await raw.send(one_write)
        code = await raw.close_code()
        seen = await collect(watcher, lambda ms: any(isinstance(m, Leave) for m in ms))
        return code, [m.data for m in seen if isinstance(m, Event)], seen[-1].code
    finally:
        await raw.close()
        await watcher.close()


TEXT_AMONG_MOVES = ws_frame(2, move(1)) + ws_frame(1, b"hello") + ws_frame(2, move(2)) + ws_frame(2, move(3))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (ws_frame(2, b"x" * (MAX + 1)), 1009),
        (ws_frame(2, move(3), mask=False), 1002),
        (ws_frame(2, move(3), rsv=4), 1002),
        (ws_frame(5, b""), 1002),
        (ws_frame(8, (999).to_bytes(2, "big")), 1002),
    ],
    ids=["too-big", "unmasked", "rsv", "opcode-5", "close-999"],
)
async def test_moves_read_together_with_a_bad_frame_are_relayed_before_the_close(relay, room, bad, code) -> None:
    one_write = ws_frame(2, move(1)) + ws_frame(2, move(2)) + bad
    assert await moves_relayed_before_the_close(relay, room, one_write) == (code, [1, 2], code)


@pytest.mark.asyncio
async def test_moves_after_a_text_frame_in_the_same_read_are_not_relayed(relay, room) -> None:
    assert await moves_relayed_before_the_close(relay, room, TEXT_AMONG_MOVES) == (1003, [1], 1003)


@pytest.mark.asyncio
async def test_frames_that_wait_for_the_join_stop_at_a_text_frame(redis_server, redis_relays, room) -> None:
    """With Redis the join takes a round trip, so frames sent right after the upgrade
    wait for it, in order; a text frame among them ends the connection (1003) before
    the moves behind it."""
    [server] = redis_relays(redis_server.url, 1)
    assert await moves_relayed_before_the_close(server, room, TEXT_AMONG_MOVES) == (1003, [1], 1003)


@pytest.mark.asyncio
async def test_a_bad_frame_after_the_servers_close_ends_the_connection_at_once(relay_with, room) -> None:
    server = relay_with(close_timeout_s=30, max_close_wait_s=60)
    raw = await RawSocket.websocket(server.port, room, "raw")
    try:
        assert await raw.send(ws_frame(1, b"text"))  # the relay closes with 1003...
        assert await raw.close_code() == 1003
        assert await raw.send(ws_frame(2, move(1), mask=False))  # ...and gets a bad frame, not a close
        assert await raw.closed_by_server(seconds=5)  # not after close_timeout_s
    finally:
        await raw.close()
