"""A slow reader never holds the room back, and pins at most its outbox's hard limit."""

from __future__ import annotations

import asyncio
import re
import socket

import msgpack
import pytest
import websockets

from relay_client import Event, Leave, open_client
from tests.helpers import next_of
from tests.relayproc import timeout

pytestmark = pytest.mark.asyncio

SOFT, HARD = 16 * 1024, 64 * 1024
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
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8,
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
        max_msgs_per_s=1000, burst=2000, max_bytes_per_s=10**8, burst_bytes=10**8,
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
