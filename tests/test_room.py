"""relay.room: the room's order (offsets), members, actor numbers and snapshot."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import protocol
from relay.protocol import MsgType
from relay.room import (
    Entry,
    Member,
    RoomState,
    event_entry,
    join_entry,
    leave_entry,
    new_epoch,
    snapshot_cost,
    state_entry,
)


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack_one(wire: bytes) -> Any:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(wire)
    [message] = list(unpacker)
    return message


def joined(room: RoomState, player: str, **meta: Any) -> Member:
    member = Member(room.new_actor(), player, meta)
    room.sequence([join_entry(member)])
    return member


def snapshot_values(room: RoomState) -> dict[int, dict[Any, Any]]:
    return {
        actor: {key: msgpack.unpackb(raw, raw=False) for key, raw in values.items()}
        for actor, values in room.snapshot.items()
    }


def test_new_room_is_empty() -> None:
    room = RoomState("grid:a")
    assert (room.offset, room.members, room.snapshot, room.member_list()) == (0, {}, {}, [])
    assert isinstance(room.epoch, str) and room.epoch
    assert room.snapshot_bytes() == 0


def test_epochs_differ_between_rooms() -> None:
    assert RoomState("a").epoch != RoomState("a").epoch
    assert len({new_epoch() for _ in range(50)}) == 50


def test_sequence_gives_consecutive_offsets() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    entries = [event_entry(ann.actor, seq, packb(seq)) for seq in range(1, 6)]
    room.sequence(entries)
    assert [e.offset for e in entries] == [2, 3, 4, 5, 6]
    assert room.offset == 6
    more = [event_entry(ann.actor, 6, packb("x")), state_entry(ann.actor, "k", packb(1))]
    room.sequence(more)
    assert [e.offset for e in more] == [7, 8]
    assert room.offset == 8


def test_sequence_of_nothing_changes_nothing() -> None:
    room = RoomState("r")
    room.sequence([])
    assert room.offset == 0


def test_sequenced_wire_is_head_plus_offset() -> None:
    room = RoomState("r", offset=299)
    ann = Member(room.new_actor(), "ann", {"name": "Ann"})
    entries = [
        join_entry(ann),
        event_entry(ann.actor, 5, b"\xa2hi"),
        state_entry(ann.actor, "pos", b"\x92\x01\x02"),
        leave_entry(ann.actor, 1000),
    ]
    room.sequence(entries)
    for entry in entries:
        assert entry.wire == entry.head + packb(entry.offset)
    assert [unpack_one(e.wire) for e in entries] == [
        [5, 1, "ann", {"name": "Ann"}, 300],
        [1, 1, 5, "hi", 301],
        [2, 1, "pos", [1, 2], 302],
        [6, 1, 1000, 303],
    ]


def test_entry_constructors() -> None:
    event = event_entry(3, 9, b"\x01")
    assert (event.kind, event.actor, event.head) == (MsgType.EVENT, 3, protocol.event_head(3, 9, b"\x01"))
    state = state_entry(3, "k", b"\x02")
    assert (state.kind, state.actor, state.key, state.value) == (MsgType.STATE, 3, "k", b"\x02")
    assert state.head == protocol.state_head(3, "k", b"\x02")
    member = Member(4, "bob", {})
    join = join_entry(member)
    assert (join.kind, join.actor, join.member) == (MsgType.JOIN, 4, member)
    leave = leave_entry(4, 4008)
    assert (leave.kind, leave.actor, leave.head) == (MsgType.LEAVE, 4, protocol.leave_head(4, 4008))
    assert all(e.offset == 0 and e.wire == b"" for e in (event, state, join, leave))


def test_droppable_kinds() -> None:
    assert event_entry(1, 1, b"\x01").droppable
    assert Entry(MsgType.DIRECT, 1, b"", wire=b"x").droppable
    assert not state_entry(1, "k", b"\x01").droppable
    assert not join_entry(Member(1, "a", {})).droppable
    assert not leave_entry(1, 1000).droppable


def test_join_adds_member() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    bob = joined(room, "bob", name="Bob")
    assert room.members == {1: ann, 2: bob}
    assert room.member_list() == [(1, "ann", {}), (2, "bob", {"name": "Bob"})]
    assert room.find_player("bob") is bob
    assert room.find_player("cy") is None


def test_state_sets_and_replaces_keys() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    room.sequence([state_entry(ann.actor, "pos", packb([1, 2])), state_entry(ann.actor, 7, packb("x"))])
    room.sequence([state_entry(ann.actor, "pos", packb([3, 4]))])
    assert snapshot_values(room) == {ann.actor: {"pos": [3, 4], 7: "x"}}
    assert room.snapshot_bytes() == len(packb([3, 4])) + len(packb("x"))


def test_state_nil_deletes_key_and_then_the_empty_map() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    room.sequence([state_entry(ann.actor, "a", packb(1)), state_entry(ann.actor, "b", packb(2))])
    room.sequence([state_entry(ann.actor, "a", protocol.NIL)])
    assert snapshot_values(room) == {ann.actor: {"b": 2}}
    room.sequence([state_entry(ann.actor, "b", protocol.NIL)])
    assert room.snapshot == {}


def test_state_nil_for_unknown_key_leaves_no_empty_map() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    room.sequence([state_entry(ann.actor, "never-set", protocol.NIL)])
    assert room.snapshot == {}
    assert room.offset == 2


def test_state_from_someone_who_left_changes_nothing_but_is_ordered() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    room.sequence([leave_entry(ann.actor, 1000)])
    late = state_entry(ann.actor, "pos", packb(1))
    room.sequence([late])
    assert room.snapshot == {}
    assert late.offset == 3 and room.offset == 3


def test_leave_removes_member_and_its_state() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    bob = joined(room, "bob")
    room.sequence([state_entry(ann.actor, "pos", packb(1)), state_entry(bob.actor, "pos", packb(2))])
    room.sequence([leave_entry(ann.actor, 1001)])
    assert room.members == {bob.actor: bob}
    assert snapshot_values(room) == {bob.actor: {"pos": 2}}
    assert room.find_player("ann") is None


def test_actor_numbers_are_never_reused() -> None:
    room = RoomState("r")
    ann = joined(room, "ann")
    bob = joined(room, "bob")
    room.sequence([leave_entry(bob.actor, 1000), leave_entry(ann.actor, 1000)])
    again = joined(room, "ann")
    assert (ann.actor, bob.actor, again.actor) == (1, 2, 3)
    assert room.members == {3: again}


def test_join_from_elsewhere_moves_next_actor_past_it() -> None:
    # a mirror applying a JOIN whose actor was chosen by the authority
    room = RoomState("r")
    room.sequence([join_entry(Member(7, "far", {}))])
    assert room.new_actor() == 8


def test_one_batch_mixes_everything_in_order() -> None:
    room = RoomState("r")
    ann = Member(room.new_actor(), "ann", {})
    bob = Member(room.new_actor(), "bob", {})
    entries = [
        join_entry(ann),
        join_entry(bob),
        state_entry(ann.actor, "k", packb(1)),
        state_entry(bob.actor, "k", packb(2)),
        event_entry(ann.actor, 1, packb("go")),
        leave_entry(ann.actor, 1000),
    ]
    room.sequence(entries)
    assert [e.offset for e in entries] == [1, 2, 3, 4, 5, 6]
    assert room.member_list() == [(bob.actor, "bob", {})]
    assert snapshot_values(room) == {bob.actor: {"k": 2}}


def test_mirror_applying_sequenced_entries_matches_the_authority() -> None:
    authority = RoomState("r")
    mirror = RoomState("r", epoch=authority.epoch)
    ann = Member(authority.new_actor(), "ann", {})
    entries = [join_entry(ann), state_entry(ann.actor, "k", packb([1])), event_entry(ann.actor, 1, packb(0))]
    authority.sequence(entries)
    for entry in entries:
        mirror.apply(entry)
    assert mirror.offset == authority.offset == 3
    assert mirror.members == authority.members
    assert mirror.snapshot == authority.snapshot


def test_welcome_from_room_state_reads_back() -> None:
    room = RoomState("grid:lobby")
    ann = joined(room, "ann")
    room.sequence([state_entry(ann.actor, "pos", packb([0, 0]))])
    wire = protocol.welcome(
        actor=ann.actor,
        room=room.room,
        members=room.member_list(),
        snapshot=room.snapshot,
        server_time_ms=1,
        limits={"max_frame_bytes": 1, "max_msgs_per_s": 1},
        offset=room.offset,
        epoch=room.epoch,
        resume_token="t",
        last_seq=None,
    )
    message = unpack_one(wire)
    assert message[3:6] == ["grid:lobby", [[1, "ann", {}]], {1: {"pos": [0, 0]}}]
    assert message[8:10] == [2, room.epoch]


# --- a resume's WELCOME: the room as it was at the client's offset ----------------------

# A room's life as steps: ("join",), ("state", member index, key, value or None), ("leave", member index), ("event", i).
STEPS = st.lists(
    st.one_of(
        st.just(("join",)),
        st.tuples(st.just("state"), st.integers(0, 5), st.sampled_from(["a", "b", 1]), st.none() | st.integers(0, 3)),
        st.tuples(st.just("leave"), st.integers(0, 5)),
        st.tuples(st.just("event"), st.integers(0, 3)),
    ),
    max_size=40,
)


def lived(steps: list[tuple[Any, ...]]) -> tuple[RoomState, list[Entry]]:
    """The authority after ``steps``, and every entry it sequenced."""
    room = RoomState("r")
    actors: list[int] = []
    entries: list[Entry] = []
    for step in steps:
        if step[0] == "join":
            member = Member(room.new_actor(), f"p{len(actors)}", {})
            actors.append(member.actor)
            batch = [join_entry(member)]
        elif not actors:
            continue
        elif step[0] == "state":
            batch = [state_entry(actors[step[1] % len(actors)], step[2], packb(step[3]))]
        elif step[0] == "leave":
            batch = [leave_entry(actors[step[1] % len(actors)], 1000)]
        else:
            batch = [event_entry(actors[0], step[1], packb(step[1]))]
        room.sequence(batch)
        entries += batch
    return room, entries


@settings(max_examples=300, derandomize=True, deadline=None)
@given(STEPS, st.integers(0, 8), st.sampled_from([0, 2, 5]), st.data())
def test_a_mirror_rewinds_to_exactly_the_room_at_an_earlier_offset(steps, undo_size, undo_bytes, data) -> None:
    authority, entries = lived(steps)
    start = data.draw(st.integers(0, len(entries)), label="mirror made at")
    mirror = RoomState("r", epoch=authority.epoch, undo_size=undo_size, undo_bytes=undo_bytes, undo_floor=start)
    replayed, _ = lived([])  # the room up to ``start``, as a mirror made from a WELCOME would be
    for entry in entries[:start]:
        replayed.apply(entry)
    mirror.offset, mirror.members, mirror.snapshot = start, dict(replayed.members), {
        a: dict(v) for a, v in replayed.snapshot.items()
    }
    mirror.snapshot_size = replayed.snapshot_size
    for entry in entries[start:]:
        mirror.apply(entry)
    for room in (authority, mirror):  # what counts against max_snapshot_bytes is kept exact
        costs = [snapshot_cost(v) for values in room.snapshot.values() for v in values.values()]
        assert room.snapshot_size == sum(costs)
    for offset in range(len(entries) + 1):
        at = mirror.rewound(offset)
        if at is None:
            continue
        back_then, _ = lived([])
        for entry in entries[:offset]:
            back_then.apply(entry)
        assert at == (back_then.member_list(), back_then.snapshot), offset
    # It always reaches back over the last undo_size changes, and never claims to reach
    # before the mirror was made.
    if not undo_bytes:  # bounded by count alone, it reaches back over the last undo_size changes
        changes = [e.offset for e in entries[start:] if e.kind is not MsgType.EVENT]
        reach = changes[-undo_size - 1] if undo_size and len(changes) > undo_size else start
        assert mirror.rewound(max(reach, start)) is not None or not undo_size
    assert mirror.undo_used <= max(undo_bytes, 0) or not undo_bytes
    assert start == 0 or mirror.rewound(start - 1) is None
    # With the undo records Redis keeps in the history, it reaches back to any offset.
    older = with_undo_records(entries)
    for offset in range(len(entries) + 1):
        at = mirror.rewound(offset, older)
        assert (at is None) == (offset > mirror.offset or (not undo_size and offset < mirror.offset)), offset
        if at is not None:
            back_then, _ = lived([])
            for entry in entries[:offset]:
                back_then.apply(entry)
            assert at == (back_then.member_list(), back_then.snapshot), offset
    gap = [e for e in older if e.offset != start]  # one missing: it cannot claim to reach past it
    assert start == 0 or not undo_size or mirror.rewound(start - 1, gap) is None


def with_undo_records(entries: list[Entry]) -> list[Entry]:
    """The entries as the Redis history gives them: each with what it replaced."""
    room, out = RoomState("r"), []
    for e in entries:
        before = None
        if e.kind is MsgType.STATE and e.actor in room.members:
            before = room.snapshot.get(e.actor, {}).get(e.key)  # type: ignore[arg-type]
        elif e.kind is MsgType.LEAVE and e.actor in room.members:
            before = (room.members[e.actor], dict(room.snapshot.get(e.actor, {})))
        out.append(dataclasses.replace(e, undo=(before,)))
        room.apply(e)
    return out


def test_history_keeps_at_most_history_bytes_of_messages() -> None:
    room = RoomState("r", history_size=1000, history_bytes=1000)
    ann = joined(room, "ann")
    for i in range(10):
        room.sequence([event_entry(ann.actor, i, packb("x" * 300))])
    kept = room.history_after(room.offset - 3, room.epoch)
    assert kept is not None and [unpack_one(e.wire)[3] for e in kept] == ["x" * 300] * 3
    assert room.history_after(room.offset - 4, room.epoch) is None  # past the bytes: a fresh snapshot
    assert room.history_used == sum(len(wire) for *_, wire in room.history or ())
    assert room.history_used <= 1000


def test_the_undo_log_keeps_at_most_undo_bytes_of_old_values() -> None:
    authority = RoomState("r")
    mirror = RoomState("r", epoch=authority.epoch, undo_size=1000, undo_bytes=1000)
    ann = joined(authority, "ann")
    mirror.apply(Entry(MsgType.JOIN, ann.actor, b"", member=ann, offset=authority.offset))
    for i in range(10):  # the same key rewritten with 300-byte values: each keeps the one before
        entry = state_entry(ann.actor, "k", packb(str(i) * 300))
        authority.sequence([entry])
        mirror.apply(entry)
    assert mirror.undo_used <= 1000
    assert mirror.rewound(authority.offset - 3) == ([ann.as_wire()], {ann.actor: {"k": packb("6" * 300)}})
    assert mirror.rewound(1) is None  # further back than the bytes kept: a resume gets a fresh snapshot
