"""Node liveness for the Redis backplane: heartbeats, and removing dead nodes' players.

Each relay process is a node with a random id. It keeps a heartbeat key that
expires after ``0.6 * node_ttl_s`` and is refreshed every ``0.15 * node_ttl_s``,
and a set of the rooms where it has players. Every node looks for nodes whose
heartbeat expired every ``0.2 * node_ttl_s`` and holds their players' seats
for ``resume_window_s`` (a resume on any node takes one over), then removes
them (LEAVE with 1006, in each room's order): a node that dies without warning
has its players gone from every room within ``node_ttl_s + resume_window_s``,
unless they come back. This is idempotent, so several nodes reaping the same
dead one at once do no harm.

These keys are not room keys: in a Redis Cluster they live on whichever shard
their own slot names, and are written by plain commands, never by a room script.
"""

from __future__ import annotations

import logging
from typing import Any

from relay.backplane.redis_link import RedisLink

log = logging.getLogger("relay.redis")


class Nodes:
    """This node's heartbeat and room set, and the reaper of the others."""

    def __init__(self, link: RedisLink, *, prefix: str, node_id: str, ttl_s: float) -> None:
        self.link = link
        self.prefix = prefix
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.nodes_key = f"{prefix}:nodes"  # every node that may have players somewhere
        self.rooms_key = self.rooms_key_of(node_id)

    def heartbeat_key(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    def rooms_key_of(self, node: str) -> str:
        return f"{self.prefix}:node:{node}:rooms"

    async def beat(self) -> bool:
        """Refresh the heartbeat; True when it had expired (the others may have taken this
        node for dead, and hold its seats), or this is the first."""
        pipe = self.link.pipeline()
        pipe.set(self.heartbeat_key(self.node_id), 1, px=max(int(self.ttl_s * 600), 100), get=True)
        pipe.sadd(self.nodes_key, self.node_id)
        before, _ = await pipe.execute()
        return before is None

    async def goodbye(self, *, seated: bool) -> None:
        """A clean shutdown: stop beating; forget the node unless it still has players."""
        pipe = self.link.pipeline()
        pipe.delete(self.heartbeat_key(self.node_id))
        if not seated:
            pipe.delete(self.rooms_key)
            pipe.srem(self.nodes_key, self.node_id)
        await pipe.execute()

    async def reap(self, release_script: str, room_meta_key: Any, history: int, *, hold_ms: int) -> int:
        """Hold, then remove, the seats of nodes whose heartbeat expired; how many were removed.

        A gone node's seats are held ``hold_ms`` for their players to resume on
        another node (0: removed at once); the node stays listed until none is held.
        """
        client = self.link.client
        nodes = [n.decode() for n in await client.smembers(self.nodes_key)]
        others = [n for n in nodes if n != self.node_id]
        if not others:
            return 0
        pipe = self.link.pipeline()
        for node in others:
            pipe.exists(self.heartbeat_key(node))
        dead = [n for n, alive in zip(others, await pipe.execute()) if not alive]
        total = 0
        for node in dead:
            rooms = [room.decode() for room in await client.smembers(self.rooms_key_of(node))]
            removed = held = 0
            if rooms:
                pipe = self.link.pipeline()
                for room in rooms:
                    self.link.evalsha(pipe, release_script, room_meta_key(room), [history, node + "/", 1006, hold_ms, 0])
                replies = await pipe.execute()
                removed = sum(reply[0] for reply in replies)
                held = sum(reply[1] for reply in replies)
            total += removed
            if removed:
                log.warning("redis backplane: node %s is gone; removed %d of its players", node, removed)
            if held:
                continue  # looked at again on the next round, until their window ends
            pipe = self.link.pipeline()
            pipe.delete(self.rooms_key_of(node))
            pipe.srem(self.nodes_key, node)
            await pipe.execute()
        return total

    async def rooms(self) -> list[str]:
        """Every room where some node has players."""
        client = self.link.client
        nodes = [n.decode() for n in await client.smembers(self.nodes_key)]
        pipe = self.link.pipeline()
        for node in nodes:
            pipe.smembers(self.rooms_key_of(node))
        return sorted({room.decode() for rooms in await pipe.execute() for room in rooms}) if nodes else []
