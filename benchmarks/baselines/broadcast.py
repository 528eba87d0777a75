"""Baseline: a plain ``websockets`` server relaying with ``websockets.broadcast()``.

The next thing people reach for after the tutorial: ``broadcast()`` writes to
every member without waiting, so a slow reader does not stall the room, but its
write buffer grows without bound while it stays. Same moves as the relay: a
WELCOME first, then every EVENT relayed as ``[1, from_actor, seq, data, offset]``.

It runs on uvloop, like uvicorn does for the tutorial and the relay, so that the
comparison is between designs, not event loops.

Run: ``python -m benchmarks.baselines.broadcast --port 8002``
"""

from __future__ import annotations

import argparse
import time
from urllib.parse import parse_qs, urlsplit

import msgpack
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

ROOMS: dict[str, set[ServerConnection]] = {}
NEXT_ACTOR: dict[str, int] = {}
OFFSETS: dict[str, int] = {}


async def handler(websocket: ServerConnection) -> None:
    assert websocket.request is not None  # the handshake is done
    url = urlsplit(websocket.request.path)
    room = url.path.removeprefix("/ws/")
    player = parse_qs(url.query).get("player", [""])[0]
    actor = NEXT_ACTOR[room] = NEXT_ACTOR.get(room, 0) + 1
    members = ROOMS.setdefault(room, set())
    members.add(websocket)
    limits = {"max_frame_bytes": 1 << 20, "max_msgs_per_s": 0}
    welcome = [
        0,
        1,
        actor,
        room,
        [[actor, player, {}]],
        {},
        int(time.time() * 1000),
        limits,
        OFFSETS.get(room, 0),
        "broadcast",
        "",
        None,
    ]
    try:
        await websocket.send(msgpack.packb(welcome))
        async for message in websocket:
            move = msgpack.unpackb(message)
            offset = OFFSETS[room] = OFFSETS.get(room, 0) + 1
            out = msgpack.packb([1, actor, move[1], move[2], offset])
            broadcast([m for m in members if m is not websocket], out)
    finally:
        members.discard(websocket)


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port) as server:
        await server.serve_forever()


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    try:
        uvloop.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
