"""Game rules with bugs on purpose, for the tests of how the relay contains them.

Served as ``--rules faulty=tests.faulty_rules:FaultyRules``. The part of the room's
name after ``faulty:`` and before the first ``-`` names the hook that raises
(``faulty:join-7``: ``on_join``; ``init``, ``leave`` and ``observe`` likewise). The
data of a move picks what ``validate`` does with it (``VERDICTS``); anything else
is accepted.
"""

from __future__ import annotations

from typing import Any

from relay.rules.base import ACCEPT, BaseRules, Move, Reject, Replace, RoomView, Verdict


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


VERDICTS: dict[str, Any] = {
    "none": None,  # a forgotten return
    "true": True,
    "reject-class": Reject,  # the class, not an instance
    "bad-code": Reject("no", "Not A Code!"),
    "bad-reason": Reject(42),  # type: ignore[arg-type]
    "huge": Replace("x" * 100_000),
    "deep": Replace(_nested(100)),
    "list-key": Replace({(1, 2): "x"}),
    "unpackable": Replace(object()),
    "own-code": Reject("wait for your turn", "not_your_turn"),
    "clamp": Replace(5),
}


class FaultyRules(BaseRules):
    def __init__(self, room: str) -> None:
        super().__init__(room)
        self.fault = room.partition(":")[2].partition("-")[0]
        if self.fault == "init":
            raise RuntimeError("the rules' constructor fails")

    def validate(self, view: RoomView, actor: int, move: Move) -> Verdict:
        if move.data == "raise":
            raise RuntimeError("validate fails")
        if isinstance(move.data, str) and move.data in VERDICTS:
            return VERDICTS[move.data]  # type: ignore[no-any-return]
        return ACCEPT

    def on_join(self, view: RoomView, actor: int) -> None:
        if self.fault == "join":
            raise RuntimeError("on_join fails")

    def on_leave(self, view: RoomView, actor: int) -> None:
        if self.fault == "leave":
            raise RuntimeError("on_leave fails")

    def observe(self, view: RoomView, actor: int, move: Move) -> None:
        if self.fault == "observe":
            raise RuntimeError("observe fails")
