"""Grid movement: each player's STATE ``pos`` is ``[x, y]`` on a WIDTH x HEIGHT board.

A player may first appear on any free cell, then moves one step at a time (up,
down, left or right); no two players may stand on one cell. ``pos = nil`` takes
the player off the board; it comes back on the cell it left or one step from
there (else stepping off and on would jump across the board). That cell is
remembered by the rules of the process that saw the player step off: with Redis,
another node that starts serving the room afterwards (it builds its rules from the
snapshot, where an off-board player has no ``pos``) lets it come back anywhere.
Other STATE keys and EVENTs are not this rule's business and pass.
"""

from __future__ import annotations

from typing import Any

from relay.rules.base import ACCEPT, BaseRules, Move, Reject, RoomView, Verdict

POS = "pos"


class GridRules(BaseRules):
    WIDTH = 20
    HEIGHT = 15

    def __init__(self, room: str) -> None:
        super().__init__(room)
        self.positions: dict[int, tuple[int, int]] = {}
        self.occupied: dict[tuple[int, int], int] = {}
        self.left_from: dict[int, tuple[int, int]] = {}  # the cell of a player taken off the board

    def validate(self, view: RoomView, actor: int, move: Move) -> Verdict:
        if move.kind != "state" or move.key != POS:
            return ACCEPT
        if move.data is None:
            self._place(actor, None)
            return ACCEPT
        cell = self._cell(move.data)
        if cell is None:
            return Reject(f"pos must be [x, y] with 0 <= x < {self.WIDTH} and 0 <= y < {self.HEIGHT}")
        here = self.positions.get(actor) or self.left_from.get(actor)
        if here is not None and abs(cell[0] - here[0]) + abs(cell[1] - here[1]) > 1:
            return Reject(f"one step at a time: from {list(here)} to {list(cell)} is too far")
        holder = self.occupied.get(cell)
        if holder is not None and holder != actor:
            return Reject(f"cell {list(cell)} is taken by actor {holder}")
        self._place(actor, cell)
        return ACCEPT

    def observe(self, view: RoomView, actor: int, move: Move) -> None:
        if move.kind == "state" and move.key == POS:
            self._place(actor, self._cell(move.data))

    def on_leave(self, view: RoomView, actor: int) -> None:
        self._place(actor, None)
        self.left_from.pop(actor, None)

    def _place(self, actor: int, cell: tuple[int, int] | None) -> None:
        old = self.positions.pop(actor, None)
        if old is not None and self.occupied.get(old) == actor:
            del self.occupied[old]
        if cell is not None:
            self.positions[actor] = cell
            self.occupied[cell] = actor
            self.left_from.pop(actor, None)
        elif old is not None:
            self.left_from[actor] = old

    def _cell(self, data: Any) -> tuple[int, int] | None:
        if not isinstance(data, (list, tuple)) or len(data) != 2:
            return None
        x, y = data
        if type(x) is not int or type(y) is not int:
            return None
        if not (0 <= x < self.WIDTH and 0 <= y < self.HEIGHT):
            return None
        return (x, y)
