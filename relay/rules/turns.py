"""Turn-based play: only the player whose turn it is may send an EVENT (a move).

Turns go round the members in join order, starting with the first to join.
Each accepted EVENT passes the turn to the next member. When the player whose
turn it is leaves, the turn passes on. STATE and DIRECT (chat, presence) are
always allowed. Members present from the start can follow whose turn it is from
the room order. WELCOME does not say whose turn it is: a late joiner knows it from
the next EVENT it sees (the turn passes to the member after its sender, in actor
order, which is join order), or from the reason of a move refused out of turn.

With Redis, a node may make its rules for a room already under way (its first
player there joins mid-game). It cannot know whose turn it is, since only EVENTs
pass the turn and they are not in the snapshot. Until it sees the next EVENT, it
accepts an EVENT from any of its players, then knows the turn from that one.
Every node passes the turn on from the sender of each EVENT in the room order,
whoever it thought it was, so the nodes agree again after each EVENT.
"""

from __future__ import annotations

from relay.rules.base import ACCEPT, BaseRules, Move, Reject, RoomView, Verdict


class TurnRules(BaseRules):
    def __init__(self, room: str) -> None:
        super().__init__(room)
        self.order: list[int] = []
        self.turn: int | None = None
        self.known: bool | None = None  # whose turn it is; None until the first on_join

    def validate(self, view: RoomView, actor: int, move: Move) -> Verdict:
        if move.kind != "event":
            return ACCEPT
        if self.turn != actor and self.known:
            return Reject(f"not your turn: it is actor {self.turn}'s turn")
        self._played(actor)
        return ACCEPT

    def observe(self, view: RoomView, actor: int, move: Move) -> None:
        # The room order is the truth: an EVENT in it passes the turn on from its sender,
        # even one this node would have refused (two nodes that raced, or one that did
        # not know the turn yet), so that every node agrees again from here.
        if move.kind == "event":
            self._played(actor)

    def on_join(self, view: RoomView, actor: int) -> None:
        if self.known is None:  # made now: for a room with nothing but joins so far, the turn is the first's
            self.known = view.offset <= len(view.actors())
        if actor not in self.order:
            self.order.append(actor)
        if self.turn is None:
            self.turn = actor

    def on_leave(self, view: RoomView, actor: int) -> None:
        if actor not in self.order:
            return
        if self.turn == actor:
            self._advance()
        self.order.remove(actor)
        if not self.order or self.turn == actor:
            self.turn = self.order[0] if self.order else None

    def _played(self, actor: int) -> None:
        self.turn, self.known = actor, True
        self._advance()

    def _advance(self) -> None:
        if not self.order or self.turn not in self.order:
            self.turn = self.order[0] if self.order else None
            return
        i = self.order.index(self.turn)
        self.turn = self.order[(i + 1) % len(self.order)]
