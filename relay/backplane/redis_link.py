"""The connections under the Redis backplane: commands, scripts and subscriptions.

One :class:`RedisLink` hides whether the URL names one Redis server or a Redis
Cluster (found out with ``INFO cluster``): commands go through redis-py's
client (pipelined; in a Cluster, one pipeline per shard, sent in parallel), and
each room channel is read by a :class:`Subscriber`, one dedicated connection
per Redis server (in a Cluster, per shard that owns a subscribed room).

The subscriber is ours rather than redis-py's ``PubSub`` for two reasons: a
subscription must be confirmed before a player's JOIN is sequenced (redis-py's
``subscribe()`` only sends the command), and a cut connection must be reported,
not silently re-established, because Redis pub/sub loses what is published
while a subscriber is away: the backplane has to know, to repair the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

log = logging.getLogger("relay.redis")

# What a lost Redis connection or a Redis that does not answer looks like.
FAILURES = (RedisError, OSError, asyncio.TimeoutError)
# A Cluster's "not here" or "not now": a slot moving to another shard, a failover under way.
_MOVING = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


def cluster_moving(reply: Any) -> bool:
    """A command refused because its slot is moving: it was not run; run it again once the
    cluster map is fresh. (A script touching keys split by a migration gets "non local key".)"""
    return isinstance(reply, _MOVING) or (isinstance(reply, ResponseError) and "non local key" in str(reply))


class _SubscriptionStream(asyncio.Protocol):
    """Reads a subscription straight off its transport, once redis-py has connected it.

    redis-py's read loop costs a task wake-up, a future and five coroutine frames
    per read, and a node reads a message for every batch of every room it serves:
    in the ``cluster`` benchmark that was more of a node's CPU than relaying the
    moves to its players. Here each read is parsed by hiredis where it arrives.
    """

    def __init__(self, subscriber: Subscriber, replaced: asyncio.BaseProtocol) -> None:
        self.subscriber = subscriber
        self.replaced = replaced  # redis-py's stream protocol, told when the connection ends
        self.parser = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        dispatch = self.subscriber.dispatch
        try:
            while (reply := parser.gets()) is not False:
                dispatch(reply)
        except Exception as exc:  # noqa: BLE001 - a protocol error or an error reply ends it
            self.subscriber.end(exc)

    def eof_received(self) -> bool:
        return False  # close: the subscription is over

    def connection_lost(self, exc: Exception | None) -> None:
        self.subscriber.end(exc or ConnectionError("Redis closed the subscription"))
        self.replaced.connection_lost(exc)  # so that redis-py's disconnect() does not wait


class Subscriber:
    """One pub/sub connection; reports messages and its end.

    redis-py connects it (address, TLS, AUTH, client name); then its transport is
    read by :class:`_SubscriptionStream`, or, where redis-py's connection is not
    an asyncio stream, by a task calling redis-py's ``read_response``.
    """

    def __init__(
        self,
        conn: Any,
        *,
        sharded: bool,
        on_message: Callable[[bytes, bytes], None],
        on_subscribed: Callable[[bytes], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        self.conn = conn
        self.sharded = sharded
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.on_lost = on_lost
        self._confirm: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._leaving: Counter[bytes] = Counter()  # channels we unsubscribe from: confirmations expected
        self._reader: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None  # when read by _SubscriptionStream
        self.started: asyncio.Future[None] | None = None  # the connect; everyone waits for it
        self.lost = False

    @property
    def connected(self) -> bool:
        started = self.started
        return not self.lost and started is not None and started.done() and not started.cancelled() \
            and started.exception() is None

    async def start(self, timeout: float) -> None:
        if self.started is None:
            self.started = asyncio.ensure_future(asyncio.wait_for(self._connect(), timeout))
        try:
            await asyncio.shield(self.started)
        except asyncio.CancelledError:
            if not self.started.cancelled():
                raise  # the caller is being cancelled
            self.lost = True  # closed while connecting (a reconnect): a failure, not a cancellation
            raise ConnectionError("subscription closed while connecting") from None
        except Exception:
            self.lost = True  # the next caller makes a new connection
            raise

    async def _connect(self) -> None:
        await self.conn.connect()
        writer = getattr(self.conn, "_writer", None)
        reader = getattr(self.conn, "_reader", None)
        if isinstance(writer, asyncio.StreamWriter) and isinstance(reader, asyncio.StreamReader):
            # Nothing is left unread: Redis has answered the handshake, and says nothing
            # more before the first SUBSCRIBE.
            transport = writer.transport
            transport.set_protocol(_SubscriptionStream(self, transport.get_protocol()))
            self._transport = transport  # type: ignore[assignment]
            return
        parser: Any = getattr(self.conn, "_parser", None)
        if hasattr(parser, "set_pubsub_push_handler"):
            # redis-py's default handler formats every message for a debug log, even when off.
            parser.set_pubsub_push_handler(_as_is)
        self._reader = asyncio.create_task(self._read())

    async def _send(self, *args: Any) -> None:
        # Never on a lost connection: redis-py would reconnect inside send_command,
        # reading the handshake while our reader reads too.
        if self.lost:
            raise ConnectionError("subscription lost")
        transport = self._transport
        if transport is None:
            await self.conn.send_command(*args)
        elif transport.is_closing():
            raise ConnectionError("subscription lost")
        else:
            transport.write(_pack(args))

    async def subscribe(self, channel: bytes, timeout: float) -> None:
        """Subscribe and wait until Redis confirms: from then on nothing published is missed."""
        await self.start(timeout)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm[channel].append(future)
        await self._send("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", channel)
        await asyncio.wait_for(future, timeout)

    async def unsubscribe(self, channel: bytes) -> None:
        self._leaving[channel] += 1
        await self._send("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", channel)

    async def ping(self, timeout: float) -> None:
        """A round trip on the subscription itself: a half-open connection shows up here."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send("PING")
        await asyncio.wait_for(future, timeout)

    async def close(self) -> None:
        self.lost = True
        if self.started is not None:
            self.started.cancel()
        if self._transport is not None:
            self._transport.abort()  # its connection_lost finds the subscriber lost already: no report
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        with contextlib.suppress(*FAILURES):
            await self.conn.disconnect()

    async def _read(self) -> None:
        conn = self.conn
        try:
            while True:
                self.dispatch(await conn.read_response(timeout=math.inf, push_request=True))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001  # any end of the stream is a cut subscription
            self.end(exc)

    def dispatch(self, reply: Any) -> None:
        """One reply read off the subscription."""
        if isinstance(reply, Exception):  # an error reply (hiredis returns it, not raises)
            raise reply
        if isinstance(reply, (bytes, str)):  # PING's answer: b"PONG" (some versions: [b"pong", b""])
            reply = [b"pong"]
        kind = reply[0]
        if kind == b"smessage" or kind == b"message":
            self.on_message(reply[1], reply[2])
        elif kind == b"ssubscribe" or kind == b"subscribe":
            self.on_subscribed(reply[1])  # in stream order: what follows is this subscription's
            waiting = self._confirm.get(reply[1])
            if waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_result(None)
        elif kind == b"sunsubscribe" or kind == b"unsubscribe":
            if self._leaving[reply[1]] > 0:
                self._leaving[reply[1]] -= 1
                if not self._leaving[reply[1]]:
                    del self._leaving[reply[1]]
            else:
                # Redis ended it: the channel's slot moved to another shard (resharding, a
                # failover). Messages published there from now on would never come here.
                raise ConnectionError(f"Redis ended the subscription to {reply[1]!r}: its slot moved")
        elif kind == b"pong" and self._pongs:
            future = self._pongs.popleft()
            if not future.done():
                future.set_result(None)

    def end(self, exc: BaseException) -> None:
        """The subscription is cut: report it once (not when we closed it ourselves)."""
        if self.lost:
            return
        self._fail(exc)
        if self._transport is not None:
            self._transport.abort()
        self.on_lost(exc)

    def _fail(self, exc: BaseException) -> None:
        self.lost = True
        error = ConnectionError(f"subscription lost: {exc!r}")
        for waiting in self._confirm.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(error)
        for future in self._pongs:
            if not future.done():
                future.set_exception(error)
        self._confirm.clear()
        self._pongs.clear()


def _pack(command: tuple[Any, ...]) -> bytes:
    """One command in Redis's protocol; an int subclass (an IntEnum) goes as its number."""
    try:
        return hiredis.pack_command(command)
    except TypeError:  # hiredis takes exactly str, int, float and bytes
        return hiredis.pack_command(tuple(int(a) if isinstance(a, int) else a for a in command))


async def _as_is(response: Any) -> Any:
    return response


class Commands:
    """A lean pipeline on one dedicated connection: pack, send, read the replies.

    redis-py's Pipeline does the same with a pool, retries and per-command
    callbacks around it, which cost as much CPU as the rest of a flush.
    Commands are packed by hiredis's C packer (redis-py's own, in Python, took
    about 7 us a command: a tenth of a node's CPU in the ``cluster`` benchmark).
    """

    def __init__(self, conn: Any, timeout: float) -> None:
        # One deadline for the whole round trip, not redis-py's per call: with a
        # socket_timeout it wraps each send in a task of its own (wait_for) and each
        # reply in a timeout of its own.
        conn.socket_timeout = None
        self.conn = conn
        self.timeout = timeout
        self.lock = asyncio.Lock()  # one pipeline at a time on the stream

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Each command's reply, or its ResponseError; a lost connection raises."""
        async with self.lock:
            return await self._execute(commands)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        conn = self.conn
        try:
            async with asyncio.timeout(self.timeout):
                packed = b"".join([_pack(command) for command in commands])
                await conn.send_packed_command(packed, check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
        except BaseException:
            await conn.disconnect()  # a reply may still be on its way: never reuse this stream
            raise


class RedisLink:
    """Redis or Redis Cluster: a command client, the scripts, and the subscribers."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        name: str,
        on_message: Callable[[bytes, bytes], None],
        on_subscribed: Callable[[bytes], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.name = name  # CLIENT SETNAME of every connection: which relay it is, in CLIENT LIST
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.on_lost = on_lost
        self.client: Any = None
        self.sharded = False
        self._scripts: dict[str, str] = {}  # sha -> source
        self._commands: Commands | None = None  # the flusher's connection (one Redis server)
        self._subscribers: dict[str, Subscriber] = {}  # by server name
        self._cluster_nodes: list[tuple[str, int]] = []  # every node of the Cluster, as last seen

    def _options(self) -> dict[str, Any]:
        # No retries inside redis-py: a retried pipeline could apply a batch twice
        # unseen, and waiting out its backoff would hide that Redis is gone. The
        # backplane retries itself, knowing what each command did.
        return {
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "socket_keepalive": True,
            "client_name": self.name,
        }

    async def connect(self) -> None:
        """Connect (again): find out whether this is a Cluster, check it answers, load scripts."""
        await self.close()
        if not self._cluster_nodes:
            probe = aioredis.Redis.from_url(self.url, **self._options())
            try:
                info = await probe.info("cluster")
            finally:
                await probe.aclose()
            self.sharded = bool(info.get("cluster_enabled"))
        if self.sharded:
            # Through any node of the Cluster, not only the one named by the URL, which
            # may be the one that died.
            known = [ClusterNode(host, port) for host, port in self._cluster_nodes]
            self.client = RedisCluster.from_url(self.url, startup_nodes=known or None, **self._options())
            await self.client.initialize()
            self._cluster_nodes = [(node.host, node.port) for node in self.client.get_nodes()]
        else:
            self.client = aioredis.Redis.from_url(self.url, **self._options())
            await self.client.ping()
        await self.load_scripts()

    def script(self, source: str) -> str:
        """Register a script; its SHA1 for :meth:`evalsha`."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source
        return sha

    async def load_scripts(self) -> None:
        """(Re)load every script (a restarted Redis has an empty script cache)."""
        for source in self._scripts.values():
            await self.client.script_load(source)  # in a Cluster: on every primary

    def pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one round trip (in a Cluster: one per shard, in parallel)."""
        if self.sharded:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # routed by key; ClusterPipeline refuses pipe.evalsha()
            return list(await pipe.execute(raise_on_error=False))
        if self._commands is None:
            self._commands = Commands(self.client.connection_pool.make_connection(), self.timeout)
        return await self._commands.execute(commands)

    @staticmethod
    def evalsha(pipe: Any, sha: str, key: str, args: list[Any]) -> None:
        # execute_command, since redis-py's ClusterPipeline refuses pipe.evalsha();
        # the key routes it to the room's shard.
        pipe.execute_command("EVALSHA", sha, 1, key, *args)

    async def subscribe(self, channel: bytes) -> None:
        subscriber = await self._subscriber_for(channel)
        await subscriber.subscribe(channel, self.timeout)

    async def unsubscribe(self, channel: bytes) -> None:
        if self.client is None:
            return  # not connected: a reconnect subscribes only to the rooms still needed
        try:
            server = self._server_of(channel)
        except RedisClusterException:  # the slot's shard is not known right now (a failover)
            return
        subscriber = self._subscribers.get(server)
        if subscriber is not None and subscriber.connected:
            with contextlib.suppress(*FAILURES):
                await subscriber.unsubscribe(channel)

    async def ping_subscribers(self) -> None:
        # Only connected ones: a PING while connecting would make redis-py connect a second time.
        await asyncio.gather(*(s.ping(self.timeout) for s in list(self._subscribers.values()) if s.connected))

    def subscribers_up(self) -> bool:
        return not any(s.lost for s in self._subscribers.values())

    async def close_subscribers(self) -> None:
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        for subscriber in subscribers:
            await subscriber.close()

    async def close(self) -> None:
        await self.close_subscribers()
        if self._commands is not None:
            commands, self._commands = self._commands, None
            with contextlib.suppress(*FAILURES):
                await commands.conn.disconnect()
        if self.client is not None:
            client, self.client = self.client, None
            if self.sharded:  # every node's connections, each on its own: one that fails must not leave the rest open
                manager = client.nodes_manager
                for node in {*manager.nodes_cache.values(), *manager.startup_nodes.values()}:
                    with contextlib.suppress(Exception):
                        await node.disconnect()
            with contextlib.suppress(*FAILURES):
                await client.aclose()

    def _server_of(self, channel: bytes) -> str:
        if not self.sharded:
            return ""
        return str(self.client.get_node_from_key(channel).name)

    async def _subscriber_for(self, channel: bytes) -> Subscriber:
        server = self._server_of(channel)
        subscriber = self._subscribers.get(server)
        if subscriber is not None and not subscriber.lost:
            return subscriber
        if self.sharded:
            node = self.client.get_node_from_key(channel)
            conn = node.connection_class(**node.connection_kwargs)
        else:
            conn = self.client.connection_pool.make_connection()
        subscriber = Subscriber(
            conn,
            sharded=self.sharded,
            on_message=self.on_message,
            on_subscribed=self.on_subscribed,
            on_lost=self.on_lost,
        )
        self._subscribers[server] = subscriber
        return subscriber
