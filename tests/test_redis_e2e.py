"""Rooms shared by relay processes through a real Redis: order, snapshot, presence."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import msgpack
import pytest
from relay_client import Direct, Event, Join, Leave, State, connect, open_client

from tests import test_e2e_resume as resume_suite
from tests.helpers import closed, collect, next_of, raw_close_code, raw_connect, raw_messages
from tests.redisproc import command, wait_until
from tests.relayproc import RelayProcess, free_port
from tests.test_e2e_order import assert_each_senders_order_kept, one_gapless_order, watch_senders

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]


async def test_one_order_for_watchers_on_different_nodes(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="w1") as w1, connect(b.url, room, player="w2") as w2:
        senders = [await open_client((a, b, a)[i].url, room, player=f"s{i}") for i in range(3)]
        try:
            seen1, seen2 = await watch_senders((w1, w2), senders)
        finally:
            for s in senders:
                await s.close()
    assert_each_senders_order_kept(one_gapless_order(seen1, seen2), senders)


async def test_late_joiner_on_another_node_is_consistent_with_the_order(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="watch") as watch, connect(a.url, room, player="mover") as mover:
        total = 100
        late_box = {}
        for i in range(total):
            mover.send_state("pos", i)
            mover.send_event(i)
            if i == total // 2:
                late_box["client"] = await open_client(b.url, room, player="late")
            if i % 20 == 0:
                await asyncio.sleep(0)
        await mover.flush()
        late = late_box["client"]
        try:
            last_pos = lambda ms: any(isinstance(m, State) and m.data == total - 1 for m in ms)
            seen_by_watch = await collect(watch, last_pos, seconds=20)
            seen_by_late = await collect(late, last_pos, seconds=20)
        finally:
            await late.close()
    start = late.welcome.offset
    pos_at_join = late.welcome.snapshot.get(mover.actor, {}).get("pos")
    watch_order = [(m.offset, type(m).__name__, m.data) for m in seen_by_watch if isinstance(m, (Event, State))]
    late_order = [(m.offset, type(m).__name__, m.data) for m in seen_by_late if isinstance(m, (Event, State))]
    assert late_order == [x for x in watch_order if x[0] > start]
    before = [x for x in watch_order if x[0] <= start and x[1] == "State"]
    assert pos_at_join == (before[-1][2] if before else None)
    joins = [m for m in seen_by_watch if isinstance(m, Join) and m.player == "late"]
    assert joins and joins[0].offset == start
    assert sorted(m.player for m in late.welcome.members) == ["late", "mover", "watch"]


async def test_presence_and_rooms_across_nodes(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="x") as x:
        y = await open_client(b.url, room, player="y", auto_resume=False)
        join = await next_of(x, Join)
        assert (join.player, join.actor) == ("y", y.actor)
        y.send_state("hat", "red")
        await next_of(x, State)
        assert x.snapshot[y.actor] == {"hat": "red"}
        for relay in (a, b):  # either node tells about the whole cluster
            assert relay.get_json("/rooms")["rooms"] == [{"room": room, "members": 2}]
            detail = relay.get_json(f"/rooms/{room}")
            assert [m["player"] for m in detail["members"]] == ["x", "y"]
            assert detail["snapshot_keys"] == 1
        await y.close()
        leave = await next_of(x, Leave)
        assert (leave.actor, leave.code) == (y.actor, 1000)
        assert y.actor not in x.snapshot and y.actor not in x.members
        detail = b.get_json(f"/rooms/{room}")
        assert [m["player"] for m in detail["members"]] == ["x"] and detail["snapshot_keys"] == 0
        x.send_direct(x.actor, "me")  # the room still works after the leave
        assert (await next_of(x, Direct)).data == "me"
    wait_until(lambda: a.get_json("/rooms")["rooms"] == [], 5, "the empty room to be gone")


async def test_direct_reaches_a_player_on_another_node(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="x") as x, connect(b.url, room, player="y") as y:
        await next_of(x, Join)  # y is addressable from x's node once its JOIN got there
        x.send_direct(y.actor, {"secret": 7})
        direct = await next_of(y, Direct)
        assert (direct.actor, direct.data) == (x.actor, {"secret": 7})


async def test_same_player_joining_on_another_node_replaces_the_old_seat(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="w") as watch:
        old = await open_client(a.url, room, player="p", auto_resume=False)
        async with connect(b.url, room, player="p") as new:
            assert (await closed(old)).code == 4409
            leave = await next_of(watch, Leave)
            assert (leave.actor, leave.code) == (old.actor, 4409)
            assert [m.player for m in new.welcome.members].count("p") == 1


async def test_actor_numbers_are_unique_across_nodes(redis_server, redis_relays, room):
    relays = redis_relays(redis_server.url, 2)
    clients = await asyncio.gather(*(open_client(relays[i % 2].url, room, player=f"p{i}") for i in range(12)))
    try:
        assert len({c.actor for c in clients}) == 12
        last = max(clients, key=lambda c: c.welcome.offset)
        assert sorted(last.members) == sorted(c.actor for c in clients)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_many_rooms_joined_at_once_on_a_fresh_node(redis_server, redis_relays):
    (a,) = redis_relays(redis_server.url, 1)
    rooms = [f"burst:{i}" for i in range(12)]
    clients = await asyncio.gather(*(open_client(a.url, room, player=f"p{j}") for room in rooms for j in range(2)))
    try:
        for client in clients[1::2]:
            client.send_event("hi")
        for client in clients[0::2]:
            assert (await next_of(client, Event)).data == "hi"
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_prefixes_keep_deployments_apart(redis_server, redis_relays, room):
    (a,) = redis_relays(redis_server.url, 1, redis_prefix="blue")
    (b,) = redis_relays(redis_server.url, 1, redis_prefix="green")
    async with connect(a.url, room, player="x") as x, connect(b.url, room, player="y") as y:
        assert [m.player for m in x.welcome.members] == ["x"]
        assert [m.player for m in y.welcome.members] == ["y"]
    keys = command(redis_server.port, "KEYS", "*")
    assert b"blue:" in keys and b"green:" in keys and b"relay:" not in keys


async def test_workers_on_one_port_share_rooms(redis_server, room):
    server = RelayProcess(free_port(), {"redis": redis_server.url, "workers": 2}).start()
    try:
        wait_until(lambda: command(redis_server.port, "SCARD", "relay:nodes").startswith(b":2"), 20, "two workers")
        clients = [await open_client(server.url, room, player=f"p{i}") for i in range(8)]
        try:
            last = clients[-1]
            assert sorted(m.player for m in last.welcome.members) == [f"p{i}" for i in range(8)]
            clients[0].send_event("hello")
            for client in clients[1:]:  # whichever worker each one landed on
                assert (await next_of(client, Event)).data == "hello"
        finally:
            for client in clients:
                await client.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "case",
    [
        resume_suite.test_aborted_connection_resumes_with_every_missed_move_once,
        resume_suite.test_moves_resent_after_resume_are_applied_once,
    ],
    ids=["aborted", "resent"],
)
async def test_resume_suite_on_the_redis_backplane(case, redis_server, redis_relays, room):
    """The resume tests of the memory backplane, on a node whose history comes from Redis."""
    (a,) = redis_relays(redis_server.url, 1)
    await case(a, room)


async def test_the_same_player_joining_many_times_at_once_keeps_one_connection(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="watch") as watch:
        tries = [(a if i % 2 else b).url for i in range(8)]
        sockets = await asyncio.gather(*(raw_connect(url, room, "?player=same") for url in tries))
        try:
            actors = [(await raw_messages(ws))[0][2] for ws in sockets]
            seen = await collect(
                watch, lambda ms: sum(isinstance(m, Join) for m in ms) == 8 and sum(isinstance(m, Leave) for m in ms) == 7
            )
            left = [m for m in seen if isinstance(m, Leave)]
            assert {m.code for m in left} == {4409}
            [kept] = {m.actor for m in seen if isinstance(m, Join)} - {m.actor for m in left}
            for actor, ws in zip(actors, sockets):
                if actor == kept:  # the last one in the room's order stays, and plays
                    await ws.send(msgpack.packb([1, 1, "still here"]))
                    assert (await next_of(watch, Event)).data == "still here"
                else:  # every other one is closed as replaced, not left playing as a ghost
                    assert (await raw_close_code(ws))[0] == 4409
        finally:
            for ws in sockets:
                await ws.close()


async def test_workers_stop_when_their_supervisor_is_killed(redis_server, room):
    """A supervisor killed with SIGKILL leaves no orphan workers serving the port."""
    server = RelayProcess(free_port(), {"redis": redis_server.url, "workers": 2}).start()
    try:
        wait_until(lambda: command(redis_server.port, "SCARD", "relay:nodes").startswith(b":2"), 20, "two workers")
        parent = server.proc.pid
        workers = [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        assert len(workers) >= 2
        client = await open_client(server.url, room, player="p", auto_resume=False)
        os.kill(parent, signal.SIGKILL)
        assert (await closed(client, seconds=20)).code == 1001  # the workers' graceful shutdown
        wait_until(lambda: not any(Path(f"/proc/{w}").exists() and _alive(w) for w in workers), 20, "workers gone")
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # not a zombie
    except OSError:
        return False
