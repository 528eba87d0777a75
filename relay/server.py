"""The ASGI edge: the app, its HTTP routes, and the way to the WebSocket endpoint.

The only module that knows FastAPI and Starlette. A WebSocket connection's own
logic is in ``relay/connection.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import unquote_plus

import orjson
from fastapi import FastAPI, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from relay.backplane.base import Backplane, Unavailable
from relay.backplane.memory import MemoryBackplane
from relay.config import Settings
from relay.connection import Connection, origin_allowed
from relay.metrics import Stats, registry, render
from relay.node import Node
from relay.protocol import CloseCode

log = logging.getLogger("relay")


class Relay:
    """One process's relay: settings, stats, the node, and its live connections."""

    def __init__(self, settings: Settings, backplane: Backplane | None = None) -> None:
        self.settings = settings
        self.stats = Stats()
        # A resume replays at most max_replay_bytes: history past that would never be used.
        backplane = backplane or MemoryBackplane(
            history_size=settings.history_size, history_bytes=settings.max_replay_bytes
        )
        self.node = Node(backplane, settings, self.stats)
        self.connections: set[Connection] = set()
        self.open_per_ip: Counter[str] = Counter()
        self.open_total = 0
        self.closing = False

    def gauges(self) -> dict[str, float]:
        seats = self.node.seats()
        return {
            "connections_open": len(self.connections),
            "rooms_local": len(self.node.rooms),
            "outbox_bytes": sum(seat.outbox.size for seat in seats),
            "outbox_bytes_max": max((seat.outbox.size for seat in seats), default=0),
            "seats_held": sum(1 for seat in seats if seat.held is not None),
        }

    async def shutdown(self) -> None:
        """Stop taking players, flush what is queued, close everyone with 1001."""
        self.closing = True
        if self.settings.resume_window_s > 0:
            try:
                await self.node.backplane.hold_seats()
            except Exception:  # noqa: BLE001 - shutting down all the same
                log.exception("holding the seats for a resume elsewhere failed")
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down", flush=True)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling a set that empties as writers finish


class WebSocketEndpoint:
    """A raw ASGI endpoint: Starlette's WebSocket wrapper costs time on every frame."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if not origin_allowed(scope, self.relay.settings.allowed_origins):
            await send({"type": "websocket.close", "code": CloseCode.ROOM_FORBIDDEN})  # HTTP 403
            return
        await Connection(self.relay, scope, receive, send).run()


def tune_gc() -> None:
    """Keep the cyclic garbage collector from stalling rooms.

    Relaying allocates a few short-lived objects per move, freed by reference
    counting, but each allocation counts towards a collection. A full collection
    walks every live object (every connection's state) and showed as pauses of
    tens of milliseconds under load. Objects made at start-up are frozen out of
    collections, and the older generations are collected rarely (once per million
    objects that outlive their young collection, as with the 50 000 x 20 before).

    A young collection walks the objects made since the last one that are still
    alive (after a burst of joins: each new connection's state). At 50 000 that
    walk stalled every room for 10-14 ms once the joins were in (the worst
    latency in a `rooms` run, 10-40 ms); at 10 000 it takes 2-3 ms, five times as
    often, at no measurable CPU cost per delivery.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 100, 100)


def json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


RUNNING: set[Relay] = set()


class RedactSecrets(logging.Filter):
    """uvicorn logs each WebSocket's path with its query string at INFO: keep the
    players' tokens and resume tokens (bearer secrets both) out of the logs. Names
    are read as the relay reads them (percent-decoded: ``%74oken`` is ``token``), and
    more loosely (any case, after ``;`` too), since a reader of the log might."""

    # Every name=value after a ?, & or ; anywhere in the line: a query string is not
    # cut out first, so that no character in it (a quote, say) can hide what follows.
    PAIR = re.compile(r"(?<=[?&;])([^=&;?\s]*)=([^&;\s]*)")
    SECRETS = frozenset({"token", "resume"})

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            redacted = self.PAIR.sub(self._redact, message)
            if redacted != message:
                record.msg, record.args = redacted, ()
        return True

    def _redact(self, match: re.Match[str]) -> str:
        name, value = match.groups()
        if unquote_plus(name).strip().lower() not in self.SECRETS:
            return match.group(0)
        closing = '"' if value.endswith('"') else ""  # the log line's own closing quote
        return f"{name}=<redacted>{closing}"


def redact_secrets_in_logs() -> None:
    logger = logging.getLogger("uvicorn.error")  # where uvicorn logs "WebSocket /ws/... [accepted]"
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())


def create_app(settings: Settings | None = None, backplane: Backplane | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    redact_secrets_in_logs()  # here: it runs in every worker process
    if backplane is None and settings.redis:
        from relay.backplane.redis import RedisBackplane  # imports redis only when a URL is given

        backplane = RedisBackplane(settings)
    relay = Relay(settings, backplane)
    metrics_registry = registry(relay.stats, relay.gauges, getattr(relay.node.backplane, "stats", None))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await relay.node.start()
        RUNNING.add(relay)
        tune_gc()
        log.info(
            "relay started (backplane: %s)", relay.node.backplane.name,
        )
        try:
            yield
        finally:
            RUNNING.discard(relay)
            await relay.shutdown()
            await relay.node.close()

    app = FastAPI(title="relay", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.relay = relay

    @app.get("/healthz")
    async def healthz() -> Response:
        return json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = relay.node.backplane.ready() and not relay.closing
        return json({"ready": ready}, 200 if ready else 503)

    @app.get("/rooms")
    async def rooms() -> Response:
        try:
            counts = await relay.node.backplane.rooms()  # every node's rooms, with Redis
        except Unavailable as exc:
            return json({"error": str(exc)}, 503)
        return json({"rooms": [{"room": r, "members": n} for r, n in sorted(counts.items())]})

    @app.get("/rooms/{room}")
    async def room(room: str) -> Response:
        try:
            state = await relay.node.backplane.room(room)
        except Unavailable as exc:
            return json({"error": str(exc)}, 503)
        if state is None:
            return json({"error": f"no room {room!r}"}, 404)
        return json(
            {
                "room": room,
                "epoch": state.epoch,
                "offset": state.offset,
                "members": [
                    {"actor": m.actor, "player": m.player, "meta": m.meta}
                    for m in state.members.values()
                ],
                "snapshot_keys": sum(len(v) for v in state.snapshot.values()),
                "snapshot_bytes": state.snapshot_bytes(),
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(metrics_registry), media_type="text/plain; version=0.0.4")

    static = resources.files("relay") / "static"
    if (static / "index.html").is_file():

        @app.api_route("/", methods=["GET", "HEAD"])
        async def index() -> Response:
            return Response((static / "index.html").read_bytes(), media_type="text/html")

    if (static / "client.js").is_file():

        @app.api_route("/client.js", methods=["GET", "HEAD"])
        async def client_js() -> Response:
            body = (static / "client.js").read_bytes()
            # A module any page may import (a game's own page on another origin): it is
            # public code, fetched without credentials.
            cors = {"Access-Control-Allow-Origin": "*"}
            return Response(body, media_type="text/javascript", headers=cors)

    app.mount("/static", StaticFiles(directory=str(static), check_dir=False), name="static")
    return RelayApp(app, WebSocketEndpoint(relay))  # type: ignore[return-value]


class RelayApp:
    """Sends ``/ws/{room}`` straight to the relay, everything else to FastAPI.

    A WebSocket lives for the whole game, and every coroutine frame between
    uvicorn and the endpoint (Starlette's middleware and router) stays in
    memory for as long: going around them saves several KiB per connection.
    """

    def __init__(self, app: FastAPI, endpoint: WebSocketEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith("/ws/"):
            scope["path_params"] = {"room": scope["path"][4:]}
            await self.endpoint(scope, receive, send)
        else:
            await self.app(scope, receive, send)
