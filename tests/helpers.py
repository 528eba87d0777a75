"""Small helpers for end-to-end tests over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgpack
import websockets

from relay_client import Client, Message, RelayClosed
from tests.relayproc import timeout


async def collect(client: Client, until: Callable[[list[Message]], bool], seconds: float = 5) -> list[Message]:
    """Receive messages until ``until(received)`` holds; fail after ``seconds``."""
    received: list[Message] = []
    async with asyncio.timeout(timeout(seconds)):
        while not until(received):
            received.append(await client.recv())
    return received


async def next_of(client: Client, kind: type, seconds: float = 5) -> Any:
    """The next message of type ``kind`` (others are skipped)."""
    async with asyncio.timeout(timeout(seconds)):
        while True:
            message = await client.recv()
            if isinstance(message, kind):
                return message


async def closed(client: Client, seconds: float = 5) -> RelayClosed:
    """Read until the connection ends; the RelayClosed with its code."""
    async with asyncio.timeout(timeout(seconds)):
        while True:
            try:
                await client.recv()
            except RelayClosed as exc:
                return exc


async def raw_connect(url: str, room: str, query: str = "") -> Any:
    """A bare WebSocket to the relay (for frames the client library would not send)."""
    return await websockets.connect(f"{url}/ws/{room}{query}", max_size=None)


async def raw_messages(ws: Any, seconds: float = 5) -> list[Any]:
    """One frame from a bare WebSocket, decoded into its messages."""
    frame = await asyncio.wait_for(ws.recv(), timeout(seconds))
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    return list(unpacker)


async def raw_close_code(ws: Any, seconds: float = 5) -> tuple[int | None, str]:
    async with asyncio.timeout(timeout(seconds)):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed:
            pass
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, "")


async def held_on(relay: Any, count: int, seconds: float = 5) -> None:
    """Wait until the relay holds ``count`` seats for a resume (it noticed the broken links)."""
    async with asyncio.timeout(timeout(seconds)):
        while f"relay_seats_held {count:.1f}" not in relay.get_text("/metrics"):
            await asyncio.sleep(0.02)  # polling another process's state
