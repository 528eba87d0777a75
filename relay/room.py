"""A room's state and order: members, actor numbers, the snapshot and offsets.

No sockets and no asyncio. The same :class:`RoomState` is the authority in the
memory backplane and a node's mirror of a room it has players in.

Order guarantee, stated once: every EVENT, STATE, JOIN and LEAVE of a room gets
the next integer of the room's offset when :meth:`RoomState.sequence` puts it in
order, and the snapshot and member list are exactly the result of applying the
sequenced entries up to :attr:`RoomState.offset`. A joiner's WELCOME is taken at
an offset and it then receives exactly the entries after it.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from relay import protocol
from relay.protocol import DIRECT, EVENT, JOIN, LEAVE, STATE, MsgType


@dataclass(slots=True)
class Member:
    actor: int
    player: str
    meta: dict[str, Any]

    def as_wire(self) -> tuple[int, str, dict[str, Any]]:
        return (self.actor, self.player, self.meta)


@dataclass(slots=True)
class Entry:
    """One message of a room's order: built where it enters, completed when sequenced."""

    kind: MsgType
    actor: int
    head: bytes  # the encoded message without its trailing offset
    key: str | int | None = None  # STATE: the key
    value: bytes | None = None  # EVENT and STATE: raw msgpack data (a STATE's NIL deletes)
    member: Member | None = None  # JOIN: who joined
    offset: int = 0
    wire: bytes = b""  # head + offset, the bytes every recipient gets
    # From a room's history in Redis: ``(what it replaced,)``, as the undo log keeps it
    # (a STATE's previous value or None, a LEAVE's (member, values)); None: not known.
    undo: tuple[Any] | None = None

    @property
    def droppable(self) -> bool:
        """EVENTs may be dropped for a slow reader; STATE coalesces; JOIN/LEAVE never go."""
        return self.kind is EVENT or self.kind is DIRECT


def new_epoch() -> str:
    return secrets.token_hex(6)


@dataclass(slots=True)
class RoomState:
    room: str
    epoch: str = field(default_factory=new_epoch)
    offset: int = 0
    next_actor: int = 1
    members: dict[int, Member] = field(default_factory=dict)
    snapshot: dict[int, dict[str | int, bytes]] = field(default_factory=dict)
    snapshot_size: int = 0  # what the snapshot counts against max_snapshot_bytes (see snapshot_cost)
    history_size: int = 0
    # The last history_size entries, kept lean for resume: (offset, actor, kind, wire);
    # at most history_bytes of wire, since a resume replays no more than that anyway.
    history: deque[tuple[int, int, MsgType, bytes]] | None = None  # made on first use
    history_bytes: int = 0  # 0: no limit but history_size
    history_used: int = 0
    # How to undo the last undo_size changes to members and snapshot, for a resume's
    # WELCOME (see :meth:`rewound`): (offset, kind, actor, key, what was there before).
    undo_size: int = 0
    undo_bytes: int = 0  # and at most this many bytes of values kept (0: no limit but undo_size)
    undo: deque[tuple[int, MsgType, int, Any, Any, int]] | None = None  # made on first use; last: bytes kept
    undo_used: int = 0
    undo_floor: int = 0  # the undo log holds every change after this offset

    def new_actor(self) -> int:
        actor = self.next_actor
        self.next_actor += 1
        return actor

    def sequence(self, entries: list[Entry]) -> None:
        """Give each entry the room's next offset and apply it to the state."""
        offset = self.offset
        for entry in entries:
            offset += 1
            entry.offset = offset
            entry.wire = protocol.with_offset(entry.head, offset)
            self.apply(entry)
        self.offset = offset
        if self.history_size:
            history = self.history
            if history is None:
                history = self.history = deque()
            history.extend((e.offset, e.actor, e.kind, e.wire) for e in entries)
            used = self.history_used + sum(len(e.wire) for e in entries)
            limit = self.history_bytes or float("inf")
            while len(history) > self.history_size or (used > limit and len(history) > 1):
                used -= len(history.popleft()[3])
            self.history_used = used

    def history_after(self, offset: int, epoch: str) -> list[Entry] | None:
        """Every entry after ``offset`` in ``epoch``, or None when history no longer reaches it."""
        if epoch != self.epoch or offset > self.offset or offset < 0:
            return None
        if offset == self.offset:
            return []
        history = self.history or ()
        if not history or history[0][0] > offset + 1:
            return None
        skip = offset + 1 - history[0][0]
        return [
            Entry(kind, actor, b"", offset=at, wire=wire)
            for at, actor, kind, wire in list(history)[skip:]
        ]

    def apply(self, entry: Entry) -> None:
        kind = entry.kind
        if kind is STATE:
            if entry.actor not in self.members:
                return  # a late STATE from a member that already left changes nothing
            values = self.snapshot.setdefault(entry.actor, {})
            before = values.get(entry.key)  # type: ignore[arg-type]
            if self.undo_size:
                self._remember(entry, entry.key, before, len(before) if before is not None else 0)
            if before is not None:
                self.snapshot_size -= snapshot_cost(before)
            if entry.value == protocol.NIL:
                values.pop(entry.key, None)  # type: ignore[arg-type]
                if not values:
                    del self.snapshot[entry.actor]
            else:
                values[entry.key] = entry.value  # type: ignore[index]
                self.snapshot_size += snapshot_cost(entry.value)  # type: ignore[arg-type]
        elif kind is JOIN:
            assert entry.member is not None
            if self.undo_size:
                self._remember(entry, None, None, 0)
            self.members[entry.actor] = entry.member
            self.next_actor = max(self.next_actor, entry.actor + 1)
        elif kind is LEAVE:
            member = self.members.pop(entry.actor, None)
            values = self.snapshot.pop(entry.actor, None)
            if values:
                self.snapshot_size -= sum(snapshot_cost(v) for v in values.values())
            if self.undo_size and member is not None:
                self._remember(entry, None, (member, values), sum(map(len, values.values())) if values else 0)
        if entry.offset:
            self.offset = entry.offset

    def _remember(self, entry: Entry, key: Any, before: Any, size: int) -> None:
        undo = self.undo
        if undo is None:
            undo = self.undo = deque()
        undo.append((entry.offset, entry.kind, entry.actor, key, before, size))
        self.undo_used += size
        limit = self.undo_bytes or float("inf")
        while len(undo) > self.undo_size or (self.undo_used > limit and undo):
            oldest = undo.popleft()
            self.undo_floor = oldest[0]
            self.undo_used -= oldest[5]

    def rewound(
        self, offset: int, older: list[Entry] | None = None
    ) -> tuple[list[tuple[int, str, dict[str, Any]]], dict[int, dict[str | int, bytes]]] | None:
        """The member list and snapshot as they were at ``offset``; None when the undo
        log no longer reaches back that far, and ``older`` (entries of the room's history
        that carry their own undo records, as Redis keeps them) does not take it on from
        there to ``offset`` either."""
        if offset > self.offset or (not self.undo_size and offset < self.offset):
            return None
        floor = self.undo_floor
        steps: list[Entry] = []
        if offset < floor:
            steps = [e for e in older or () if offset < e.offset <= floor]
            if [e.offset for e in steps] != list(range(offset + 1, floor + 1)) or any(e.undo is None for e in steps):
                return None
        members = dict(self.members)
        snapshot = {actor: dict(values) for actor, values in self.snapshot.items()}
        for at, kind, actor, key, before, _ in reversed(self.undo or ()):
            if at <= offset:
                break
            _undo(members, snapshot, kind, actor, key, before)
        for e in reversed(steps):
            _undo(members, snapshot, e.kind, e.actor, e.key, e.undo[0])  # type: ignore[index]
        return [members[a].as_wire() for a in sorted(members)], snapshot

    def member_list(self) -> list[tuple[int, str, dict[str, Any]]]:
        return [m.as_wire() for m in self.members.values()]

    def snapshot_bytes(self) -> int:
        return sum(len(v) for values in self.snapshot.values() for v in values.values())

    def find_player(self, player: str) -> Member | None:
        for member in self.members.values():
            if member.player == player:
                return member
        return None


def _undo(
    members: dict[int, Member], snapshot: dict[int, dict[str | int, bytes]], kind: MsgType, actor: int,
    key: Any, before: Any,
) -> None:
    """Take one entry back out of ``members`` and ``snapshot``; ``before`` is what it replaced."""
    if kind is STATE:
        values = snapshot.setdefault(actor, {})
        if before is None:
            values.pop(key, None)
            if not values:
                del snapshot[actor]
        else:
            values[key] = before
    elif kind is JOIN:
        members.pop(actor, None)
        snapshot.pop(actor, None)
    elif kind is LEAVE and before is not None:  # the member comes back, with its STATE
        member, values = before
        members[actor] = member
        if values:
            snapshot[actor] = dict(values)


KEY_COST = 64  # what a snapshot key counts against max_snapshot_bytes: the longest a key may be


def snapshot_cost(value: bytes) -> int:
    """What one key and its value count against ``max_snapshot_bytes``."""
    return KEY_COST + len(value)


def event_entry(actor: int, seq: int, data: bytes) -> Entry:
    return Entry(EVENT, actor, protocol.event_head(actor, seq, data), value=data)


def state_entry(actor: int, key: str | int, data: bytes) -> Entry:
    return Entry(STATE, actor, protocol.state_head(actor, key, data), key=key, value=data)


def join_entry(member: Member) -> Entry:
    head = protocol.join_head(member.actor, member.player, member.meta)
    return Entry(MsgType.JOIN, member.actor, head, member=member)


def leave_entry(actor: int, close_code: int) -> Entry:
    return Entry(MsgType.LEAVE, actor, protocol.leave_head(actor, close_code))
