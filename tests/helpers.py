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


class LinkCutter:
    """A TCP proxy on 127.0.0.1 in front of a relay, to break the network between a
    client and the relay: ``cut()`` aborts every link, ``down()`` also refuses new
    ones until ``up()`` (a player whose network is gone for a while)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listen_port = 0
        self.server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.listen_port}"

    async def up(self) -> LinkCutter:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.listen_port)
        self.listen_port = self.server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        await self.server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:  # one side gone: the whole link goes, as a broken network would
                writer.transport.abort()
                up_writer.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def metrics(server: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in server.get_text("/metrics").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def wait_metrics(
    server: Any, wanted: dict[str, float], seconds: float
) -> dict[str, float]:
    """Poll /metrics until every named value is as ``wanted``; fail after ``seconds``."""
    now: dict[str, float] = {}
    try:
        async with asyncio.timeout(timeout(seconds)):
            while True:
                now = await asyncio.to_thread(metrics, server)
                if all(now.get(name) == value for name, value in wanted.items()):
                    return now
                await asyncio.sleep(0.1)  # pacing the polls of a condition
    except TimeoutError:
        got = {name: now.get(name) for name in wanted}
        raise AssertionError(f"metrics never reached {wanted}: {got}") from None
