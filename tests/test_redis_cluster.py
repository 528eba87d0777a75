"""The Redis backplane on a real 3-master Redis Cluster (sharded pub/sub)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time

import pytest
import redis
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, TryAgainError
from relay_client import Error, Event, Join, State, connect, open_client

from relay.backplane.redis_link import cluster_moving
from tests.helpers import next_of
from tests.redisproc import RedisClusterProcs, command, ready, wait_until
from tests.relayproc import timeout
from tests.test_e2e_order import MOVES, one_gapless_order, watch_senders

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]


def shard_of(cluster, key: str) -> int:
    """The port of the master that owns ``key`` (the others answer -MOVED)."""
    for master in cluster.masters:
        if command(master.port, "EXISTS", key).startswith(b":"):
            return master.port
    raise AssertionError(f"no master holds {key}")


async def test_rooms_on_every_shard_relay_in_one_order(redis_cluster, redis_relays):
    a, b = redis_relays(redis_cluster.url, 2)
    rooms = [f"cluster:room-{i}" for i in range(6)]
    for name in rooms:
        async with connect(a.url, name, player="x") as x, connect(b.url, name, player="y") as y:
            assert (await next_of(x, Join)).player == "y"
            y.send_state("pos", name)
            x.send_event(name)
            assert (await next_of(x, State)).data == name
            assert (await next_of(y, Event)).data == name
    # A room's keys carry its hash tag: all on one shard. Together, the rooms used every shard.
    owners = {shard_of(redis_cluster, f"{{relay:{name}}}:meta") for name in rooms}
    assert len(owners) == 3, owners


async def test_one_order_across_two_relays_on_a_cluster(redis_cluster, redis_relays, room):
    a, b = redis_relays(redis_cluster.url, 2)
    async with connect(a.url, room, player="w1") as w1, connect(b.url, room, player="w2") as w2:
        senders = [await open_client((a, b)[i % 2].url, room, player=f"s{i}") for i in range(2)]
        try:
            seen1, seen2 = await watch_senders((w1, w2), senders)
            late = await open_client(b.url, room, player="late")  # its snapshot comes from the room's shard
            assert {actor: v["score"][1] for actor, v in late.welcome.snapshot.items()} == {
                s.actor: MOVES - 1 for s in senders
            }
            await late.close()
        finally:
            for s in senders:
                await s.close()
    one_gapless_order(seen1, seen2)
    assert a.get_json("/rooms")["rooms"] == []  # everyone left: the room is gone from every shard


async def test_a_player_who_leaves_while_the_cluster_is_unreachable_is_let_go(redis_relays, room):
    cluster = RedisClusterProcs().start()  # its own: one of its masters is killed
    try:
        (a,) = redis_relays(cluster.url, 1)
        client = await open_client(a.url, room, player="x", auto_resume=False)
        cluster.masters[0].stop()  # the node the relay reconnects through
        wait_until(lambda: not ready(a), 15, "readyz to report the outage")
        await client.close()  # the room is left empty while the backplane is down
        wait_until(lambda: open_connections(a) == 0, 10, "the relay to let the connection go")
        a.log.seek(0)
        assert b"Traceback" not in a.log.read()
    finally:
        cluster.cleanup()


def open_connections(relay) -> float:
    found = re.search(r"^relay_connections_open (\S+)$", relay.get_text("/metrics"), re.MULTILINE)
    assert found is not None
    return float(found.group(1))


def move_slot(cluster, key: str, pause_s: float = 0.0) -> int:
    """Move ``key``'s slot, keys and all, to another master, as ``redis-cli --cluster
    reshard`` does (``pause_s`` between keys: a slow one); the port of its new master."""
    source = shard_of(cluster, key)
    target = next(m.port for m in cluster.masters if m.port != source)
    src, dst = redis.Redis(port=source), redis.Redis(port=target)
    try:
        slot = src.cluster("KEYSLOT", key)
        src_id, dst_id = src.cluster("MYID").decode(), dst.cluster("MYID").decode()
        dst.cluster("SETSLOT", slot, "IMPORTING", src_id)
        src.cluster("SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.cluster("GETKEYSINSLOT", slot, 1 if pause_s else 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            time.sleep(pause_s)  # a slow reshard, key by key
        for master in cluster.masters:
            with redis.Redis(port=master.port) as r:
                r.cluster("SETSLOT", slot, "NODE", dst_id)
    finally:
        src.close()
        dst.close()
    return target


async def until_received(sender, receiver, seconds: float = 20) -> str:
    """Send moves until one reaches ``receiver`` (some may be refused as unavailable meanwhile)."""
    async with asyncio.timeout(timeout(seconds)):
        for i in itertools.count():
            sender.send_event(f"after-{i}")
            try:
                async with asyncio.timeout(0.5):
                    while True:
                        message = await receiver.recv()
                        if isinstance(message, Event) and str(message.data).startswith("after-"):
                            return str(message.data)
            except TimeoutError:
                continue
    raise AssertionError("unreachable")


async def test_a_room_whose_slot_moves_to_another_shard_plays_on(redis_relays, room):
    cluster = RedisClusterProcs().start()  # its own: its slot map is changed
    try:
        a, b = redis_relays(cluster.url, 2)
        async with connect(a.url, room, player="x") as x, connect(b.url, room, player="y") as y:
            await next_of(x, Join)
            x.send_event("before")
            assert (await next_of(y, Event)).data == "before"
            target = move_slot(cluster, f"{{relay:{room}}}:meta")
            # Redis ends both nodes' subscriptions to the room: they follow it to its new shard.
            await until_received(x, y)
            y.send_event("back")
            assert (await next_of(x, Event)).data == "back"
            assert shard_of(cluster, f"{{relay:{room}}}:meta") == target
    finally:
        cluster.cleanup()


def relay_connections(cluster, relay) -> int:
    """The relay's connections to the running Redis servers (it names them relay:PORT)."""
    total = 0
    for server in cluster.servers:
        if server.proc is not None:
            with redis.Redis(port=server.port) as r:
                total += sum(1 for c in r.client_list() if c.get("name") == f"relay:{relay.port}")
    return total


def owner_of(cluster, key: str):
    """The master serving ``key``'s slot, from the cluster's slot map."""
    with redis.Redis(port=cluster.masters[0].port) as r:
        slot = r.cluster("KEYSLOT", key)
        for start, end, primary, *_ in r.cluster("SLOTS"):  # [start, end, [host, port, id], replicas...]
            if start <= slot <= end:
                return next(m for m in cluster.servers if m.port == primary[1])
    raise AssertionError(f"no master serves {key}")


async def test_a_slow_reshard_of_a_played_room_loses_nothing_and_leaves_no_ghost(redis_relays, room):
    # Moved key by key, the room's keys are split between two masters for a while: a
    # script run then must fail before it writes anything, and run again afterwards.
    cluster = RedisClusterProcs().start()
    try:
        a, b = redis_relays(cluster.url, 2)
        async with connect(a.url, room, player="x", echo=True) as x, connect(b.url, room, player="y") as y:
            await next_of(x, Join)
            x.send_state("hp", 0)
            assert (await next_of(y, State)).data == 0
            assert (await next_of(x, State)).data == 0  # its echo
            mover = asyncio.create_task(asyncio.to_thread(move_slot, cluster, f"{{relay:{room}}}:meta", 0.3))
            sent, answered = [], {}
            while not mover.done():
                seq = x.send_state("hp", len(sent) + 1)  # a STATE: its snapshot key is written too
                sent.append(seq)
                await asyncio.sleep(0.05)
            await mover
            await until_received(x, y)  # the room plays on, on its new master
            async with asyncio.timeout(timeout(10)):
                while len(answered) < len(sent):
                    m = await x.recv()
                    if isinstance(m, State) and m.actor == x.actor:
                        answered.setdefault(m.data, "echoed")
                    elif isinstance(m, Error) and m.ref_seq in sent:
                        answered.setdefault(sent.index(m.ref_seq) + 1, m.code)
            assert set(answered) == set(range(1, len(sent) + 1))  # each: relayed, or refused with ERROR
            async with connect(b.url, room, player="late") as late:
                assert sorted(m.player for m in late.members.values()) == ["late", "x", "y"]
                echoed = max(v for v, how in answered.items() if how == "echoed")
                assert late.snapshot[x.actor]["hp"] == echoed  # no value the members never got
    finally:
        cluster.cleanup()


async def test_a_relay_reconnects_through_another_node_when_the_one_in_its_url_dies(redis_relays, room):
    cluster = RedisClusterProcs(replicas=1).start()
    x = None
    try:
        named = owner_of(cluster, f"{{relay:{room}}}:meta")  # the relay's URL names the room's master
        (a,) = redis_relays(named.url, 1)
        x = await open_client(a.url, room, player="x")  # the node subscribes on the room's master
        before = relay_connections(cluster, a)
        named.stop()  # that subscription breaks; a replica takes the master's slots over
        cluster.wait_ok(20)
        wait_until(lambda: ready(a), 30, "the relay back, through another node of the Cluster")
        async with connect(a.url, room, player="y") as y, connect(a.url, room, player="z") as z:
            y.send_event("hi")
            assert (await next_of(z, Event)).data == "hi"
        # The failed reconnects' clients were closed (they used to leave about 9 behind).
        assert relay_connections(cluster, a) <= before + 4  # a few more: its new subscriptions
    finally:
        if x is not None:
            with contextlib.suppress(Exception):
                await x.close()
        cluster.cleanup()


async def test_a_room_plays_on_through_a_manual_failover_of_its_shard(redis_relays, room):
    cluster = RedisClusterProcs(replicas=1).start()
    try:
        master = owner_of(cluster, f"{{relay:{room}}}:meta")
        replica = next(s for s in cluster.others if redis.Redis(port=s.port).info("replication")["master_port"] == master.port)
        a, b = redis_relays(cluster.url, 2)
        async with connect(a.url, room, player="x") as x, connect(b.url, room, player="y") as y:
            await next_of(x, Join)
            x.send_event("before")
            assert (await next_of(y, Event)).data == "before"
            with redis.Redis(port=replica.port) as r:
                r.execute_command("CLUSTER", "FAILOVER")  # maintenance: the old master steps down
            # Redis ends the subscriptions on the old master: the nodes follow the slots.
            await until_received(x, y)
            y.send_event("back")
            assert (await next_of(x, Event)).data == "back"
            assert redis.Redis(port=replica.port).role()[0] == b"master"  # it did fail over
    finally:
        cluster.cleanup()


async def test_a_command_refused_because_its_slot_is_moving_is_told_from_a_script_bug():
    assert cluster_moving(MovedError("3999 127.0.0.1:6381"))
    assert cluster_moving(AskError("3999 127.0.0.1:6381"))
    assert cluster_moving(TryAgainError("Multiple keys request during rehashing of slot"))
    assert cluster_moving(ClusterDownError("The cluster is down"))
    assert cluster_moving(ResponseError("Script attempted to access a non local key in a cluster node script"))
    assert not cluster_moving(ResponseError("ERR user_script:12: attempt to compare nil with number"))
    assert not cluster_moving(ConnectionError("gone"))
