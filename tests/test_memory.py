"""Connections are freed when they end, by reference counting alone.

The relay runs the cycle collector rarely (relay/server.py, tune_gc), so a
connection that ends in a reference cycle stays in memory until a full
collection, which churn alone may never trigger: about 8 KiB per connection.
Here a real relay runs in the test's own process, so that its objects can be
counted, with the cycle collector off while connections come and go.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import urllib.request

import pytest
import websockets

from relay.config import Settings
from relay.connection import Connection
from relay.node import Seat
from relay.runner import RelayServer, uvicorn_config
from relay.websocket import RelayHttpProtocol, RelayWebSocketProtocol
from tests.relayproc import free_port, timeout

pytestmark = pytest.mark.asyncio

UPGRADE = (
    "GET /ws/{room}?player={player} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def vanish(port: int, room: str, player: str) -> None:
    """Upgrade, then drop the connection without a close frame (RST): the seat is held."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout(5)) as s:
        s.sendall(UPGRADE.format(room=room, player=player).encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 101")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout(5)) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def alive(*kinds: type) -> dict[str, int]:
    counts = {kind.__name__: 0 for kind in kinds}
    for obj in gc.get_objects():
        if type(obj) in kinds:
            counts[type(obj).__name__] += 1
    return counts


async def test_ended_connections_and_expired_seats_leave_nothing_behind(monkeypatch, room):
    monkeypatch.setenv("RELAY_RESUME_WINDOW_S", "0.2")  # broken links' seats expire quickly
    port = free_port()
    server = RelayServer(uvicorn_config(Settings(port=port, log_level="warning")))
    thresholds = gc.get_threshold()
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(timeout(10)):
            while not server.started:
                await asyncio.sleep(0.02)  # polling uvicorn's start-up flag
        gc.disable()  # from here on, only reference counting frees anything
        for i in range(20):
            await asyncio.to_thread(vanish, port, room, f"gone{i}")  # held, then left
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/{room}?player=p{i}") as ws:
                await ws.recv()  # WELCOME; then a clean close
        async with asyncio.timeout(timeout(10)):
            while await asyncio.to_thread(gauge, port, "relay_connections_open") or await asyncio.to_thread(
                gauge, port, "relay_seats_held"
            ):
                await asyncio.sleep(0.05)  # polling the relay's own gauges
        await asyncio.sleep(0)  # let the last connection's task finish its step
        kinds = (Connection, Seat, RelayWebSocketProtocol, RelayHttpProtocol)
        assert alive(*kinds) == {kind.__name__: 0 for kind in kinds}
    finally:
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        server.should_exit = True
        await serving
