"""relay.outbox: one client's bounded outgoing buffer, driven with sequenced room entries.

What comes out of :meth:`Outbox.take` is read back with ``msgpack.Unpacker`` like a
client does, so the checks are about the messages a client would see.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import protocol
from relay.outbox import Batch, Outbox
from relay.protocol import ErrorCode, MsgType
from relay.room import Entry, Member, RoomState, event_entry, join_entry, leave_entry, state_entry

FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack_all(frame: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    return list(unpacker)


class Room:
    """Hands out sequenced entries with consecutive offsets, as a room would."""

    def __init__(self) -> None:
        self.offset = 0

    def seal(self, entry: Entry) -> Entry:
        self.offset += 1
        entry.offset = self.offset
        entry.wire = protocol.with_offset(entry.head, self.offset)
        return entry

    def event(self, actor: int = 1, data: Any = "e") -> Entry:
        return self.seal(event_entry(actor, self.offset + 1, packb(data)))

    def state(self, actor: int, key: str | int, data: Any) -> Entry:
        return self.seal(state_entry(actor, key, packb(data)))

    def join(self, actor: int) -> Entry:
        return self.seal(join_entry(Member(actor, f"p{actor}", {})))

    def leave(self, actor: int) -> Entry:
        return self.seal(leave_entry(actor, 1000))


def batch(*entries: Entry) -> Batch:
    return Batch(b"".join(e.wire for e in entries), list(entries))


def direct_batch(to_actor: int, from_actor: int, seq: int, data: Any) -> Batch:
    wire = protocol.direct(from_actor, seq, packb(data))
    return Batch(wire, [Entry(MsgType.DIRECT, to_actor, b"", wire=wire)])


def drain(outbox: Outbox) -> list[bytes]:
    frames = []
    while (frame := outbox.take()) is not None:
        frames.append(frame)
    return frames


def messages(outbox: Outbox) -> list[Any]:
    return [m for frame in drain(outbox) for m in unpack_all(frame)]


def outbox(soft: int = 1000, hard: int = 4000, frame: int = 100_000) -> Outbox:
    return Outbox(soft_bytes=soft, hard_bytes=hard, max_frame_bytes=frame)


# --- below the soft limit ----------------------------------------------------------


def test_empty_outbox_has_nothing_to_send() -> None:
    box = outbox()
    assert box.take() is None
    assert (len(box), box.size, box.must_close, box.congested_since) == (0, 0, False, None)


def test_single_pending_batch_is_handed_over_as_the_same_bytes_object() -> None:
    room = Room()
    shared = batch(room.event(), room.event(), room.state(1, "k", 1))
    first, second = outbox(), outbox()
    first.push(shared, 0.0)
    second.push(shared, 0.0)
    assert first.size == len(shared.wire)
    assert first.take() is shared.wire
    assert second.take() is shared.wire
    assert (first.size, len(first), first.take()) == (0, 0, None)


def test_single_control_message_is_handed_over_as_is() -> None:
    box = outbox()
    wire = protocol.error(3, ErrorCode.BAD_SEQ, "no")
    box.push_control(wire, 0.0)
    assert box.take() is wire


def test_pending_batches_go_out_as_one_frame_in_order() -> None:
    room = Room()
    box = outbox()
    a = batch(room.join(2))
    b = batch(room.event(2, "x"), room.state(2, "k", 1))
    box.push(a, 0.0)
    box.push_control(protocol.pong(b"\x05", 9), 0.0)
    box.push(b, 0.0)
    assert len(box) == 3
    frame = box.take()
    assert frame == a.wire + protocol.pong(b"\x05", 9) + b.wire
    assert unpack_all(frame) == [[5, 2, "p2", {}, 1], [9, 5, 9], [1, 2, 2, "x", 2], [2, 2, "k", 1, 3]]
    assert (box.size, box.take()) == (0, None)


def test_duplicate_states_below_soft_are_all_kept() -> None:
    room = Room()
    box = outbox(soft=1000)
    for value in range(5):
        box.push(batch(room.state(1, "pos", value)), 0.0)
    assert [m[3] for m in messages(box)] == [0, 1, 2, 3, 4]
    assert box.coalesced_total == 0


def test_max_frame_bytes_splits_between_batches() -> None:
    room = Room()
    box = outbox(frame=40)
    pushed = [batch(room.event(1, "x" * 6)) for _ in range(7)]  # 12 bytes each
    assert {len(b.wire) for b in pushed} == {12}
    for b in pushed:
        box.push(b, 0.0)
    frames = drain(box)
    assert [len(f) for f in frames] == [36, 36, 12]
    assert b"".join(frames) == b"".join(b.wire for b in pushed)
    assert box.size == 0


def test_max_frame_bytes_splits_a_large_shared_batch_into_its_entries() -> None:
    room = Room()
    box = outbox(frame=40)
    entries = [room.event(1, "x" * 5) for _ in range(7)]
    box.push(batch(*entries), 0.0)
    frames = drain(box)
    assert all(len(f) <= 40 for f in frames)
    assert [m[4] for f in frames for m in unpack_all(f)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_message_larger_than_max_frame_bytes_goes_out_alone() -> None:
    room = Room()
    box = outbox(frame=40)
    small, big, small2 = room.event(1, "a"), room.event(1, "y" * 100), room.event(1, "b")
    for entry in (small, big, small2):
        box.push(batch(entry), 0.0)
    assert drain(box) == [small.wire, big.wire, small2.wire]


# --- past the soft limit: coalescing STATE ---------------------------------------


def test_past_soft_only_the_newest_state_per_actor_and_key_survives_in_order() -> None:
    room = Room()
    box = outbox(soft=150, hard=10_000)
    pushed = [
        batch(room.state(1, "pos", "old")),  # 1: superseded by 8
        batch(room.event(1, "e1")),  # 2
        batch(room.state(1, "hp", 10)),  # 3: superseded by 6
        batch(room.state(2, "pos", "b")),  # 4: another actor, same key: kept
        batch(room.join(3)),  # 5
        batch(room.state(1, "hp", 9)),  # 6
        batch(room.state(1, 1, "int key")),  # 7: kept ("1" and 1 differ)
        batch(room.state(1, "pos", "new")),  # 8
        batch(room.state(1, "1", "str key")),  # 9
        batch(room.event(1, "e2" * 40)),  # 10: big enough to cross soft_bytes
    ]
    for b in pushed[:-1]:
        box.push(b, 0.0)
    assert box.size <= box.soft_bytes and box.coalesced_total == 0
    box.push(pushed[-1], 0.0)  # crosses soft_bytes
    assert box.coalesced_total == 2
    assert box.size == sum(len(b.wire) for b in pushed) - len(pushed[0].wire) - len(pushed[2].wire)
    assert [m[-1] for m in messages(box)] == [2, 4, 5, 6, 7, 8, 9, 10]


def test_coalescing_reaches_into_shared_multi_entry_batches() -> None:
    room = Room()
    box = outbox(soft=100, hard=10_000)
    box.push(batch(room.state(1, "k", "a" * 20), room.event(1, "x"), room.state(1, "j", 0)), 0.0)
    box.push(batch(room.state(1, "k", "b" * 20), room.state(1, "j", 1), room.event(1, "y" * 30)), 0.0)
    got = messages(box)
    assert [m[-1] for m in got] == [2, 4, 5, 6]
    assert [m[3] for m in got if m[0] == MsgType.STATE] == ["b" * 20, 1]


def test_nil_state_supersedes_and_survives() -> None:
    room = Room()
    box = outbox(soft=60, hard=10_000)
    box.push(batch(room.state(1, "k", "v" * 40)), 0.0)
    box.push(batch(room.state(1, "k", None)), 0.0)
    box.push(batch(room.event(1, "z" * 20)), 0.0)
    assert messages(box) == [[2, 1, "k", None, 2], [1, 1, 3, "z" * 20, 3]]


# --- past the hard limit: dropping EVENTs ----------------------------------------


def test_past_hard_oldest_events_are_dropped_and_reported_first() -> None:
    room = Room()
    box = outbox(soft=100, hard=300)
    box.push(batch(room.join(1)), 0.0)
    events = [room.event(1, "x" * 10) for _ in range(40)]
    for entry in events:
        box.push(batch(entry), 0.0)
    assert box.dropped_total > 0
    assert box.size <= box.hard_bytes
    assert not box.must_close
    got = messages(box)
    assert got[0] == [8, box.dropped_total]
    assert got[1] == [5, 1, "p1", {}, 1]  # the JOIN, older than every EVENT, is kept
    kept = [m[4] for m in got[2:]]
    assert kept == [e.offset for e in events[box.dropped_total :]]  # the newest, in order
    assert len(kept) + box.dropped_total == len(events)


def test_dropped_is_reported_once() -> None:
    room = Room()
    box = outbox(soft=100, hard=300)
    for _ in range(40):
        box.push(batch(room.event(1, "x" * 10)), 0.0)
    first = drain(box)
    assert unpack_all(first[0])[0][0] == MsgType.DROPPED
    box.push(batch(room.event(1, "later")), 1.0)
    [frame] = drain(box)
    assert unpack_all(frame) == [[1, 1, room.offset, "later", room.offset]]


def test_drops_accumulate_into_one_count_until_taken() -> None:
    room = Room()
    box = outbox(soft=100, hard=300)
    for _ in range(100):
        box.push(batch(room.event(1, "x" * 10)), 0.0)
    total = box.dropped_total
    got = messages(box)
    assert got[0] == [8, total]
    assert [m[0] for m in got[1:]] == [MsgType.EVENT] * (100 - total)


def test_directs_are_dropped_like_events() -> None:
    box = outbox(soft=100, hard=300)
    for seq in range(40):
        box.push(direct_batch(2, 1, seq, "x" * 10), 0.0)
    got = messages(box)
    assert got[0] == [8, box.dropped_total] and box.dropped_total > 0
    seqs = [m[2] for m in got[1:]]
    assert seqs == list(range(40 - len(seqs), 40))


def test_join_leave_state_and_control_are_never_dropped() -> None:
    room = Room()
    box = outbox(soft=200, hard=600)
    keep: list[Any] = []
    for i in range(30):
        join, leave = room.join(10 + i), room.leave(10 + i)
        state = room.state(1, f"k{i}", i)
        box.push(batch(join), 0.0)
        box.push(batch(room.event(1, "x" * 20)), 0.0)
        box.push(batch(state), 0.0)
        box.push_control(protocol.error(i, ErrorCode.BAD_SEQ, "no"), 0.0)
        box.push(batch(leave), 0.0)
        keep += [join.offset, state.offset, ("error", i), leave.offset]
        if box.must_close:
            break
    assert box.dropped_total > 0
    got = messages(box)
    seen = [("error", m[1]) if m[0] == MsgType.ERROR else m[-1] for m in got if m[0] != MsgType.DROPPED]
    assert [x for x in seen if x in keep] == keep


def test_must_close_when_undroppable_messages_alone_pass_hard() -> None:
    room = Room()
    box = outbox(soft=100, hard=300)
    for actor in range(1, 100):
        box.push(batch(room.join(actor)), 0.0)
        if box.must_close:
            break
    assert box.must_close
    assert box.dropped_total == 0
    assert box.hard_bytes < box.size <= box.hard_bytes + len(room.join(999).wire)


def test_must_close_for_control_messages_too() -> None:
    box = outbox(soft=100, hard=300)
    while not box.must_close:
        box.push_control(protocol.error(1, ErrorCode.MALFORMED, "x" * 30), 0.0)
    assert box.size > box.hard_bytes


def test_events_alone_never_force_a_close() -> None:
    room = Room()
    box = outbox(soft=100, hard=300)
    for _ in range(1000):
        box.push(batch(room.event(1, "x" * 30)), 0.0)
        assert box.size <= box.hard_bytes
    assert not box.must_close


def test_frame_with_dropped_notice_respects_max_frame_bytes() -> None:
    room = Room()
    box = outbox(soft=100, hard=200, frame=112)
    for _ in range(30):
        box.push(batch(room.event(1, "x" * 10)), 0.0)  # 16 bytes each: 7 fill a frame exactly
    assert box.dropped_total > 0
    frames = drain(box)
    assert unpack_all(frames[0])[0] == [8, box.dropped_total]
    assert all(len(f) <= 112 for f in frames)


def test_no_close_while_newest_states_fit_under_hard() -> None:
    room = Room()
    box = outbox(soft=1000, hard=2000)
    for key in range(19):  # 19 distinct keys, 97 bytes each: 1843 bytes, under hard
        box.push(batch(room.state(1, key, "v" * 90)), 0.0)
    for _ in range(5):  # newer values for key 0: the newest STATEs stay at 1843 bytes
        box.push(batch(room.state(1, 0, "w" * 90)), 0.0)
    assert not box.must_close


def test_superseded_state_goes_before_any_event_is_dropped() -> None:
    room = Room()
    box = outbox(soft=1000, hard=2000)
    for key in range(19):
        box.push(batch(room.state(1, key, "v" * 90)), 0.0)
    box.push(batch(room.event(2, "e" * 90)), 0.0)
    box.push(batch(room.state(1, 0, "w" * 90)), 0.0)  # without the old key 0: 1940 bytes
    assert box.dropped_total == 0


# --- congestion time ---------------------------------------------------------------


def test_congested_since_is_set_past_hard_and_cleared_below_soft() -> None:
    room = Room()
    box = outbox(soft=100, hard=300, frame=64)
    for t in range(10):
        box.push(batch(room.event(1, "x" * 20)), float(t))
        assert box.congested_since is None  # below hard so far
        if box.size > 250:
            break
    while box.congested_since is None:
        box.push(batch(room.event(1, "x" * 20)), 50.0)
    assert box.congested_since == 50.0
    box.push(batch(room.event(1, "x" * 20)), 51.0)
    assert box.congested_since == 50.0  # the time it became congested, not the latest
    box.take()  # one frame of at most 64 bytes: still above soft
    assert box.size > box.soft_bytes
    assert box.congested_since == 50.0
    drain(box)
    assert box.congested_since is None


def test_overdue() -> None:
    room = Room()
    box = outbox(soft=100, hard=300)
    assert not box.overdue(1e9, 5.0)
    while box.congested_since is None:
        box.push(batch(room.event(1, "x" * 20)), 100.0)
    assert not box.overdue(104.0, 5.0)
    assert not box.overdue(105.0, 5.0)
    assert box.overdue(105.5, 5.0)
    drain(box)
    assert not box.overdue(1000.0, 5.0)


# --- DROPPED notice edge cases ---------------------------------------------------------


def test_dropped_notice_is_sent_even_when_nothing_else_is_pending() -> None:
    room = Room()
    box = outbox(soft=100, hard=200)
    box.push(batch(room.event(1, "x" * 300)), 0.0)  # one EVENT larger than hard_bytes
    assert box.dropped_total == 1
    assert box.take() == protocol.dropped(1)


def test_dropped_notice_and_a_message_that_only_fits_alone_go_in_separate_frames() -> None:
    room = Room()
    box = outbox(soft=100, hard=200, frame=17)
    for _ in range(30):
        box.push(batch(room.event(1, "x" * 10)), 0.0)  # 16 bytes each: every one fits alone
    assert box.dropped_total > 0
    frames = drain(box)
    assert unpack_all(frames[0])[0] == [8, box.dropped_total]
    assert all(len(f) <= 17 for f in frames)


# --- properties ----------------------------------------------------------------------

KINDS = st.sampled_from(
    ["event", "event", "event", "state", "state", "join", "leave", "control", "direct", "shared"]
)
OP = st.tuples(KINDS, st.integers(0, 3), st.integers(0, 3), st.integers(0, 120))  # kind, actor, key, size
OPS = st.lists(OP, min_size=1, max_size=120)


@FAST
def check_frame(frame_bytes: bytes, max_frame_bytes: int) -> None:
    """A frame is over max_frame_bytes only when it holds a single message (and maybe the
    DROPPED notice): a message is never split."""
    if len(frame_bytes) > max_frame_bytes:
        others = [m for m in unpack_all(frame_bytes) if m[0] != MsgType.DROPPED]
        assert len(others) == 1


# soft_bytes of at least 150 keeps every message under the drop target: a lone EVENT bigger
# than that is a known bug with its own test (test_dropped_notice_is_sent_even_when_...).
@given(OPS, st.integers(150, 400), st.integers(0, 400), st.integers(30, 300), st.integers(0, 8))
def test_what_a_client_gets_is_explained_by_the_policy(
    ops: list[tuple[str, int, int, int]], soft: int, extra: int, frame: int, take_every: int
) -> None:
    """Pushes and takes at random: what comes out is the pushed stream minus only what the
    policy allows (superseded STATEs, reported EVENT/DIRECT drops), in order; size stays bounded."""
    room = Room()
    box = Outbox(soft_bytes=soft, hard_bytes=soft + extra, max_frame_bytes=frame)
    sent: list[tuple[Any, ...]] = []  # identities of everything pushed, in order
    got: list[Any] = []
    reported = 0
    control_seq = 0
    for step, (kind, actor, key, size) in enumerate(ops):
        data = "x" * size
        if kind == "event":
            entries = [room.event(actor, data)]
        elif kind == "state":
            entries = [room.state(actor, key, data if size % 7 else None)]
        elif kind == "join":
            entries = [room.join(actor)]
        elif kind == "leave":
            entries = [room.leave(actor)]
        elif kind == "shared":
            entries = [room.event(actor, data), room.state(actor, key, data), room.event(actor, "y")]
        else:
            entries = []
        if kind == "control":
            control_seq += 1
            wire = protocol.error(control_seq, ErrorCode.BAD_SEQ, data)
            box.push_control(wire, float(step))
            sent.append(("control", control_seq))
        elif kind == "direct":
            control_seq += 1
            b = direct_batch(9, actor, control_seq, data)
            box.push(b, float(step))
            sent.append(("direct", control_seq))
            wire = b.wire
        else:
            b = batch(*entries)
            box.push(b, float(step))
            sent += [(e.kind.name.lower(), e.offset, e.actor, e.key) for e in entries]
            wire = b.wire
        assert box.size <= box.hard_bytes + len(wire)
        assert (len(box) == 0) == (box.size == 0 and box.backlog_size == 0)
        if box.size > box.hard_bytes:
            assert box.must_close
        if box.must_close:
            break  # the owner closes the connection here
        if take_every and step % take_every == 0:
            frame_bytes = box.take()
            if frame_bytes is not None:
                check_frame(frame_bytes, frame)
                got += unpack_all(frame_bytes)
            assert (len(box) == 0) == (box.size == 0 and box.backlog_size == 0)
    if not box.must_close:
        before = box.size
        frames = drain(box)
        for f in frames:
            check_frame(f, frame)
        out = [m for f in frames for m in unpack_all(f)]
        notices = sum(len(protocol.dropped(m[1])) for m in out if m[0] == MsgType.DROPPED)
        assert sum(len(f) for f in frames) - notices == before
        got += out
        assert box.size == 0

    # what arrived, as identities comparable to what was sent
    arrived: list[tuple[Any, ...]] = []
    for m in got:
        if m[0] == MsgType.DROPPED:
            reported += m[1]
        elif m[0] == MsgType.ERROR:
            arrived.append(("control", m[1]))
        elif m[0] == MsgType.DIRECT:
            arrived.append(("direct", m[2]))
        else:
            kind = {1: "event", 2: "state", 5: "join", 6: "leave"}[m[0]]
            arrived.append((kind, m[-1], m[1], m[2] if kind == "state" else None))
    # in order, a subsequence of what was sent
    position = {item: i for i, item in enumerate(sent)}
    indexes = [position[item] for item in arrived]
    assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
    if box.must_close:
        return
    missing = [item for item in sent if item not in set(arrived)]
    lost_moves = [item for item in missing if item[0] in ("event", "direct")]
    assert reported == box.dropped_total == len(lost_moves)
    for item in missing:
        if item[0] == "state":  # only a STATE with a newer STATE for the same slot goes
            later = sent[position[item] + 1 :]
            assert any(other[0] == "state" and other[2:] == item[2:] for other in later)
        else:
            assert item[0] in ("event", "direct")


# --- a resume's replay -------------------------------------------------------------


def offsets(frames: list[bytes]) -> list[int]:
    return [m[-1] for frame in frames for m in unpack_all(frame) if m[0] in (1, 2, 5, 6)]


def test_a_replay_far_past_the_hard_limit_goes_out_whole_in_order_frame_by_frame() -> None:
    room = Room()
    missed = [room.event(data="x" * 200) if i % 2 else room.state(1, "pos", i) for i in range(200)]
    box = outbox(soft=1000, hard=4000, frame=2000)
    box.push_control(protocol.pong(packb(1), 2), 0.0)  # WELCOME would be here: it goes first
    box.catch_up(missed, limit=1_000_000)
    box.push(batch(room.event(data="live")), 0.0)  # arrives while catching up: behind the replay
    sizes = []
    frames = []
    while (frame := box.take()) is not None:
        frames.append(frame)
        sizes.append(box.size)
        assert (len(box) == 0) == (box.size == 0 and box.backlog_size == 0)
    assert unpack_all(frames[0])[0][0] == MsgType.PONG
    assert offsets(frames) == list(range(1, 202))  # nothing coalesced, nothing dropped
    assert max(len(f) for f in frames) <= 2000 and max(sizes) <= 1000  # paced: a frame at a time
    assert (box.dropped_total, box.coalesced_total, box.must_close, len(box), box.backlog_size) == (0, 0, False, 0, 0)


def test_a_replay_from_the_room_history_is_not_coalesced_when_frames_are_smaller_than_soft() -> None:
    # The history keeps a STATE's bytes, not its key: coalesced, every key of one actor
    # would count as one, and key "a" below would be lost among the values of key "b".
    history = RoomState("r", history_size=1000)
    history.sequence([join_entry(Member(1, "p1", {}))])
    start = history.offset
    missed = [state_entry(1, "b", packb(f"b{i}" + "-" * 80)) for i in range(20)]
    missed += [state_entry(1, "a", packb("A"))]
    missed += [state_entry(1, "b", packb(f"b{i}" + "-" * 80)) for i in range(20, 40)]
    history.sequence(missed)
    box = outbox(soft=4096, hard=65536, frame=1024)
    box.catch_up(history.history_after(start, history.epoch), limit=1_000_000)
    frames = [box.take()]  # the client reads one frame; meanwhile the room goes on past soft
    room = Room()
    room.offset = history.offset
    for _ in range(60):
        box.push(batch(room.event(actor=2, data="x" * 60)), 0.0)
    frames += drain(box)
    assert offsets(frames) == list(range(start + 1, room.offset + 1))
    assert box.coalesced_total == 0


def test_while_catching_up_nothing_jumps_the_queue() -> None:
    room = Room()
    box = outbox()
    box.catch_up([room.event()], limit=1_000_000)
    assert len(box)  # a sender must not write a live frame straight to the socket now
    box.push(batch(room.event()), 0.0)
    assert offsets(drain(box)) == [1, 2]


def test_a_client_that_falls_further_behind_while_catching_up_must_be_closed() -> None:
    room = Room()
    box = outbox()
    box.catch_up([room.event(data="x" * 100)], limit=2000)
    for _ in range(30):  # nobody reads
        box.push(batch(room.event(data="x" * 100)), 0.0)
    assert box.must_close
