"""Baseline: the FastAPI documentation's ConnectionManager, one list of sockets per room.

This is what most people write first, and is kept that naive on purpose: each
move is relayed by awaiting ``send_bytes`` on every other member in turn, so one
slow reader stalls its whole room. It speaks just enough of protocol v1 for the
load generator: a WELCOME first, then every EVENT relayed as
``[1, from_actor, seq, data, offset]`` (one message per frame).

Run: ``python -m benchmarks.baselines.tutorial --port 8001``
"""

from __future__ import annotations

import argparse
import time

import msgpack
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


class ConnectionManager:
    def __init__(self) -> None:
        self.rooms: dict[str, list[WebSocket]] = {}
        self.next_actor: dict[str, int] = {}
        self.offsets: dict[str, int] = {}

    async def connect(self, websocket: WebSocket, room: str, player: str) -> int:
        await websocket.accept()
        members = self.rooms.setdefault(room, [])
        members.append(websocket)
        actor = self.next_actor.get(room, 0) + 1
        self.next_actor[room] = actor
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
            self.offsets.get(room, 0),
            "tutorial",
            "",
            None,
        ]
        await websocket.send_bytes(msgpack.packb(welcome))
        return actor

    def disconnect(self, websocket: WebSocket, room: str) -> None:
        self.rooms[room].remove(websocket)

    async def broadcast(self, message: bytes, room: str, sender: WebSocket) -> None:
        for connection in self.rooms[room]:
            if connection is not sender:
                await connection.send_bytes(message)


manager = ConnectionManager()


@app.websocket("/ws/{room}")
async def websocket_endpoint(websocket: WebSocket, room: str, player: str = "") -> None:
    actor = await manager.connect(websocket, room, player)
    try:
        while True:
            move = msgpack.unpackb(await websocket.receive_bytes())
            offset = manager.offsets[room] = manager.offsets.get(room, 0) + 1
            out = msgpack.packb([1, actor, move[1], move[2], offset])
            await manager.broadcast(out, room, websocket)
    except WebSocketDisconnect:
        manager.disconnect(websocket, room)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
