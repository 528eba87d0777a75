"""Game rules with bugs, over real sockets: the relay refuses the move and goes on.

The rules are tests/faulty_rules.py; the room's name picks the hook that raises,
the move's data what ``validate`` returns.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from relay_client import Error, Event, Join, Leave, State, connect
from tests.helpers import next_of
from tests.relayproc import RelayProcess, free_port

pytestmark = pytest.mark.asyncio

FAULTY = "faulty=tests.faulty_rules:FaultyRules"


@pytest.fixture
def ruled(relay_with):
    return relay_with(rules=FAULTY)


def faulty_room(fault: str = "none") -> str:
    return f"faulty:{fault}-{time.monotonic_ns()}"


def rules_failures(server, hook: str) -> float:
    found = re.search(rf'^relay_rules_failures_total{{hook="{hook}"}} (\S+)$', server.get_text("/metrics"), re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_failing_validate_refuses_the_move_and_the_player_plays_on(ruled):
    bad = ["raise", "none", "reject-class", "bad-code", "huge", "deep", "list-key", "unpackable"]
    async with connect(ruled.url, faulty_room(), player="ann") as ann, connect(ruled.url, ann.room, player="bob") as bob:
        for data in bad:
            seq = ann.send_event(data)
            error = await next_of(ann, Error)
            assert (error.ref_seq, error.code) == (seq, "internal"), data
        own = ann.send_event("own-code")  # a code of the game's own
        error = await next_of(ann, Error)
        assert (error.ref_seq, error.code, error.message) == (own, "not_your_turn", "wait for your turn")
        ann.send_event("clamp")  # replaced by the rules with 5
        ann.send_event("fine")
        assert [(await next_of(bob, Event)).data for _ in range(2)] == [5, "fine"]  # nothing refused got through
    assert rules_failures(ruled, "validate") >= len(bad)


async def test_a_join_hook_that_raises_leaves_no_ghost_and_no_one_untold(ruled):
    room = faulty_room("join")
    async with connect(ruled.url, room, player="ann") as ann:
        async with connect(ruled.url, room, player="bob") as bob:
            assert (await next_of(ann, Join)).player == "bob"
            assert sorted(m.player for m in bob.members.values()) == ["ann", "bob"]
            bob.send_event("hello")
            assert (await next_of(ann, Event)).data == "hello"
        assert (await next_of(ann, Leave)).actor == bob.actor
    assert ruled.get_json("/rooms").get(room) is None  # empty, and gone
    assert rules_failures(ruled, "on_join") >= 2


async def test_a_leave_hook_that_raises_still_tells_the_others(ruled):
    room = faulty_room("leave")
    async with connect(ruled.url, room, player="ann") as ann, connect(ruled.url, room, player="cy") as cy:
        async with connect(ruled.url, room, player="bob") as bob:
            await next_of(ann, Join)
        assert (await next_of(ann, Leave)).actor == bob.actor
        assert (await next_of(cy, Leave)).actor == bob.actor
        ann.send_event("still here")
        assert (await next_of(cy, Event)).data == "still here"
        async with connect(ruled.url, room, player="dee") as dee:
            assert sorted(m.player for m in dee.members.values()) == ["ann", "cy", "dee"]
    assert rules_failures(ruled, "on_leave") >= 1


async def test_rules_that_cannot_start_refuse_every_move_of_the_room(ruled):
    room = faulty_room("init")
    async with connect(ruled.url, room, player="ann") as ann, connect(ruled.url, room, player="bob") as bob:
        seq = ann.send_event("fine")
        error = await next_of(ann, Error)
        assert (error.ref_seq, error.code) == (seq, "internal")
        async with connect(ruled.url, faulty_room(), player="cy") as cy, connect(ruled.url, cy.room) as dee:
            cy.send_event("another room is fine")  # the same rules class, started well
            assert (await next_of(dee, Event)).data == "another room is fine"
        bob.send_state("pos", [1, 1])
        assert (await next_of(bob, Error)).code == "internal"
    assert rules_failures(ruled, "start") >= 1


async def test_an_observe_that_raises_cuts_neither_the_room_nor_the_backplane(redis_server, redis_relays):
    one, two = redis_relays(redis_server.url, 2, rules=FAULTY)
    room = faulty_room("observe")
    async with connect(one.url, room, player="ann") as ann, connect(two.url, room, player="bob") as bob:
        await next_of(ann, Join)
        ann.send_event("seen by two's rules, which raise")
        assert (await next_of(bob, Event)).data == "seen by two's rules, which raise"
        bob.send_event("and back")
        assert (await next_of(ann, Event)).data == "and back"
        # Another room on the same node still gets its moves relayed, not refused as unavailable.
        async with connect(two.url, faulty_room(), player="cy") as cy, connect(two.url, cy.room) as dee:
            cy.send_event("unharmed")
            assert (await next_of(dee, Event)).data == "unharmed"
    assert rules_failures(two, "observe") >= 1
    assert rules_failures(one, "observe") >= 1


async def test_the_rules_never_hear_of_a_move_the_relay_refuses(relay_with):
    server = relay_with(max_snapshot_bytes=150)  # one key and its value of ~80 bytes fill it
    room = f"grid:{time.monotonic_ns()}"
    async with connect(server.url, room, player="ann", echo=True) as ann, connect(server.url, room, player="bob") as bob:
        ann.send_state("pad", "x" * 80)
        await next_of(ann, State)
        seq = ann.send_state("pos", [0, 0])  # too big for the snapshot: refused before the grid rules
        error = await next_of(ann, Error)
        assert (error.ref_seq, error.code) == (seq, "too_large")
        ann.send_state("pad", None)
        await next_of(ann, State)
        bob.send_state("pos", [0, 0])  # so the cell is free: ann never stood there
        assert (await next_of(ann, State)).data == [0, 0]


async def test_the_readmes_rules_example_runs_as_printed(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("For example, `chat.py`:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "chat.py").write_text(example)
    server = RelayProcess(free_port(), {"rules": "chat=chat:Chat"}, cwd=str(tmp_path)).start()
    try:
        async with connect(server.url, "chat:lobby", player="ann") as ann, connect(
            server.url, "chat:lobby", player="bob"
        ) as bob:
            shout = ann.send_event({"text": "HELLO ALL"})
            error = await next_of(ann, Error)
            assert (error.ref_seq, error.code) == (shout, "no_shouting")
            ann.send_event({"text": "hi " + "x" * 300})
            said = await next_of(bob, Event)
            assert said.data == {"text": ("hi " + "x" * 300)[:200]}
    finally:
        server.stop()
