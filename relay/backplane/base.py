"""The backplane interface: a few methods shaped by the relay's domain.

A backplane is the room sequencer and the bus between nodes. Guarantees, stated
once for every implementation:

* Order: the entries of one room are given consecutive offsets in one order,
  which keeps each publisher's own order, and every subscribed node receives
  them through :meth:`Receiver.deliver` in that order. The publishing node gets
  its own entries back the same way (one delivery path for one and many nodes).
* Join consistency: :meth:`Backplane.join` returns the room's members and
  snapshot at an exact offset that includes the new member's JOIN; the joining
  node must already be subscribed, so it receives every entry after it.
* Delivery: at most once between nodes. A node that detects a gap in a room's
  offsets repairs it, or else resynchronises that room: :meth:`Receiver.resync`
  (the Redis backplane's job).
* Availability: while :meth:`Backplane.ready` is false, nothing new is taken
  (joins raise :class:`Unavailable`; the node refuses moves), and nothing
  already taken is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.room import Entry, Member, RoomState


class RoomFull(Exception):
    """The room already has ``max_players_per_room`` members."""


class Unavailable(Exception):
    """The backplane cannot reach the rooms' store now (Redis is down); try again later."""


@dataclass(slots=True)
class Joined:
    member: Member
    members: list[tuple[int, str, dict[str, Any]]]
    snapshot: dict[int, dict[str | int, bytes]]
    offset: int
    epoch: str
    last_seq: int | None = None  # a takeover: the highest seq the room has taken from the seat
    directs: list[bytes] = field(default_factory=list)  # a takeover: DIRECTs kept for the seat meanwhile
    directs_lost: int = 0  # a takeover: DIRECTs for the seat meanwhile that were not kept (the bound)


class Receiver(Protocol):
    """What a backplane delivers into: the node's local rooms."""

    def deliver(self, room: str, entries: list[Entry]) -> None: ...

    def deliver_direct(self, room: str, to_actor: int, wire: bytes) -> None: ...

    def seat_arrived(self, room: str, actor: int) -> None:
        """This node's takeover of ``actor``'s seat shows in the room's stream: DIRECTs
        to it that follow are this node's to deliver."""

    def seat_moved(self, room: str, actor: int) -> None:
        """Another node took over this node's seat of ``actor`` (its player resumed there):
        let it go without a LEAVE, closing its connection here if it is still open."""

    def seat_gone(self, room: str, actor: int, offset: int) -> None:
        """This node's seat of ``actor`` is no longer in the room (removed while this node
        was silent too long, or replaced), whose order had reached ``offset``: its moves
        were not taken; close it here."""

    def resync(self, room: str) -> None:
        """This node lost part of the room's order and could not repair it: its seats
        there must start again from a fresh snapshot (their clients are closed and rejoin)."""


class Backplane(Protocol):
    name: str
    # Whether seats outlive this process: a resume token works on any node
    # (:meth:`takeover`), and a node shutting down leaves its seats held, not left.
    hands_off_seats: bool

    async def start(self, receiver: Receiver) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, room: str) -> None:
        """Start receiving the room's entries on this node (before joining players)."""

    async def unsubscribe(self, room: str) -> None: ...

    async def join(
        self, room: str, player: str, meta: dict[str, Any], *, max_players: int, secret: str = ""
    ) -> Joined:
        """Seat a player: a new actor and a JOIN in the room order; may raise RoomFull or Unavailable.

        If the same player is already seated, its old seat first gets LEAVE with
        close code 4409; the node holding that connection closes it. ``secret`` is
        the secret half of the seat's resume token, for :meth:`takeover`.
        """

    async def takeover(self, room: str, actor: int, secret: str, player: str) -> Joined | None:
        """Move ``player``'s seat ``actor`` to this node, if ``secret`` is its token's; the
        room as it is now (``last_seq`` set), or None. Only when ``hands_off_seats``."""

    async def leave(self, room: str, actor: int, close_code: int) -> None:
        """Remove a member: LEAVE in the room order; its STATE leaves the snapshot."""

    def publish(self, room: str, entries: list[Entry], seqs: dict[int, int] | None = None) -> None:
        """Put entries in the room order and deliver them; never blocks the caller.

        ``seqs``: the highest seq taken from each seat so far (kept for a takeover).
        """

    def direct(self, room: str, to_actor: int, wire: bytes, from_actor: int | None = None, seq: int = 0) -> None:
        """Deliver one encoded DIRECT to whichever node holds ``to_actor``."""

    async def history(self, room: str, after: int, epoch: str) -> list[Entry] | None:
        """The room's entries after offset ``after``, if it is still in ``epoch`` and its
        bounded history reaches back that far; None otherwise (resume then resyncs)."""

    async def rooms(self) -> dict[str, int]:
        """Every room with members, and its member count."""

    async def room(self, room: str) -> RoomState | None:
        """A copy of the room's state, or None when it has no members."""

    async def hold_seats(self) -> None:
        """The process is shutting down: seats that outlive it (``hands_off_seats``) are
        held for a resume elsewhere from now on, before their connections close."""

    def ready(self) -> bool:
        """Whether moves can be sequenced now (false while Redis is unreachable)."""
