"""The Redis backplane when things fail: a killed node, a Redis restart, a cut subscription."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.error

import pytest
from relay_client import Direct, Error, Event, Join, Leave, Resynced, connect, open_client

from tests.helpers import closed, collect, next_of
from tests.redisproc import command, ready, wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

TTL = 2.0  # node_ttl_s in these tests


def metric(relay, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", relay.get_text("/metrics"), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def kill_subscription(redis_port: int, relay_port: int) -> None:
    """Have Redis drop one relay's subscriber connection (its connections are named relay:PORT)."""
    clients = command(redis_port, "CLIENT", "LIST", "TYPE", "pubsub").decode()
    ids = re.findall(rf"id=(\d+) .*name=relay:{relay_port} ", clients)
    assert ids, clients
    for client_id in ids:
        assert command(redis_port, "CLIENT", "KILL", "ID", client_id) == b":1\r\n"


async def test_redis_restart_refuses_moves_then_resynchronises_rooms(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL)
    x = await open_client(a.url, room, player="x", auto_resume=False)
    y = await open_client(b.url, room, player="y")  # this one resumes by itself, as apps do
    try:
        x.send_event("before")
        assert (await next_of(y, Event)).data == "before"
        redis_server.stop()  # SIGKILL: a crash, with nothing kept
        wait_until(lambda: not ready(a) and not ready(b), 10, "readyz to report the outage")
        seq = x.send_event("during")  # refused, and the client is told
        error = await next_of(x, Error)
        assert (error.ref_seq, error.code) == (seq, "unavailable")
        redis_server.start()
        wait_until(lambda: ready(a) and ready(b), 15, "readyz to report the backplane back")
        # The room's state is gone from Redis: both nodes close their seats with 1011...
        assert (await closed(x, seconds=10)).code == 1011
        resynced = await next_of(y, Resynced, seconds=15)  # ...and y's client came back fresh
        assert [m.player for m in resynced.welcome.members] == ["y"]
        async with connect(a.url, room, player="x") as again:  # x rejoins and plays on
            again.send_event("after")
            assert (await next_of(y, Event)).data == "after"
        assert metric(a, "relay_backplane_resyncs_total") >= 1
    finally:
        await x.close()
        await y.close()


async def test_join_during_an_outage_is_told_to_come_back_later(redis_server, redis_relays, room):
    (a,) = redis_relays(redis_server.url, 1)
    redis_server.stop()
    wait_until(lambda: not ready(a), 10, "readyz to report the outage")
    with pytest.raises(Exception) as refused:
        await open_client(a.url, room, player="late")
    assert getattr(refused.value, "code", None) == 1013
    assert a.get_json("/healthz") == {"status": "ok"}  # down, not dead
    redis_server.start()
    wait_until(lambda: ready(a), 15, "the backplane to come back")
    async with connect(a.url, room, player="late") as late:
        assert [m.player for m in late.welcome.members] == ["late"]


async def test_a_cut_subscription_is_repaired_from_history_without_loss(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL)
    async with connect(a.url, room, player="watch", auto_resume=False) as watch:
        mover = await open_client(b.url, room, player="mover", auto_resume=False)
        try:
            refused: set[int] = set()
            sent: dict[int, int] = {}

            async def move() -> None:
                for i in range(150):
                    sent[mover.send_event(i)] = i
                    if i == 50:  # Redis drops the watcher's node (as under its output-buffer limit)
                        kill_subscription(redis_server.port, a.port)
                    await asyncio.sleep(0.005)
                await mover.flush()

            async def errors() -> None:
                while True:
                    message = await mover.recv()
                    if isinstance(message, Error):
                        assert message.code == "unavailable"
                        refused.add(sent[message.ref_seq])

            watching = asyncio.create_task(errors())
            await move()
            expected = lambda: [i for i in range(150) if i not in refused]
            got = await collect(watch, lambda ms: [m.data for m in ms if isinstance(m, Event)][-1:] == [149], 15)
            watching.cancel()
            events = [m for m in got if isinstance(m, Event)]
            assert [m.data for m in events] == expected()  # every move taken arrived, in order
            offsets = [m.offset for m in events]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))  # no gap
            assert watch.close_code is None  # repaired, not resynchronised
            assert metric(a, "relay_backplane_repairs_total") >= 1
            assert metric(a, "relay_backplane_resyncs_total") == 0
            assert metric(a, "relay_backplane_replayed_total") >= 1  # it did miss some, and got them
            assert not refused  # the mover's node never lost Redis
        finally:
            await mover.close()


async def test_directs_published_while_a_nodes_subscription_is_cut_reach_their_player_once(
    redis_server, redis_relays, room
):
    """Pub/sub is at most once: DIRECTs Redis publishes while a node is not subscribed are
    gone for it, and unlike room messages they are in no history. The node reads those
    published for its seats from the room's DIRECT log when it repairs the room."""
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=10)  # b's freeze stays well under its ttl
    async with connect(a.url, room, player="x") as x, connect(b.url, room, player="y") as y:
        await next_of(x, Join)
        a.proc.send_signal(signal.SIGSTOP)  # so that a cannot come back before the DIRECTs go out
        try:
            kill_subscription(redis_server.port, a.port)
            for i in range(3):
                last = y.send_direct(x.actor, i)
            await y.flush()
            seq = f"{{relay:{room}}}:seq"  # the last seq Redis took from each seat
            taken = lambda: command(redis_server.port, "HGET", seq, str(y.actor)).endswith(f"\r\n{last}\r\n".encode())  # noqa: E731
            await asyncio.to_thread(wait_until, taken, 5, "Redis to publish the DIRECTs")
        finally:
            a.proc.send_signal(signal.SIGCONT)
        y.send_direct(x.actor, "live")  # after a is back: no repeat of the three before it
        got = await collect(x, lambda ms: [m.data for m in ms if isinstance(m, Direct)][-1:] == ["live"], 15)
        assert [m.data for m in got if isinstance(m, Direct)] == [0, 1, 2, "live"]
        assert x.close_code is None and metric(a, "relay_backplane_repairs_total") >= 1


async def test_a_redis_that_stops_answering_counts_as_down_and_no_taken_move_is_lost(
    redis_server, redis_relays, room
):
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL, redis_timeout_s=1.0)
    x = await open_client(a.url, room, player="x", auto_resume=False)
    y = await open_client(b.url, room, player="y", auto_resume=False)
    try:
        x.send_event("before")
        assert (await next_of(y, Event)).data == "before"
        redis_server.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            x.send_event("during")  # taken: the relay cannot know yet that Redis will not answer
            x.send_direct(y.actor, "during")
            await x.flush()
            await asyncio.to_thread(wait_until, lambda: not ready(a), 10, "the relay to count a silent Redis as down")
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(wait_until, lambda: ready(a) and ready(b), 15, "the backplane to come back")
        x.send_event("after")
        x.send_direct(y.actor, "after")
        got = await collect(y, lambda ms: "after" in [m.data for m in ms if isinstance(m, Direct)], 15)
        # The taken moves went out once the round trip could be made again (Redis also ran
        # what it had read before it froze, whose replies were lost): once each, in order.
        assert [m.data for m in got if isinstance(m, Event)] == ["during", "after"]
        assert [m.data for m in got if isinstance(m, Direct)] == ["during", "after"]
        assert y.close_code is None and x.close_code is None
    finally:
        await x.close()
        await y.close()


async def test_a_node_frozen_past_its_seats_window_closes_them_for_a_rejoin_and_relays_none_of_their_moves(
    redis_server, redis_relays, room
):
    """SIGSTOP a node for longer than node_ttl_s + resume_window_s: the others remove its
    seats (LEAVE). When it wakes, the moves its players sent meanwhile must not follow
    their LEAVE into the room, and its players are closed with a code they rejoin on."""
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL, resume_window_s=0.5)
    x = await open_client(a.url, room, player="x", auto_resume=False)
    try:
        async with connect(b.url, room, player="y") as y, connect(b.url, room, player="z") as z:
            a.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:
                leave = await next_of(y, Leave, seconds=15)  # b took a for dead and removed x
                assert leave.actor == x.actor
                for i in range(5):
                    x.send_event(f"late {i}")  # waits in a's socket
                await x.flush()
            finally:
                a.proc.send_signal(signal.SIGCONT)
            gone = await closed(x, seconds=15)
            assert gone.code == 1011  # the client rejoins (4409 would tell it not to)
            z.send_event("probe")  # sequenced after anything a took from x
            got = await collect(y, lambda ms: any(isinstance(m, Event) and m.data == "probe" for m in ms), seconds=10)
            assert not [m for m in got if isinstance(m, Event) and m.actor == leave.actor]
    finally:
        await x.close()


async def test_directs_kept_for_a_frozen_nodes_seats_reach_them_when_it_takes_them_back(
    redis_server, redis_relays, room
):
    """SIGSTOP a node for longer than node_ttl_s but less than the resume window: the
    others hold its seats and keep the DIRECTs sent to them. Its players never left, so
    no resume hands those over: the node does, as it takes its seats back."""
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL, resume_window_s=60)
    async with connect(a.url, room, player="x") as x, connect(b.url, room, player="y") as y:
        await next_of(x, Join)
        a.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            held = f"{{relay:{room}}}:hld"
            is_held = lambda: command(redis_server.port, "HEXISTS", held, str(x.actor)) == b":1\r\n"  # noqa: E731
            await asyncio.to_thread(wait_until, is_held, 15, "the other node to hold x's seat")
            for i in range(3):
                y.send_direct(x.actor, i)  # kept in Redis for the held seat
            await y.flush()
            kept = lambda: command(redis_server.port, "LLEN", f"{{relay:{room}}}:dir:{x.actor}") == b":3\r\n"  # noqa: E731
            await asyncio.to_thread(wait_until, kept, 5, "the DIRECTs to be kept for x")
        finally:
            a.proc.send_signal(signal.SIGCONT)
        got = await collect(x, lambda ms: len([m for m in ms if isinstance(m, Direct)]) == 3, seconds=15)
        assert [m.data for m in got if isinstance(m, Direct)] == [0, 1, 2]
        assert not [m for m in got if isinstance(m, (Leave, Join))]  # the seat was never given up
    assert command(redis_server.port, "EXISTS", f"{{relay:{room}}}:dir:{x.actor}") == b":0\r\n"


async def test_reading_rooms_while_redis_stops_answering_is_a_503(redis_server, redis_relays, room):
    [a] = redis_relays(redis_server.url, 1, node_ttl_s=TTL, redis_timeout_s=0.5)
    async with connect(a.url, room, player="x"):
        assert a.get_json(f"/rooms/{room}")["members"]
        redis_server.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            for path in (f"/rooms/{room}", "/rooms"):
                with pytest.raises(urllib.error.HTTPError) as answer:
                    a.get_json(path)
                assert answer.value.code == 503, path
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: ready(a), 15, "the backplane to come back")
        assert a.get_json(f"/rooms/{room}")["members"]
