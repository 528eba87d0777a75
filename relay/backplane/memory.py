"""The default backplane: one process, rooms in memory.

The room order is made here, synchronously, and delivered straight back to the
node: no copies, no tasks, no serialisation. It is also the test double that is
not a fake: the node code it drives is the same that the Redis backplane drives.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from relay.backplane.base import Joined, Receiver, RoomFull
from relay.protocol import CloseCode
from relay.room import Entry, Member, RoomState, join_entry, leave_entry

log = logging.getLogger("relay.memory")


class MemoryBackplane:
    name = "memory"
    hands_off_seats = False  # one process: its seats end with it

    def __init__(self, *, history_size: int = 0, history_bytes: int = 0) -> None:
        self._history_size = history_size
        self._history_bytes = history_bytes
        self._rooms: dict[str, RoomState] = {}
        self._receiver: Receiver | None = None

    async def start(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def close(self) -> None:
        self._rooms.clear()

    async def subscribe(self, room: str) -> None:
        pass  # one node: it always hears every room

    async def unsubscribe(self, room: str) -> None:
        pass

    async def join(
        self, room: str, player: str, meta: dict[str, Any], *, max_players: int, secret: str = ""
    ) -> Joined:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = RoomState(
                room, history_size=self._history_size, history_bytes=self._history_bytes
            )
        old = state.find_player(player)
        if old is None and len(state.members) >= max_players:
            if not state.members:
                del self._rooms[room]
            raise RoomFull(room)
        if old is not None:
            self._sequence(room, state, [leave_entry(old.actor, CloseCode.REPLACED)])
        member = Member(state.new_actor(), player, meta)
        self._sequence(room, state, [join_entry(member)])
        return Joined(
            member=member,
            members=state.member_list(),
            snapshot={actor: dict(values) for actor, values in state.snapshot.items()},
            offset=state.offset,
            epoch=state.epoch,
        )

    async def leave(self, room: str, actor: int, close_code: int) -> None:
        state = self._rooms.get(room)
        if state is None or actor not in state.members:
            return
        self._sequence(room, state, [leave_entry(actor, close_code)])
        if not state.members:
            del self._rooms[room]  # an empty room is gone; it comes back with a new epoch

    async def takeover(self, room: str, actor: int, secret: str, player: str) -> Joined | None:
        return None  # every seat is in this process: the node finds it by its token

    def publish(self, room: str, entries: list[Entry], seqs: dict[int, int] | None = None) -> None:
        state = self._rooms.get(room)
        if state is not None:
            self._sequence(room, state, entries)

    def direct(self, room: str, to_actor: int, wire: bytes, from_actor: int | None = None, seq: int = 0) -> None:
        assert self._receiver is not None
        self._receiver.deliver_direct(room, to_actor, wire)

    async def history(self, room: str, after: int, epoch: str) -> list[Entry] | None:
        state = self._rooms.get(room)
        return state.history_after(after, epoch) if state is not None else None

    async def rooms(self) -> dict[str, int]:
        return {name: len(state.members) for name, state in self._rooms.items()}

    async def room(self, room: str) -> RoomState | None:
        state = self._rooms.get(room)
        return copy.deepcopy(state) if state is not None else None

    async def hold_seats(self) -> None:
        pass  # one process: its seats end with it

    def ready(self) -> bool:
        return True

    def _sequence(self, room: str, state: RoomState, entries: list[Entry]) -> None:
        state.sequence(entries)
        assert self._receiver is not None
        try:
            self._receiver.deliver(room, entries)
        except Exception:  # a bug: the room's members are closed and rejoin, never left without a word
            log.exception("delivering room %s failed; its players are closed with 1011 to rejoin", room)
            self._receiver.resync(room)
