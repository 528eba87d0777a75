"""The Redis backplane on a real 3-master Redis Cluster (sharded pub/sub)."""

from __future__ import annotations

import re

import pytest
from relay_client import Event, Join, State, connect, open_client

from tests.helpers import next_of
from tests.redisproc import RedisClusterProcs, command, ready, wait_until
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
