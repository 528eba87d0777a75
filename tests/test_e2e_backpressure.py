"""A slow reader never holds the room back, and pins at most its outbox's hard limit."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time

import msgpack
import pytest
import websockets

from relay_client import Event, Join, Leave, connect, open_client
from tests.helpers import metrics, next_of, wait_metrics
from tests.relayproc import timeout

pytestmark = pytest.mark.asyncio

SOFT, HARD = 16 * 1024, 64 * 1024
# run_room's fast players each take 3.6 MB/s against an outbox of HARD bytes: on a busy
# test machine a reading pause of 50 ms would drop moves for them too. The kernel's own
# send buffer (send_buffer_bytes 0, MBs) gives them the slack that the defaults (a
# 256 KiB outbox at game rates of KB/s) give real players.
FAST_PLAYERS_SLACK = {"send_buffer_bytes": 0}
MOVE = b"x" * 6000  # big moves, so the kernel socket buffers (up to 4 MB here) fill quickly


async def stalled_reader(url: str, room: str):
    """A WebSocket that stops reading: tiny kernel buffer, one-frame client queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    ws = await websockets.connect(f"{url}/ws/{room}?player=slow", sock=sock, max_queue=1, max_size=None)
    return ws


def outbox_bytes(server) -> float:
    text = server.get_text("/metrics")
    return float(re.search(r"^relay_outbox_bytes_max (\S+)$", text, re.M).group(1))


def metric(server, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", server.get_text("/metrics"), re.M)
    return float(found.group(1)) if found else 0.0


async def play(players, rounds: int, server, samples: list[float]) -> None:
    for i in range(rounds):
        for p in players:
            p.send_event([i, MOVE])
            p.send_state("pos", i)
        await asyncio.gather(*(p.flush() for p in players))
        if i % 20 == 0:
            samples.append(await asyncio.to_thread(outbox_bytes, server))
        await asyncio.sleep(0.005)  # a steady game pace, ~200 moves/s per player


async def run_room(server, room: str, rounds: int):
    fast = [await open_client(server.url, room, player=f"fast{i}") for i in range(3)]
    slow = await stalled_reader(server.url, room)
    samples: list[float] = []
    try:
        await play(fast, rounds, server, samples)
        got = {}
        for p in fast:
            received = []
            async with asyncio.timeout(timeout(20)):
                while len([r for r in received if not isinstance(r[1], tuple)]) < 2 * rounds:
                    m = await p.recv()
                    if isinstance(m, Event):
                        received.append((m.actor, m.data[0]))
                    elif isinstance(m, Leave):
                        received.append((m.actor, ("LEAVE", m.code)))
            got[p.actor] = received
        return fast, slow, samples, got
    except BaseException:
        await slow.close()
        for p in fast:
            await p.close()
        raise


async def drain_slow(slow) -> tuple[list, int | None]:
    messages, code = [], None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    async with asyncio.timeout(timeout(20)):
        try:
            while True:
                frame = await asyncio.wait_for(slow.recv(), timeout(3))
                unpacker.feed(frame)
                messages.extend(unpacker)
        except (websockets.ConnectionClosed, TimeoutError):
            pass
    rcvd = slow.protocol.close_rcvd
    code = rcvd.code if rcvd else None
    return messages, code


async def test_slow_reader_gets_coalesced_and_dropped_while_others_get_everything(relay_with, room):
    server = relay_with(
        outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD, slow_client_timeout_s=60,
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8, **FAST_PLAYERS_SLACK,
    )
    rounds = 500
    fast, slow, samples, got = await run_room(server, room, rounds)
    try:
        for p in fast:  # every fast player got every other fast player's move, in order
            others = [q.actor for q in fast if q is not p]
            for actor in others:
                assert [i for a, i in got[p.actor] if a == actor] == list(range(rounds))
            assert p.dropped == 0
        assert max(samples) <= HARD + 4096  # the slow reader pins at most the hard limit
        messages, code = await drain_slow(slow)
    finally:
        await slow.close()
        for p in fast:
            await p.close()
    dropped = sum(m[1] for m in messages if m[0] == 8)
    events = [m for m in messages if m[0] == 1]
    assert dropped > 0, "the stalled reader should have been told that EVENTs were dropped"
    assert metric(server, "relay_dropped_events_total") >= dropped
    assert metric(server, "relay_coalesced_states_total") > 0
    offsets = [m[-1] for m in messages if m[0] in (1, 2, 5, 6)]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)  # still in room order
    assert len(events) + dropped <= 3 * rounds


async def test_reader_stalled_too_long_is_closed_4008(relay_with, room):
    server = relay_with(
        outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD, slow_client_timeout_s=0.5, resume_window_s=0.5,
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8, **FAST_PLAYERS_SLACK,
    )
    rounds = 500
    fast, slow, samples, got = await run_room(server, room, rounds)
    try:
        leaves = [i for _, i in got[fast[0].actor] if isinstance(i, tuple)]
        if not leaves:
            leave = await next_of(fast[0], Leave)
            leaves = [("LEAVE", leave.code)]
        assert leaves == [("LEAVE", 4008)]
        for p in fast:
            assert all(len([i for a, i in got[p.actor] if a == q.actor]) == rounds for q in fast if q is not p)
        _, code = await drain_slow(slow)
        assert code == 4008
        assert metric(server, "relay_slow_consumer_closes_total") == 1
    finally:
        await slow.close()
        for p in fast:
            await p.close()


async def test_a_reader_that_stopped_in_a_busy_room_is_reaped_by_the_ping_timeout(relay_with, room):
    # Its receive window is zero, so nothing written to it drains: no pong, and a plain
    # close would wait forever for the buffer to empty. The room must still get LEAVE.
    server = relay_with(
        ping_interval_s=0.5, ping_timeout_s=0.5, resume_window_s=0.5, slow_client_timeout_s=60,
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8,
    )
    async with connect(server.url, room, player="mover") as mover:
        stalled = await stalled_reader(server.url, room)
        try:
            join = await next_of(mover, Join)
            for i in range(1000):  # past the kernel buffers (up to 4 MB here): its socket stops draining
                mover.send_event([i, MOVE])
                await mover.flush()
                if i % 10 == 0:
                    await asyncio.sleep(0.005)
            leave = await next_of(mover, Leave, seconds=10)
            assert (leave.actor, leave.code) == (join.actor, 1006)
            assert metric(server, "relay_slow_consumer_closes_total") == 0  # the ping timeout did it
        finally:
            stalled.transport.abort()


def server_side_open(server_port: int, client_port: int) -> bool:
    """Whether the server still has its end of this TCP connection (the kernel's table)."""
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return state == "01"  # ESTABLISHED
    return False


async def test_a_slow_consumer_that_reads_nothing_is_let_go_after_the_close_timeout(relay_with, room):
    # Its 4008 close frame waits behind data it never reads. The connection must still end
    # (close_timeout, 5 s), not pin its buffers while waiting for them to drain.
    server = relay_with(
        outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD, slow_client_timeout_s=0.5, ping_interval_s=60,
        ping_timeout_s=60, max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8,
    )
    async with connect(server.url, room, player="mover") as mover:
        stalled = await stalled_reader(server.url, room)
        client_port = stalled.transport.get_extra_info("sockname")[1]
        try:
            await next_of(mover, Join)
            for i in range(1000):
                mover.send_event([i, MOVE])
                await mover.flush()
                if i % 10 == 0:
                    await asyncio.sleep(0.005)
            async with asyncio.timeout(timeout(15)):
                while metric(server, "relay_slow_consumer_closes_total") < 1:
                    await asyncio.sleep(0.1)  # polling the relay's counter
                while server_side_open(server.port, client_port):
                    await asyncio.sleep(0.1)  # polling the kernel's connection table
        finally:
            stalled.transport.abort()


async def test_a_peer_closed_with_a_flush_that_reads_nothing_is_let_go_after_the_close_timeout(relay_with, room):
    # A text frame gets 1003 after what is queued for the peer: with a peer that reads
    # nothing, that must not wait for its socket to drain (until the keepalive, 120 s here).
    server = relay_with(
        outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD, slow_client_timeout_s=60, close_timeout_s=1,
        ping_interval_s=60, ping_timeout_s=60, max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8,
        burst_bytes=10**8,
    )
    async with connect(server.url, room, player="mover") as mover:
        stalled = await stalled_reader(server.url, room)
        client_port = stalled.transport.get_extra_info("sockname")[1]
        try:
            join = await next_of(mover, Join)
            for i in range(1000):  # past the kernel buffers: its outbox holds the rest
                mover.send_event([i, MOVE])
                await mover.flush()
                if i % 10 == 0:
                    await asyncio.sleep(0.005)
            assert metric(server, "relay_outbox_bytes_max") > 0
            await stalled.send("a text frame")
            leave = await next_of(mover, Leave, seconds=15)
            assert (leave.actor, leave.code) == (join.actor, 1003)
            async with asyncio.timeout(timeout(5)):
                while server_side_open(server.port, client_port):
                    await asyncio.sleep(0.1)  # polling the kernel's connection table
        finally:
            stalled.transport.abort()


def upgraded_socket(port: int, room: str, player: str) -> socket.socket:
    """A raw WebSocket connection (4 KB receive buffer) whose reads the test paces itself."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(timeout(5))
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /ws/{room}?player={player} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(1)  # byte by byte: what follows the headers is left in the socket
    assert reply.startswith(b"HTTP/1.1 101")
    return sock


def read_slowly_to_the_end(sock: socket.socket, chunk: int, pause: float) -> bytes:
    """Read ``chunk`` bytes every ``pause`` seconds until the server ends the connection."""
    received = bytearray()
    while True:
        try:
            data = sock.recv(chunk)
        except ConnectionResetError:
            return bytes(received)  # aborted by the server
        if not data:
            return bytes(received)
        received += data
        time.sleep(pause)  # the pace of a slow link, not a wait for a condition


def close_code_in(stream: bytes) -> int | None:
    """The code of the close frame in a stream of unmasked server frames, if it is there whole."""
    at = 0
    while at + 2 <= len(stream):
        opcode, length = stream[at] & 0x0F, stream[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = int.from_bytes(stream[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(stream[at : at + 8], "big"), at + 8
        if at + length > len(stream):
            return None
        if opcode == 8:
            return int.from_bytes(stream[at : at + 2], "big")
        at += length
    return None


def closing_relay(relay_with, max_close_wait_s: float):
    """A relay that closes a congested reader quickly (4008), then gives it close_timeout_s
    0.5 s at a time, up to ``max_close_wait_s``, to read its way to the close frame. The
    kernel's send buffer is the OS's own (send_buffer_bytes=0), which grows to MBs: a
    backlog that takes many close_timeout_s to read."""
    return relay_with(
        outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD, slow_client_timeout_s=0.5, close_timeout_s=0.5,
        send_buffer_bytes=0,
        max_close_wait_s=max_close_wait_s, ping_interval_s=60, ping_timeout_s=60,
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8,
    )


async def play_until_a_4008(server, mover) -> None:
    """Big moves at a steady pace until the relay has closed a slow consumer."""
    await next_of(mover, Join)
    async with asyncio.timeout(timeout(30)):
        i = 0
        while metric(server, "relay_slow_consumer_closes_total") < 1:
            mover.send_event([i, MOVE])
            await mover.flush()
            i += 1
            await asyncio.sleep(0.005)  # a steady game pace, not a wait for a condition


async def test_a_slow_consumer_still_reading_its_backlog_gets_to_its_4008(relay_with, room):
    # Its close frame goes behind everything the server had written to it. A reader that
    # works through that backlog, slowly, must reach the close frame and read 4008, not
    # be cut off (a reset, no code) because it took longer than close_timeout_s.
    server = closing_relay(relay_with, max_close_wait_s=60)
    async with connect(server.url, room, player="mover") as mover:
        slow = await asyncio.to_thread(upgraded_socket, server.port, room, "slow")
        try:
            await play_until_a_4008(server, mover)
            # At most 4 KB per 5 ms: what the server's buffers hold (MBs: the kernel's send
            # buffer grows) takes many close_timeout_s.
            started = time.monotonic()
            stream = await asyncio.to_thread(read_slowly_to_the_end, slow, 4096, 0.005)
            took = time.monotonic() - started
            assert took > 1.0, f"the backlog was read in {took:.2f} s: the test proves nothing"
            assert close_code_in(stream) == 4008
        finally:
            slow.close()


async def test_a_closing_peer_that_reads_too_slowly_is_cut_off_at_max_close_wait_s(relay_with, room):
    # It keeps reading, a trickle, so every close_timeout_s shows progress: the wait for it
    # to reach its close frame must still end, at max_close_wait_s.
    server = closing_relay(relay_with, max_close_wait_s=2)
    async with connect(server.url, room, player="mover") as mover:
        slow = await asyncio.to_thread(upgraded_socket, server.port, room, "slow")
        client_port = slow.getsockname()[1]
        reading = None
        try:
            await play_until_a_4008(server, mover)
            # 4 KB per 100 ms: progress in every close_timeout_s, but the MBs ahead of its
            # close frame would take over a minute.
            reading = asyncio.create_task(asyncio.to_thread(read_slowly_to_the_end, slow, 4096, 0.1))
            async with asyncio.timeout(timeout(10)):
                while server_side_open(server.port, client_port):
                    await asyncio.sleep(0.1)  # polling the kernel's connection table
            assert not reading.done()  # it was still reading when it was cut off
        finally:
            with contextlib.suppress(OSError):
                slow.shutdown(socket.SHUT_RDWR)  # ends the reading thread's recv
            stream = await reading if reading is not None else b""
            slow.close()
    assert close_code_in(stream) is None  # it never got as far as its close frame


@pytest.mark.parametrize("send_buffer_bytes", [65536, 0], ids=["fixed", "os"])
async def test_a_slow_readers_backlog_stays_in_reach_of_the_outbox(relay_with, room, send_buffer_bytes):
    """With a fixed kernel send buffer (send_buffer_bytes), a reader that stalls has its
    backlog in the outbox, where EVENTs are dropped past the hard limit (and it is told).
    Left to Linux, that buffer grows to megabytes, out of reach: nothing is dropped."""
    server = relay_with(
        outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD, slow_client_timeout_s=60, send_buffer_bytes=send_buffer_bytes,
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8,
    )
    async with connect(server.url, room, player="talker") as talker:
        slow = await stalled_reader(server.url, room)
        try:
            for i in range(150):  # 900 KB: far past the fixed buffer and the hard limit
                talker.send_event([i, MOVE])
                await talker.flush()  # one move per frame (max_frame_bytes)
            await talker.ping()  # all taken and relayed
            dropped = metric(server, "relay_dropped_events_total")
        finally:
            slow.transport.abort()  # a close handshake would wait behind the backlog
    assert (dropped > 0) == bool(send_buffer_bytes), dropped



async def test_a_frame_whose_replies_overrun_the_outbox_ends_at_its_4008(relay_with, room):
    """The replies to one frame (PONGs to a reader that is not reading) pass the hard
    limit part way through it: the connection is closed with 4008 once, and the rest
    of that frame is not played."""
    server = relay_with(outbox_soft_bytes=1024, outbox_hard_bytes=4096, send_buffer_bytes=4096)
    async with connect(server.url, room, player="watch") as watch, connect(server.url, room, player="mark") as mark:
        slow = await stalled_reader(server.url, room)
        try:
            await next_of(watch, Join)
            await next_of(watch, Join)
            pings = b"".join(msgpack.packb([9, "t" * 100]) for _ in range(120))  # ~12 KB of PONGs
            await slow.send(pings + msgpack.packb([1, 1, "after the 4008"]))
            await wait_metrics(server, {"relay_slow_consumer_closes_total": 1.0}, 10)
            mark.send_event("marker")  # sequenced after anything the slow frame put in the order
            await mark.flush()
            seen = []
            while not seen or seen[-1] != "marker":
                seen.append((await next_of(watch, Event)).data)
            assert seen == ["marker"]
            after = await asyncio.to_thread(metrics, server)
            assert after["relay_slow_consumer_closes_total"] == 1.0
            assert after['relay_closes_total{code="4008"}'] == 1.0
        finally:
            await slow.close()

