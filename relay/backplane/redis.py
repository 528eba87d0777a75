"""The Redis backplane: many relay processes, on many machines, share rooms.

Redis is each room's sequencer. Every change to a room (a batch of moves, a
join, a leave) is one Lua script call (see :mod:`relay.backplane.redis_scripts`)
that gives its entries the room's next offsets, applies them to the room's
members and snapshot, and publishes them as one message on the room's channel.
Every node with players in the room, the publishing node too, delivers from its
subscription: one delivery path, one order everywhere.

Round trips: :meth:`RedisBackplane.publish` never waits. It appends to the
room's queue of operations, and one flusher task sends whatever is queued, for
every room, as one pipeline (one script call per room and operation), then
the next pipeline with whatever queued meanwhile: batching without added delay
when idle. A room's operations keep their order (a room is one Cluster slot,
so one connection). Joins go through the same queue, so moves read before a
join are sequenced before its JOIN.

Failures, the guarantees of :mod:`relay.backplane.base` kept across them:

* Redis unreachable: :meth:`ready` is false (``/readyz`` answers 503), new
  moves are refused by the node (ERROR ``unavailable``), joins fail (close
  1013), and a supervisor reconnects with backoff. Operations already queued
  are sent when Redis is back; a batch whose reply was lost is sent again and
  the script skips it if it had been applied (batch numbers per node).
* A cut subscription (Redis restarted, or it dropped a slow subscriber): after
  resubscribing, each room is repaired from its recent history in Redis, so
  nothing is missed; when the history no longer covers the gap, or the room is
  gone or has a new epoch (a restarted Redis), the node is told to resync the
  room (its clients are closed with 1011 and rejoin with a fresh snapshot).
* A node that dies: its heartbeat key expires, and within ``node_ttl_s`` a
  live node holds its players' seats for ``resume_window_s`` (they may resume
  on any node), then removes them (LEAVE with 1006). A node shutting down hands
  its seats over the same way, at once (LEAVE with 1001 when nobody resumes).

Resume on any node: a seat's resume token is ``<actor>.<secret>``, the secret
kept in the room's keys; :meth:`takeover` moves the seat to the resuming node in
one script, and the node that served it hears so on the room's channel and lets
it go. Moves the old node still had in flight for that seat are not taken (the
player re-sends them after WELCOME's ``last_seq``, which the scripts keep).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
from redis.exceptions import NoScriptError, ResponseError

from relay import protocol
from relay.backplane import redis_scripts as lua
from relay.backplane.base import Joined, Receiver, RoomFull, Unavailable
from relay.backplane.redis_link import FAILURES, RedisLink, cluster_moving
from relay.backplane.redis_nodes import Nodes
from relay.config import Settings
from relay.metrics import BackplaneStats
from relay.protocol import CloseCode
from relay.room import Entry, Member, RoomState, new_epoch

log = logging.getLogger("relay.redis")

MAX_OPS_PER_PIPELINE = 2000  # room operations in one round trip; more wait for the next
MAX_BATCH_ENTRIES = 1000  # entries in one script call (and one published message)
STABLE_S = 1.0  # a link that breaks sooner after connecting is reconnected with backoff


@dataclass(eq=False, slots=True)
class _Op:
    """One script call (or command) for a room, in the room's queue."""

    kind: str  # moves, join, takeover, leave, cancel, release, claim, forget, direct
    epoch: str = ""
    entries: list[Entry] = field(default_factory=list)
    seqs: dict[int, int] | None = None  # moves: the last seq taken from each seat
    args: list[Any] = field(default_factory=list)
    batch: int = 0  # set when first sent; kept on retries (the script skips repeats)
    future: asyncio.Future[Any] | None = None


@dataclass(eq=False, slots=True)
class _Room:
    name: str
    tag: str
    channel: bytes
    subscribed: bool = False
    live: bool = False  # the current subscription is confirmed: messages now are this node's to deliver
    confirmed: asyncio.Future[None] | None = None  # joins wait for it
    epoch: str | None = None  # the incarnation this node's seats are in
    floor: int = 0  # the highest offset delivered here (or the first join's): gaps show above it
    retired: set[str] = field(default_factory=set)  # older epochs: their stragglers are dropped
    holding: list[list[Any]] | None = None  # messages held while the room is being repaired
    held_directs: list[list[Any]] = field(default_factory=list)  # and its numbered DIRECTs
    direct_seen: int = 0  # the number of the last DIRECT seen on the channel (this epoch)
    seated: dict[int, str] = field(default_factory=dict)  # actor -> epoch, for seats of this node
    ops: deque[_Op] = field(default_factory=deque)

    @property
    def meta(self) -> str:
        return self.tag + ":meta"


class RedisBackplane:
    name = "redis"
    hands_off_seats = True  # seats live in Redis: any node can take one over

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.node_id = secrets.token_hex(8)
        self.stats = BackplaneStats()
        self.link = RedisLink(
            settings.redis,
            timeout=settings.redis_timeout_s,
            name=f"relay:{settings.port}",
            on_message=self._on_message,
            on_subscribed=self._on_subscribed,
            on_lost=self._lost_link,
        )
        names = ("SEQUENCE", "DIRECT", "JOIN", "TAKEOVER", "LEAVE", "RELEASE_SEATED_BY", "RECLAIM", "READ")
        sharded_src = {name: getattr(lua, name) for name in names}
        self._sha = {
            (name, sharded): self.link.script(lua.source(body, sharded=sharded))
            for name, body in sharded_src.items()
            for sharded in (False, True)
        }
        self.nodes = Nodes(self.link, prefix=self.prefix, node_id=self.node_id, ttl_s=settings.node_ttl_s)
        self._receiver: Receiver | None = None
        self._rooms: dict[str, _Room] = {}
        self._by_channel: dict[bytes, _Room] = {}
        self._dirty: dict[str, _Room] = {}
        self._batches = itertools.count(1)
        self._up = False
        self._closed = False
        self._seats_held = False  # by hold_seats, at shutdown
        self._broken = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[None]] = set()

    # --- keys ----------------------------------------------------------------------------

    def _room(self, room: str) -> _Room:
        r = self._rooms.get(room)
        if r is None:
            tag = f"{{{self.prefix}:{room}}}"  # the hash tag: one room, one Cluster slot
            r = self._rooms[room] = _Room(room, tag, (tag + ":ch").encode())
        return r

    def _script(self, name: str) -> str:
        return self._sha[(name, self.link.sharded)]

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._broken.set()
        self._tasks = [
            asyncio.create_task(self._supervise()),
            asyncio.create_task(self._flush_forever()),
            asyncio.create_task(self._watch()),
        ]
        with contextlib.suppress(asyncio.TimeoutError):  # start anyway: readyz tells
            await asyncio.wait_for(self._until_up(), self.settings.redis_timeout_s)

    async def _until_up(self) -> None:
        while not self._up:
            await asyncio.sleep(0.01)  # start-up only: polling a flag set by the supervisor

    async def hold_seats(self) -> None:
        """This node is shutting down: hold its seats in Redis for their players to resume
        elsewhere, now, before their connections are closed. From here on a DIRECT to one
        of them is kept for its resume (DIRECT), where after its connection closed here it
        would have been published to nobody. Waits (bounded) until Redis has them held."""
        hold_ms = int(self.settings.resume_window_s * 1000)
        if hold_ms <= 0 or self._seats_held or not self._up:
            return  # (with Redis down, close() queues the hold behind what waits for it)
        self._seats_held = True
        loop = asyncio.get_running_loop()
        waits = []
        for r in list(self._rooms.values()):
            if r.seated:
                op = self._hold_op(hold_ms)
                op.future = loop.create_future()
                self._enqueue(r, op)
                waits.append(op.future)
        if waits:
            await asyncio.wait(waits, timeout=self.settings.shutdown_timeout_s)
            for future in waits:  # a failure was logged where it happened
                if future.done() and not future.cancelled():
                    future.exception()

    def _hold_op(self, hold_ms: int) -> _Op:
        """Hold this node's seats in a room for ``hold_ms``, for a resume elsewhere (1001 if none comes)."""
        return _Op("release", args=[self.node_id + "/", int(CloseCode.GOING_AWAY), hold_ms, 1])

    async def close(self) -> None:
        """Send what is queued (bounded), say goodbye, and disconnect."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        hold_ms = int(self.settings.resume_window_s * 1000)
        for r in list(self._rooms.values()):
            if r.seated and hold_ms > 0 and not self._seats_held:  # held in Redis, for a resume elsewhere
                self._enqueue(r, self._hold_op(hold_ms))
        while self._up and any(r.ops for r in self._rooms.values()) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)  # shutdown only: waiting for the flusher to drain
        if self._up and self.link.client is not None:
            with contextlib.suppress(*FAILURES):
                # Players still seated (or leaves not sent): stay listed, so others reap them soon.
                await self.nodes.goodbye(seated=any(r.seated or r.ops for r in self._rooms.values()))
        self._closed = True  # redis-py may turn a cancellation into a connection error: loops check this
        tasks = [*self._tasks, *self._spawned]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.redis_timeout_s)
        await self.link.close()
        self._up = False

    def ready(self) -> bool:
        return self._up

    # --- subscriptions -------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        if not self._up:
            raise Unavailable("the Redis backplane is unavailable")
        r = self._room(room)
        r.subscribed, r.live = True, False
        self._by_channel[r.channel] = r
        confirmed = r.confirmed = asyncio.get_running_loop().create_future()
        self._enqueue(r, _Op("claim"))
        try:
            await self.link.subscribe(r.channel)
        except Exception as exc:
            self._lost_link(exc)
            if not confirmed.done():
                confirmed.set_exception(Unavailable("the Redis backplane is unavailable"))
                confirmed.exception()  # retrieved: nobody else may be waiting
            raise Unavailable("the Redis backplane is unavailable") from exc
        if not confirmed.done():
            confirmed.set_result(None)

    async def unsubscribe(self, room: str) -> None:
        r = self._rooms.get(room)
        if r is None or not r.subscribed:
            return
        r.subscribed = r.live = False
        r.confirmed = None
        self._by_channel.pop(r.channel, None)
        r.epoch, r.floor, r.holding = None, 0, None
        r.retired.clear()
        self._enqueue(r, _Op("forget"))
        await self.link.unsubscribe(r.channel)

    # --- the room's operations -----------------------------------------------------------

    async def join(
        self, room: str, player: str, meta: dict[str, Any], *, max_players: int, secret: str = ""
    ) -> Joined:
        pack = protocol.pack
        args = [new_epoch(), self.node_id, 0, player, pack([player, meta]), pack(player) + pack(meta), max_players, secret]
        r, reply = await self._call(room, "join", args)
        if reply[0] == -3:
            raise RoomFull(room)
        _, actor, epoch, offset, members, snapshot = reply
        epoch = epoch.decode()
        self._adopt(r, epoch, offset)
        r.seated[actor] = epoch
        return Joined(
            member=Member(actor, player, meta),
            members=lua.decode_members(members),
            snapshot=lua.decode_snapshot(snapshot),
            offset=offset,
            epoch=epoch,
        )

    async def takeover(self, room: str, actor: int, secret: str, player: str) -> Joined | None:
        """Move a seat to this node (a resume here); None when the token names no seat of ``player``."""
        r, reply = await self._call(room, "takeover", [self.node_id, 0, actor, secret, player])
        if reply[0] != 1:
            return None
        _, epoch, offset, members, snapshot, last_seq, kept, lost = reply
        epoch = epoch.decode()
        self._adopt(r, epoch, offset)
        r.seated[actor] = epoch
        members = lua.decode_members(members)
        _, player, meta = next(m for m in members if m[0] == actor)
        return Joined(
            member=Member(actor, player, meta),
            members=members,
            snapshot=lua.decode_snapshot(snapshot),
            offset=offset,
            epoch=epoch,
            last_seq=int(last_seq) if last_seq is not None else None,
            directs=list(kept),
            directs_lost=int(lost),
        )

    async def _call(self, room: str, kind: str, args: list[Any]) -> tuple[_Room, Any]:
        """Run a join or a takeover in the room's queue, after its subscription; its reply."""
        if not self._up:
            raise Unavailable("the Redis backplane is unavailable")
        r = self._room(room)
        if r.confirmed is not None and not r.confirmed.done():
            await asyncio.shield(r.confirmed)  # another seat's subscribe: this must come after it
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(r, _Op(kind, args=args, future=future))
        return r, await future

    async def leave(self, room: str, actor: int, close_code: int) -> None:
        r = self._rooms.get(room)
        epoch = r.seated.pop(actor, None) if r is not None else None
        if r is not None and epoch is not None:  # only seats this node made, in their own epoch
            # int(): a CloseCode is an IntEnum, which Redis's packer would not take as a number
            self._enqueue(r, _Op("leave", epoch, args=[epoch, actor, int(close_code), self.node_id]))

    def publish(self, room: str, entries: list[Entry], seqs: dict[int, int] | None = None) -> None:
        r = self._room(room)
        last = r.ops[-1] if r.ops else None
        if (
            last is not None
            and last.kind == "moves"
            and not last.batch
            and last.epoch == r.epoch
            and len(last.entries) + len(entries) <= MAX_BATCH_ENTRIES
        ):
            last.entries.extend(entries)  # not sent yet: one script call for both
            if seqs:
                if last.seqs is None:
                    last.seqs = {}
                last.seqs.update(seqs)
            return
        self._enqueue(r, _Op("moves", r.epoch or "", entries=list(entries), seqs=seqs))

    def direct(self, room: str, to_actor: int, wire: bytes, from_actor: int | None = None, seq: int = 0) -> None:
        sender = "" if from_actor is None else from_actor
        message = protocol.pack([0, to_actor, wire])
        self._enqueue(self._room(room), _Op("direct", args=[sender, seq, message, to_actor, wire]))

    def _enqueue(self, r: _Room, op: _Op) -> None:
        r.ops.append(op)
        self._dirty[r.name] = r
        self._wake.set()

    # --- the flusher: one pipeline in flight -------------------------------------------

    async def _flush_forever(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty and self._up:
                try:
                    await self._flush_once()
                except Exception:  # a bug must not stop every room's traffic
                    log.exception("redis backplane: flush failed")
                    self.stats.errors["internal"] += 1
                    await asyncio.sleep(0.1)

    async def _flush_once(self) -> None:
        sent: list[tuple[_Room, list[_Op]]] = []
        commands: list[tuple[Any, ...]] = []
        budget = MAX_OPS_PER_PIPELINE
        rooms, self._dirty = list(self._dirty.values()), {}
        for r in rooms:
            ops: list[_Op] = []
            while r.ops and budget:
                op = r.ops.popleft()
                if not op.batch:
                    op.batch = next(self._batches)
                commands.append(self._command(r, op))
                ops.append(op)
                budget -= 1
            if r.ops:
                self._dirty[r.name] = r
            sent.append((r, ops))
        started = time.perf_counter()
        try:
            results = await self.link.execute(commands)
        except FAILURES as exc:
            self._requeue(sent, exc)
            self._lost_link(exc)
            return
        self.stats.round_trip(time.perf_counter() - started, sum(len(ops) for _, ops in sent))
        replies = iter(results)
        again: list[tuple[_Room, list[_Op]]] = []
        for r, ops in sent:
            retry = [op for op in ops if not self._settle(r, op, next(replies))]
            if retry:
                again.append((r, retry))
            elif not r.subscribed and not r.ops and not r.seated:
                self._rooms.pop(r.name, None)
        if not again:
            return
        self._requeue(again)
        moving = next((x for x in results if cluster_moving(x)), None)
        if any(isinstance(x, FAILURES) and not isinstance(x, ResponseError) for x in results):
            self._lost_link(ConnectionError("a Redis server did not answer"))
        elif moving is not None:  # reconnect: a fresh cluster map, subscriptions where the slots are now
            self._lost_link(ConnectionError(f"a Cluster slot is moving: {moving}"))
        else:  # NOSCRIPT: a restarted Redis forgot the scripts
            with contextlib.suppress(*FAILURES):
                await self.link.load_scripts()

    def _command(self, r: _Room, op: _Op) -> tuple[Any, ...]:
        history = self.settings.history_size
        kind = op.kind
        if kind == "moves":
            seqs = b"" if not op.seqs else protocol.pack([x for pair in op.seqs.items() for x in pair])
            args: list[Any] = [history, op.epoch, self.node_id, op.batch, seqs]
            for e in op.entries:
                if e.kind is protocol.STATE:
                    args += (2, e.actor, protocol.pack(e.key), len(e.value or b""), e.head)
                else:
                    args += (1, e.actor, "", len(e.value or b""), e.head)
            self.stats.batches += 1
            self.stats.entries += len(op.entries)
            return ("EVALSHA", self._script("SEQUENCE"), 1, r.meta, *args)
        if kind == "join":
            op.args[2] = op.batch
            return ("EVALSHA", self._script("JOIN"), 1, r.meta, history, *op.args)
        if kind == "takeover":
            op.args[1] = op.batch
            return ("EVALSHA", self._script("TAKEOVER"), 1, r.meta, history, *op.args)
        if kind == "leave":
            return ("EVALSHA", self._script("LEAVE"), 1, r.meta, history, *op.args)
        if kind in ("cancel", "release"):
            return ("EVALSHA", self._script("RELEASE_SEATED_BY"), 1, r.meta, history, *op.args)
        if kind == "claim":
            return ("SADD", self.nodes.rooms_key, r.name)
        if kind == "forget":
            return ("SREM", self.nodes.rooms_key, r.name)
        return (
            "EVALSHA", self._script("DIRECT"), 1, r.meta, history, self.node_id, *op.args,
            self.settings.max_held_directs,
        )

    def _settle(self, r: _Room, op: _Op, result: Any) -> bool:
        """Act on one operation's reply; False when it must be sent again."""
        if cluster_moving(result):  # not run
            if op.kind not in ("join", "takeover"):
                return False  # again, after a reconnect
            # The player waiting for it is told now (1013), not after the reconnect.
            if op.future is not None and not op.future.done():
                op.future.set_exception(Unavailable(f"the Redis Cluster is moving a slot: {result}"))
            return True
        if isinstance(result, NoScriptError):
            return False  # again, once the scripts are loaded
        if isinstance(result, FAILURES) and not isinstance(result, ResponseError):
            if op.kind in ("join", "takeover"):  # in a Cluster, one shard can fail alone
                self._join_lost(op, result)
            return False
        if isinstance(result, BaseException):  # a script error: a bug, not an outage
            log.error("redis backplane: %s on %s failed: %s", op.kind, r.name, result)
            self.stats.errors["script"] += 1
            if op.future is not None and not op.future.done():
                op.future.set_exception(Unavailable(f"the backplane failed: {result}"))
            elif op.kind == "moves" and r.subscribed:
                self._resync(r, "a batch could not be sequenced")  # never lose moves silently
            return True
        if op.kind == "moves" and len(result) > 2:  # seats resumed elsewhere (notice missed), or gone
            assert self._receiver is not None
            for actor in result[2:]:
                if actor < 0:
                    if r.seated.pop(-actor, None) is not None:
                        self._receiver.seat_gone(r.name, -actor, result[1])
                elif r.seated.pop(actor, None) is not None:
                    self._receiver.seat_moved(r.name, actor)
        if op.kind == "moves" and result[0] < 0:
            self.stats.errors["stale_batch"] += 1
            if op.epoch and op.epoch == r.epoch and r.subscribed:
                self._resync(r, "the room is gone from Redis" if result[0] == -1 else "the room has a new epoch")
        elif op.kind in ("join", "takeover"):
            if op.future is not None and not op.future.done():
                op.future.set_result(result)
            elif result[0] == 1:  # the player gave up waiting: take its seat back out
                if op.kind == "join":
                    self._enqueue(r, _Op("leave", args=[result[2].decode(), result[1], 1006, self.node_id]))
                else:  # exactly this takeover's seat (a later one here may hold it now)
                    self._enqueue(r, _Op("cancel", args=[f"{self.node_id}/{op.batch}", 1006, 0, 0]))
        elif op.future is not None and not op.future.done():  # someone waits for it to be applied
            op.future.set_result(result)
        return True

    def _join_lost(self, op: _Op, exc: BaseException) -> None:
        """A join whose reply was lost may have been applied: fail it, and undo it later."""
        if op.future is not None and not op.future.done():
            op.future.set_exception(Unavailable(f"the Redis backplane is unavailable: {exc}"))
        op.kind, op.args, op.future = "cancel", [f"{self.node_id}/{op.batch}", 1011, 0, 0], None

    def _requeue(self, sent: list[tuple[_Room, list[_Op]]], exc: BaseException | None = None) -> None:
        """Put operations back at the front of their rooms' queues, in order."""
        for r, ops in sent:
            if exc is not None:
                for op in ops:
                    if op.kind in ("join", "takeover"):
                        self._join_lost(op, exc)
            r.ops.extendleft(reversed(ops))
            self._dirty[r.name] = r

    # --- the room order in -------------------------------------------------------------

    def _on_subscribed(self, channel: bytes) -> None:
        r = self._by_channel.get(channel)
        if r is not None:
            r.live = True

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        r = self._by_channel.get(channel)
        if r is None or not r.live:
            return  # a straggler of an earlier subscription of the room
        try:
            items = msgpack.unpackb(payload, raw=True)
        except ValueError:
            self.stats.errors["payload"] += 1
            return
        if type(items[0]) is int:
            assert self._receiver is not None
            if items[0] == 0:  # [0, to_actor, wire, number]: a DIRECT
                if r.holding is not None and len(items) > 3:
                    r.held_directs.append(items)  # after those the repair finds it missed
                else:
                    self._direct(r, items)
            elif items[0] == 1:  # [1, actor, node]: a seat moved to a node
                if items[2].decode() == self.node_id:
                    self._receiver.seat_arrived(r.name, items[1])
                elif r.seated.pop(items[1], None) is not None:
                    self._receiver.seat_moved(r.name, items[1])
        elif r.holding is not None:
            r.holding.append(items)
        else:
            try:
                self._deliver(r, items)
            except Exception:  # a bug: one room's members rejoin; the link and other rooms go on
                log.exception("redis backplane: delivering room %s failed", r.name)
                self._resync(r, "a batch could not be delivered")

    def _direct(self, r: _Room, items: list[Any]) -> None:
        """Deliver ``[0, to_actor, wire, number]``, once: a repair may have read it already.
        (Those a node passes on when a seat moves, or takes back, have no number.)"""
        if len(items) > 3:
            if items[3] <= r.direct_seen:
                return
            r.direct_seen = items[3]
        assert self._receiver is not None
        self._receiver.deliver_direct(r.name, items[1], items[2])

    def _deliver(self, r: _Room, items: list[Any]) -> None:
        epoch, first = items[0].decode(), items[1]
        last = first + (len(items) - 2) // 5 - 1
        if epoch != r.epoch:
            if epoch in r.retired:
                return  # a straggler of an incarnation this node has left behind
            if r.epoch is not None:
                self._resync(r, "the room has a new epoch")
                r.retired.add(r.epoch)
            r.epoch, r.floor, r.direct_seen = epoch, 0, 0  # DIRECTs are numbered anew too
        elif r.floor and first > r.floor + 1:
            self.stats.errors["gap"] += 1
            r.holding = [items]
            self._spawn(self._repair(r))
            return
        r.floor = max(r.floor, last)
        assert self._receiver is not None
        self._receiver.deliver(r.name, lua.decode_batch(items, first))

    def _adopt(self, r: _Room, epoch: str, offset: int) -> None:
        """A join reply: the epoch this node's seats are in, and a floor for gap detection."""
        if r.epoch != epoch:
            if r.epoch is not None:
                self._resync(r, "the room has a new epoch")
                r.retired.add(r.epoch)
            r.epoch, r.floor, r.direct_seen = epoch, offset, 0
        elif not r.floor:
            r.floor = offset

    def _resync(self, r: _Room, why: str) -> None:
        log.warning("redis backplane: resynchronising room %s: %s", r.name, why)
        self.stats.resyncs += 1
        assert self._receiver is not None
        self._receiver.resync(r.name)

    async def _repair(self, r: _Room) -> None:
        """Deliver what a room missed, from its history in Redis; or resync it."""
        if r.holding is None:
            r.holding = []
        try:
            reply = await self.link.client.evalsha(
                self._script("READ"), 1, r.meta, self.settings.history_size, r.floor if r.epoch else -1,
                self.node_id, r.direct_seen,
            )
        except Exception as exc:  # noqa: BLE001
            self._lost_link(exc)  # the next reconnect repairs it (holding stays on until then)
            return
        held, r.holding = r.holding, None
        held_directs, r.held_directs = r.held_directs, []
        if not r.subscribed:
            return
        self.stats.repairs += 1
        if not reply or reply[0].decode() != r.epoch:
            if r.epoch is not None:
                self._resync(r, "the room is gone from Redis" if not reply else "the room has a new epoch")
                r.retired.add(r.epoch)
            r.epoch, r.floor, r.direct_seen = None, 0, 0
        else:
            # The DIRECTs Redis published for this node's seats while it was not
            # listening, then those that came in while the repair read them.
            missed = reply[6] if len(reply) > 6 else []
            for i in range(0, len(missed), 3):
                self._direct(r, [0, missed[i + 1], missed[i + 2], missed[i]])
            for items in held_directs:
                self._direct(r, items)
            offset, batches = reply[1], [msgpack.unpackb(b, raw=True) for b in reply[4]]
            if offset > r.floor and (not batches or batches[0][1] > r.floor + 1):
                self._resync(r, "its history in Redis no longer covers what this node missed")
                r.floor = offset  # the room goes on from here; its seats here rejoin
                held = [items for items in held if items[1] > offset]
            else:
                self.stats.replayed += sum(
                    1 for b in batches for i in range((len(b) - 2) // 5) if b[1] + i > r.floor
                )
                held = batches + held
        for items in held:
            if items[0].decode() != r.epoch or items[1] + (len(items) - 2) // 5 - 1 > r.floor:
                self._deliver(r, items)

    # --- liveness: reconnect, heartbeat, reaping -------------------------------------------

    def _lost_link(self, exc: BaseException) -> None:
        if self._closed:
            return
        if self._up:
            why = str(exc) or type(exc).__name__  # a timeout has no message of its own
            log.warning("redis backplane: connection lost (%s); moves are refused until it is back", why)
            self.stats.errors["connection"] += 1
        self._up = False
        self._broken.set()

    async def _supervise(self) -> None:
        delay = 0.05
        connected_at: float | None = None  # when the link last came up, while it is up
        backoff = False  # it broke while connecting, or right after (a slot still moving...)
        while not self._closed:
            await self._broken.wait()
            if connected_at is not None:
                backoff = time.monotonic() - connected_at < STABLE_S
                connected_at = None
                if not backoff:
                    delay = 0.05  # it was up a good while: come back at once
            if backoff:  # not a tight loop
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)
            self._broken.clear()  # after the wait: what the old link's tasks reported meanwhile is old news
            for r in self._rooms.values():
                r.live = False
                if r.subscribed and r.holding is None:
                    r.holding = []  # hold deliveries until the room is repaired
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # whatever it was, try again later
                log.info("redis backplane: reconnect failed (%s); next try in %.2fs", exc, delay)
                self._broken.set()
                backoff = True
                continue
            if self._broken.is_set():
                backoff = True
                continue  # it broke again while connecting
            connected_at = time.monotonic()
            self._up = True
            self.stats.connects += 1
            log.info("redis backplane: connected (node %s, cluster: %s)", self.node_id, self.link.sharded)
            self._wake.set()
            for r in list(self._rooms.values()):
                if r.subscribed:
                    self._spawn(self._repair(r))

    async def _connect(self) -> None:
        await self.link.connect()
        await self.nodes.beat()
        rooms = [r for r in self._rooms.values() if r.subscribed]
        await asyncio.gather(*(self.link.subscribe(r.channel) for r in rooms))
        if rooms:
            await self.link.client.sadd(self.nodes.rooms_key, *(r.name for r in rooms))

    async def _watch(self) -> None:
        """Heartbeat every 0.15 node_ttl_s; look for dead nodes every 0.2 node_ttl_s."""
        ttl = self.settings.node_ttl_s
        next_reap = 0.0
        reclaims = 0
        while not self._closed:
            await asyncio.sleep(ttl * 0.15)
            if not self._up:
                continue
            try:
                if await self.nodes.beat():
                    reclaims = 2  # twice: a reaper that saw this node dead may hold its seats just after the first
                if reclaims:
                    await self._reclaim()
                    reclaims -= 1
                if not self.link.subscribers_up():
                    raise ConnectionError("a subscription was cut")
                await self.link.ping_subscribers()
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + ttl * 0.2
                    self.stats.reaped += await self.nodes.reap(
                        self._script("RELEASE_SEATED_BY"),
                        self._room_meta,
                        self.settings.history_size,
                        hold_ms=int(self.settings.resume_window_s * 1000),
                    )
            except Exception as exc:  # noqa: BLE001  # this loop must outlive anything: it is the heartbeat
                self._lost_link(exc)

    async def _reclaim(self) -> None:
        """Take back this node's seats that others hold for a resume elsewhere (see RECLAIM)."""
        rooms = [r for r in self._rooms.values() if r.seated]
        if not rooms:
            return
        pipe = self.link.pipeline()
        for r in rooms:
            self.link.evalsha(pipe, self._script("RECLAIM"), r.meta, [self.settings.history_size, self.node_id + "/"])
        taken = sum(await pipe.execute())
        if taken:
            log.warning("redis backplane: this node was taken for dead; took back %d of its seats", taken)

    def _room_meta(self, room: str) -> str:
        return f"{{{self.prefix}:{room}}}:meta"

    async def history(self, room: str, after: int, epoch: str) -> list[Entry] | None:
        """The entries after ``after`` up to what this node has delivered (so that the
        live stream goes on right after them), or None when Redis cannot give them all."""
        r = self._rooms.get(room)
        if r is None or not self._up or r.epoch != epoch or not 0 <= after <= r.floor:
            return None
        while True:
            try:
                reply = await self.link.client.evalsha(
                    self._script("READ"), 1, r.meta, self.settings.history_size, after
                )
            except FAILURES:
                return None
            if not reply or reply[0].decode() != epoch or r.epoch != epoch or after > reply[1]:
                return None
            if reply[1] >= r.floor:  # else deliveries overtook the read: read again
                break
        batches = [msgpack.unpackb(b, raw=True) for b in reply[4]]
        if after < r.floor and (not batches or batches[0][1] > after + 1):
            return None
        undos = reply[5] if len(reply) > 5 else [b""] * len(batches)
        return [
            e
            for b, undo in zip(batches, undos)
            for e in lua.decode_batch(b, b[1], undo)
            if after < e.offset <= r.floor
        ]

    # --- reading rooms (HTTP) ----------------------------------------------------------

    # Redis can fail during a read that began while it was up: the caller (HTTP) gets
    # Unavailable, a 503, not the error.

    async def rooms(self) -> dict[str, int]:
        if not self._up:
            raise Unavailable("the Redis backplane is unavailable")
        try:
            names = await self.nodes.rooms()
            pipe = self.link.pipeline()
            for room in names:
                pipe.hlen(f"{{{self.prefix}:{room}}}:mem")
            counts = await pipe.execute() if names else []
        except FAILURES as exc:
            raise Unavailable(f"the Redis backplane is unavailable: {exc}") from exc
        return {room: n for room, n in zip(names, counts) if n}

    async def room(self, room: str) -> RoomState | None:
        if not self._up:
            raise Unavailable("the Redis backplane is unavailable")
        read = (self._script("READ"), 1, self._room_meta(room), 0, -1)
        try:
            try:
                reply = await self.link.client.evalsha(*read)
            except NoScriptError:  # a restarted Redis forgot the scripts
                await self.link.load_scripts()
                reply = await self.link.client.evalsha(*read)
        except FAILURES as exc:
            raise Unavailable(f"the Redis backplane is unavailable: {exc}") from exc
        if not reply:
            return None
        state = RoomState(room, epoch=reply[0].decode(), offset=reply[1])
        for actor, player, meta in lua.decode_members(reply[2]):
            state.members[actor] = Member(actor, player, meta)
        state.snapshot = lua.decode_snapshot(reply[3])
        state.next_actor = max(state.members, default=0) + 1
        return state

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
