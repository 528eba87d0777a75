"""Heartbeats, graceful shutdown, the fixed flush tick."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket

import pytest

from relay_client import Event, Join, Leave, connect, open_client
from tests.helpers import closed, collect, next_of
from tests.relayproc import timeout

pytestmark = pytest.mark.asyncio


def silent_peer(port: int, room: str) -> socket.socket:
    """Complete a WebSocket handshake, then never read or answer a ping again."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/{room}?player=ghost HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


async def test_dead_peer_is_removed_with_leave(relay_with, room):
    server = relay_with(ping_interval_s=0.5, ping_timeout_s=0.5, resume_window_s=1)
    async with connect(server.url, room, player="watch") as watch:
        ghost = await asyncio.to_thread(silent_peer, server.port, room)
        try:
            join = await next_of(watch, Join)
            assert join.player == "ghost"
            leave = await next_of(watch, Leave, seconds=10)  # interval + timeout + resume window, with margin
            assert leave.actor == join.actor and leave.code == 1006
            assert join.actor not in watch.members
        finally:
            ghost.close()


async def test_sigterm_flushes_queued_moves_then_closes_1001(relay_with, room):
    server = relay_with()
    sender = await open_client(server.url, room, player="sender", auto_resume=False)
    receiver = await open_client(server.url, room, player="receiver", auto_resume=False)
    try:
        for i in range(100):
            sender.send_event(i)
        await sender.flush()
        await sender.ping()  # the server has read every move before this answer
        server.proc.send_signal(signal.SIGTERM)
        events = await collect(receiver, lambda ms: sum(isinstance(m, Event) for m in ms) == 100)
        assert [m.data for m in events if isinstance(m, Event)] == list(range(100))
        exc = await closed(receiver, seconds=10)
        assert exc.code == 1001 and exc.reason
        assert (await closed(sender, seconds=10)).code == 1001
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the status is -15
        assert await asyncio.to_thread(server.proc.wait, timeout(15)) in (0, -signal.SIGTERM)
    finally:
        await sender.close()
        await receiver.close()


async def test_fixed_flush_tick_still_delivers_everything_in_order(relay_with, room):
    server = relay_with(flush_ms=30)
    async with connect(server.url, room, player="a") as a, connect(server.url, room, player="b") as b:
        for i in range(50):
            a.send_event(i)
            await asyncio.sleep(0.001)
        got = await collect(b, lambda ms: sum(isinstance(m, Event) for m in ms) == 50)
        assert [m.data for m in got if isinstance(m, Event)] == list(range(50))


async def test_close_frame_without_a_code_gives_the_seat_up_at_once(relay_with, room):
    """A browser's plain ``ws.close()`` sends a close frame with no status code: a
    deliberate close, not a broken link, so the seat is not held for a resume."""
    server = relay_with(resume_window_s=60)
    async with connect(server.url, room, player="watch") as watch:
        async with connect(server.url, room, player="leaver") as leaver:
            join = await next_of(watch, Join)
            leaver.ws.transport.write(b"\x88\x80\x00\x00\x00\x00")  # FIN + close, masked, empty payload
            leave = await next_of(watch, Leave, seconds=5)  # long before the 60 s hold would end
            assert leave.actor == join.actor and leave.code == 1000
