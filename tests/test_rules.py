"""Game rules run at arm's length (relay/rules/guard.py), and the turns rules' start mid-game."""

from __future__ import annotations

import logging
import time
from collections import Counter

import msgpack
import pytest

from relay.protocol import ErrorCode, Invalid
from relay.room import Member, RoomState, event_entry, join_entry, leave_entry, state_entry
from relay.rules.base import ACCEPT, BaseRules, Move, RoomView
from relay.rules.guard import MAX_REASON, GuardedRules, RulesFailures
from relay.rules.turns import TurnRules
from tests.faulty_rules import FaultyRules

LIMITS = {"max_message_bytes": 8192, "max_depth": 32}


def pack(value: object) -> bytes:
    return msgpack.packb(value)


def room_with(name: str, *actors: int) -> RoomState:
    state = RoomState(name)
    state.sequence([join_entry(Member(a, f"p{a}", {})) for a in actors])
    return state


def guarded(cls: type, state: RoomState) -> tuple[GuardedRules, Counter[str]]:
    counts: Counter[str] = Counter()
    return GuardedRules(cls, state, RulesFailures(counts), **LIMITS), counts


@pytest.mark.parametrize(
    "data", ["raise", "none", "true", "reject-class", "bad-code", "bad-reason", "huge", "deep", "list-key", "unpackable"]
)
def test_a_failing_validate_refuses_the_move_with_internal(data):
    rules, counts = guarded(FaultyRules, room_with("faulty:x", 1))
    verdict = rules.validate(1, 7, "event", pack(data))
    assert type(verdict) is Invalid
    assert (verdict.seq, verdict.code) == (7, ErrorCode.INTERNAL)
    assert counts == {"validate": 1}


def test_verdicts_that_are_fine_pass_through():
    rules, counts = guarded(FaultyRules, room_with("faulty:x", 1))
    assert rules.validate(1, 1, "event", pack("anything")) == pack("anything")
    assert rules.validate(1, 2, "state", pack("clamp"), key="pos") == pack(5)
    own = rules.validate(1, 3, "event", pack("own-code"))
    assert type(own) is Invalid and (own.code, own.message) == ("not_your_turn", "wait for your turn")
    assert not counts


def test_a_long_reason_is_cut():
    class Wordy(BaseRules):
        def validate(self, view, actor, move):
            from relay.rules.base import Reject

            return Reject("why " * 1000)

    rules, _ = guarded(Wordy, room_with("w:x", 1))
    verdict = rules.validate(1, 1, "event", pack(1))
    assert type(verdict) is Invalid and verdict.code is ErrorCode.REJECTED and len(verdict.message) == MAX_REASON


def test_hooks_that_raise_are_skipped_and_counted():
    for fault, entry in [
        ("join", join_entry(Member(2, "p2", {}))),
        ("leave", leave_entry(1, 1000)),
        ("observe", event_entry(1, 1, pack("move"))),
    ]:
        state = room_with(f"faulty:{fault}", 1)
        rules, counts = guarded(FaultyRules, state)
        before = counts.copy()
        state.sequence([entry])
        rules.tell(entry, local=False)
        hook = {"join": "on_join", "leave": "on_leave", "observe": "observe"}[fault]
        assert counts[hook] == before[hook] + 1
        assert rules.validate(1, 5, "event", pack("fine")) == pack("fine")  # still judging moves


def test_rules_that_cannot_start_refuse_every_move():
    rules, counts = guarded(FaultyRules, room_with("faulty:init", 1))
    verdict = rules.validate(1, 1, "event", pack("fine"))
    assert type(verdict) is Invalid and verdict.code is ErrorCode.INTERNAL
    rules.tell(join_entry(Member(2, "p2", {})), local=False)  # no hooks to call, nothing raised
    assert counts == {"start": 1}


def test_failures_are_logged_once_a_minute_per_room_type_and_hook(caplog):
    counts: Counter[str] = Counter()
    failures = RulesFailures(counts)
    with caplog.at_level(logging.ERROR, logger="relay.rules"):
        for room in ["faulty:a", "faulty:b", "faulty:c"]:
            rules = GuardedRules(FaultyRules, room_with(room, 1), failures, **LIMITS)
            rules.validate(1, 1, "event", pack("raise"))
        GuardedRules(FaultyRules, room_with("other:a", 1), failures, **LIMITS).validate(1, 1, "event", pack("raise"))
    assert counts == {"validate": 4}
    assert len(caplog.records) == 2  # faulty:a's, then other:a's (another room type)
    assert "validate raised RuntimeError('validate fails')" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is not None


def test_the_view_says_how_far_the_room_is():
    state = room_with("v:x", 1, 2)
    assert RoomView(state).offset == 2
    state.sequence([event_entry(1, 1, pack("go"))])
    assert RoomView(state).offset == 3


def test_turns_made_at_the_start_know_whose_turn_it_is():
    rules, _ = guarded(TurnRules, room_with("turns:x", 1, 2))
    assert type(rules.validate(2, 1, "event", pack("early"))) is Invalid
    assert rules.validate(1, 1, "event", pack("move")) == pack("move")
    assert type(rules.validate(1, 2, "event", pack("twice"))) is Invalid


def test_turns_made_mid_game_take_the_next_event_from_anyone_then_keep_order():
    # With Redis, a node whose first player joins a game under way: EVENTs so far are gone.
    state = room_with("turns:x", 1, 2, 3)
    state.sequence([event_entry(1, 1, pack("a")), event_entry(2, 1, pack("b"))])  # actor 3's turn now
    rules, _ = guarded(TurnRules, state)
    assert rules.validate(3, 1, "event", pack("c")) == pack("c")  # it cannot know: not refused
    assert type(rules.validate(3, 2, "event", pack("again"))) is Invalid  # known from here on
    remote = event_entry(1, 2, pack("d"))
    state.sequence([remote])
    rules.tell(remote, local=False)  # actor 1 played on another node: actor 2's turn
    assert rules.validate(2, 2, "event", pack("e")) == pack("e")


def test_turns_made_mid_game_learn_the_turn_from_another_nodes_event():
    state = room_with("turns:x", 1, 2)
    state.sequence([state_entry(1, "name", pack("ann"))])  # something but joins: unknown
    rules, _ = guarded(TurnRules, state)
    remote = event_entry(2, 1, pack("b"))
    state.sequence([remote])
    rules.tell(remote, local=False)  # actor 2 played: actor 1's turn
    assert type(rules.validate(2, 2, "event", pack("again"))) is Invalid
    assert rules.validate(1, 1, "event", pack("a")) == pack("a")


def test_accept_is_the_default():
    assert BaseRules("x:y").validate(RoomView(room_with("x:y", 1)), 1, Move("event", 1)) is ACCEPT


def test_turns_on_two_nodes_agree_again_after_each_event_in_the_room_order():
    # Node A serves actors 1 and 2 from the start; node B makes its rules when actor 3
    # joins mid-game (it is 2's turn), and so lets 3 play. A must follow the room order.
    state_a = room_with("turns:x", 1, 2)
    a, _ = guarded(TurnRules, state_a)
    first = event_entry(1, 1, pack("a"))
    assert a.validate(1, 1, "event", pack("a")) == pack("a")
    state_a.sequence([first])
    a.tell(first, local=True)
    joined = join_entry(Member(3, "p3", {}))
    state_a.sequence([joined])
    a.tell(joined, local=False)
    state_b = RoomState("turns:x")
    state_b.sequence([join_entry(Member(1, "p1", {})), join_entry(Member(2, "p2", {}))])
    state_b.sequence([event_entry(1, 1, pack("a")), join_entry(Member(3, "p3", {}))])
    b, _ = guarded(TurnRules, state_b)
    assert b.validate(3, 1, "event", pack("c")) == pack("c")  # B cannot know: 3 plays
    out_of_turn = event_entry(3, 1, pack("c"))
    state_a.sequence([out_of_turn])
    a.tell(out_of_turn, local=False)  # in the room order: A passes the turn on from 3, to 1
    for rules, refused in ((a, 2), (b, 3)):  # both: it is actor 1's turn
        assert type(rules.validate(refused, 9, "event", pack("no"))) is Invalid
    assert a.validate(1, 2, "event", pack("ok")) == pack("ok")


def test_a_reason_that_cannot_be_sent_or_a_relay_code_as_a_string():
    class Odd(BaseRules):
        def validate(self, view, actor, move):
            from relay.rules.base import Reject

            return Reject("bad \udc80 text") if move.data == "surrogate" else Reject("later", "unavailable")

    rules, counts = guarded(Odd, room_with("o:x", 1))
    verdict = rules.validate(1, 1, "event", pack("surrogate"))
    assert type(verdict) is Invalid and verdict.code is ErrorCode.INTERNAL and counts == {"validate": 1}
    verdict = rules.validate(1, 2, "event", pack("other"))
    assert type(verdict) is Invalid and verdict.code is ErrorCode.UNAVAILABLE  # the relay's own, as such


def test_a_slow_validate_is_counted_and_its_move_relayed():
    class Slow(BaseRules):
        def validate(self, view, actor, move):
            deadline = time.perf_counter() + 0.01  # a rule that computes too much
            while time.perf_counter() < deadline:
                pass
            return ACCEPT

    rules, counts = guarded(Slow, room_with("s:x", 1))
    assert rules.validate(1, 1, "event", pack("m")) == pack("m")
    assert counts == {"slow_validate": 1}


def test_a_rules_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    # `relay serve` (a console script) has no current directory on sys.path, as
    # `python3 -m relay serve` has: the rules of one's own game must load under both.
    from relay.rules.base import load

    (tmp_path / "house_rules_of_this_test.py").write_text(
        "from relay.rules.base import BaseRules\nclass House(BaseRules):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load("house_rules_of_this_test:House").__name__ == "House"
