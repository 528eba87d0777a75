"""The Redis backplane in process, against a real redis-server: its contract, edge by edge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from relay import protocol
from relay.backplane.base import RoomFull
from relay.backplane.redis import RedisBackplane
from relay.config import Settings
from relay.metrics import Stats
from relay.node import LocalRoom, Node, Seat
from relay.outbox import Outbox
from relay.protocol import CloseCode, MsgType
from relay.room import Entry, event_entry, state_entry
from tests.redisproc import command
from tests.relayproc import timeout

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]


class Recorder:
    """A node stand-in: records what the backplane delivers."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.directs: list[tuple[int, bytes]] = []
        self.resynced: list[str] = []
        self.moved: list[int] = []
        self.gone: list[int] = []
        self.changed = asyncio.Event()

    def deliver(self, room: str, entries: list[Entry]) -> None:
        self.entries.extend(entries)
        self.changed.set()

    def deliver_direct(self, room: str, to_actor: int, wire: bytes) -> None:
        self.directs.append((to_actor, wire))
        self.changed.set()

    def seat_moved(self, room: str, actor: int) -> None:
        self.moved.append(actor)
        self.changed.set()

    def seat_gone(self, room: str, actor: int, offset: int) -> None:
        self.gone.append(actor)
        self.changed.set()

    def resync(self, room: str) -> None:
        self.resynced.append(room)
        self.changed.set()

    async def until(self, condition: Any, seconds: float = 5) -> None:
        async with asyncio.timeout(timeout(seconds)):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def started(redis_server) -> AsyncIterator[Any]:
    made: list[RedisBackplane] = []

    async def start(**settings: Any) -> tuple[RedisBackplane, Recorder]:
        backplane = RedisBackplane(Settings(redis=redis_server.url, **settings))
        recorder = Recorder()
        await backplane.start(recorder)
        assert backplane.ready()
        made.append(backplane)
        return backplane, recorder

    yield start
    for backplane in made:
        await backplane.close()


async def test_offsets_are_encoded_exactly_as_msgpack_does(started, redis_server):
    backplane, seen = await started()
    for start in (120, 250, 65530, 2**32 - 3):  # rooms already this far: across every integer width
        room = f"r{start}"
        command(redis_server.port, "HSET", f"{{relay:{room}}}:meta", "e", "ep", "o", str(start), "a", "1")
        await backplane.subscribe(room)
        joined = await backplane.join(room, "p", {}, max_players=8)
        assert joined.offset == start + 1
        await seen.until(lambda: seen.entries and seen.entries[-1].offset == start + 1)  # noqa: B023
        assert seen.entries[-1].wire == protocol.join_head(1, "p", {}) + msgpack.packb(start + 1)
        seen.entries.clear()
        backplane.publish(room, [event_entry(joined.member.actor, i, protocol.pack(i)) for i in range(6)])
        await seen.until(lambda: len(seen.entries) == 6)
        for i, entry in enumerate(seen.entries):
            assert entry.offset == start + 2 + i
            head = protocol.event_head(joined.member.actor, i, protocol.pack(i))
            assert entry.wire == head + msgpack.packb(entry.offset)
            assert entry.value == protocol.pack(i)  # the data, cut from the wire bytes
    assert seen.resynced == []


async def test_snapshot_keeps_raw_bytes_and_follows_state_and_leave(started):
    a, seen_a = await started()
    b, _ = await started()
    await a.subscribe("r")
    await b.subscribe("r")
    x = (await a.join("r", "x", {"name": "X"}, max_players=8)).member.actor
    raw = protocol.pack({"deep": [1, 2, {"x": b"\x00\xff"}]})
    a.publish("r", [state_entry(x, "k", raw), state_entry(x, 7, protocol.pack("int key")), state_entry(x, "gone", b"\x01")])
    a.publish("r", [state_entry(x, "gone", protocol.NIL)])
    await seen_a.until(lambda: len(seen_a.entries) == 5)
    joined = await b.join("r", "y", {}, max_players=8)
    assert joined.snapshot == {x: {"k": raw, 7: protocol.pack("int key")}}
    assert joined.members == [(x, "x", {"name": "X"}), (joined.member.actor, "y", {})]
    assert [e.key for e in seen_a.entries if e.kind is MsgType.STATE] == ["k", 7, "gone", "gone"]
    await a.leave("r", x, 1000)
    await seen_a.until(lambda: seen_a.entries[-1].kind is MsgType.LEAVE)
    state = await b.room("r")
    assert state is not None and state.snapshot == {} and list(state.members) == [joined.member.actor]


async def test_a_leave_with_a_close_code_enum_is_relayed_with_its_number(started):
    # Server-side closes carry a CloseCode (an IntEnum): it must reach Redis as 4029,
    # and must not break the pipeline it shares with other rooms' moves.
    backplane, seen = await started()
    for room in ("r", "other"):
        await backplane.subscribe(room)
    gone = (await backplane.join("r", "gone", {}, max_players=8)).member.actor
    other = (await backplane.join("other", "p", {}, max_players=8)).member.actor
    await backplane.leave("r", gone, CloseCode.RATE_LIMITED)
    backplane.publish("other", [event_entry(other, 1, protocol.pack("same flush"))])
    await seen.until(lambda: any(e.kind is MsgType.LEAVE for e in seen.entries))
    leave = next(e for e in seen.entries if e.kind is MsgType.LEAVE)
    assert msgpack.unpackb(leave.wire) == [6, gone, 4029, leave.offset]
    await seen.until(lambda: any(e.kind is MsgType.EVENT for e in seen.entries))
    state = await backplane.room("r")
    assert state is None or gone not in state.members
    assert backplane.stats.errors["internal"] == 0


async def test_room_full_and_an_empty_room_coming_back_with_a_new_epoch(started):
    backplane, seen = await started()
    await backplane.subscribe("r")
    first = await backplane.join("r", "p1", {}, max_players=1)
    with pytest.raises(RoomFull):
        await backplane.join("r", "p2", {}, max_players=1)
    await backplane.leave("r", first.member.actor, 1000)
    await seen.until(lambda: any(e.kind is MsgType.LEAVE for e in seen.entries))
    assert await backplane.room("r") is None
    again = await backplane.join("r", "p2", {}, max_players=1)
    assert again.epoch != first.epoch and again.offset == 1 and again.member.actor == 1


async def test_a_batch_sent_twice_is_applied_once(started, redis_server):
    backplane, seen = await started()
    await backplane.subscribe("r")
    joined = await backplane.join("r", "p", {}, max_players=8)
    head = protocol.event_head(1, 1, protocol.pack("once"))
    args = [0, joined.epoch, backplane.node_id, 99, "", 1, 1, "", len(protocol.pack("once")), head]
    sha = backplane._script("SEQUENCE")
    client = backplane.link.client
    assert await client.evalsha(sha, 1, "{relay:r}:meta", *args) == [1, 2]
    assert await client.evalsha(sha, 1, "{relay:r}:meta", *args) == [0]  # a retry after a lost reply
    await seen.until(lambda: bool(seen.entries) and seen.entries[-1].offset == 2)
    await asyncio.sleep(0.05)
    assert [e.offset for e in seen.entries] == [1, 2]


async def test_scripts_are_reloaded_when_redis_forgot_them(started, redis_server):
    backplane, seen = await started()
    await backplane.subscribe("r")
    actor = (await backplane.join("r", "p", {}, max_players=8)).member.actor
    assert command(redis_server.port, "SCRIPT", "FLUSH") == b"+OK\r\n"
    backplane.publish("r", [event_entry(actor, 1, protocol.pack("after flush"))])
    # The JOIN may still be on its way when the predicate is first read: no entries yet.
    await seen.until(lambda: bool(seen.entries) and seen.entries[-1].kind is MsgType.EVENT)
    assert seen.entries[-1].value == protocol.pack("after flush")


async def test_direct_goes_to_the_room_channel(started):
    a, seen_a = await started()
    b, _ = await started()
    for backplane in (a, b):
        await backplane.subscribe("r")
    b.direct("r", 5, b"\x94\x03\x01\x01\xa1x")
    await seen_a.until(lambda: seen_a.directs == [(5, b"\x94\x03\x01\x01\xa1x")])


async def test_history_gives_the_entries_after_an_offset(started):
    backplane, seen = await started(history_size=5)
    await backplane.subscribe("r")
    joined = await backplane.join("r", "p", {}, max_players=8)
    for i in range(250):  # batches of one; Redis trims whole stream nodes (100 entries)
        backplane.publish("r", [event_entry(joined.member.actor, i, protocol.pack(i))])
        await seen.until(lambda: len(seen.entries) == i + 2)  # noqa: B023
    history = await backplane.history("r", 248, joined.epoch)
    assert [e.offset for e in history] == [249, 250, 251] and history[-1].value == protocol.pack(249)
    assert await backplane.history("r", 251, joined.epoch) == []
    assert await backplane.history("r", 248, "another-epoch") is None
    assert await backplane.history("r", 1, joined.epoch) is None  # trimmed away: at least 5 are kept


async def test_a_dead_nodes_players_are_reaped_by_a_live_one(started):
    live, seen = await started(node_ttl_s=1, resume_window_s=0)
    dead, _ = await started(node_ttl_s=1, resume_window_s=0)
    await live.subscribe("r")
    await dead.subscribe("r")
    await live.join("r", "stays", {}, max_players=8)
    doomed = (await dead.join("r", "doomed", {}, max_players=8)).member.actor
    for task in dead._tasks:  # it stops beating, as a killed process would
        task.cancel()
    await dead.link.close()
    dead._up = False
    await seen.until(lambda: any(e.kind is MsgType.LEAVE for e in seen.entries), seconds=3)
    leave = seen.entries[-1]
    assert (leave.actor, leave.wire) == (doomed, protocol.with_offset(protocol.leave_head(doomed, 1006), leave.offset))
    state = await live.room("r")
    assert state is not None and [m.player for m in state.members.values()] == ["stays"]


async def test_subscribing_while_the_heartbeat_pings_subscriptions(started):
    backplane, _ = await started()
    link = backplane.link
    for i in range(20):
        await link.close_subscribers()  # so that the next subscribe connects anew
        subscribing = asyncio.create_task(link.subscribe(f"{{relay:r{i}}}:ch".encode()))
        while not subscribing.done():
            await link.ping_subscribers()  # as the heartbeat does, at the worst moment
            await asyncio.sleep(0)
        await subscribing  # a ping must not break the connection being made


def kill(backplane: RedisBackplane) -> None:
    """Stop a backplane's heartbeat and connections, as a killed process would."""
    for task in backplane._tasks:
        task.cancel()
    backplane._up = False


async def test_a_dead_nodes_seats_are_held_for_the_window_then_removed(started):
    live, seen = await started(node_ttl_s=1, resume_window_s=1)
    dead, _ = await started(node_ttl_s=1, resume_window_s=1)
    for backplane in (live, dead):
        await backplane.subscribe("r")
    await live.join("r", "stays", {}, max_players=8)
    doomed = (await dead.join("r", "doomed", {}, max_players=8, secret="s3cret")).member.actor
    kill(dead)
    await dead.link.close()
    client = live.link.client
    async with asyncio.timeout(timeout(3)):  # found gone, and held: no LEAVE yet
        while not await client.hexists("{relay:r}:hld", doomed):
            await asyncio.sleep(0.05)
    assert not any(e.kind is MsgType.LEAVE for e in seen.entries)
    await seen.until(lambda: any(e.kind is MsgType.LEAVE for e in seen.entries), seconds=4)
    leave = seen.entries[-1]
    assert (leave.actor, leave.wire) == (doomed, protocol.with_offset(protocol.leave_head(doomed, 1006), leave.offset))
    assert not await client.exists("{relay:r}:hld")
    async with asyncio.timeout(timeout(3)):  # and the node is forgotten once nothing of it is held
        while await client.sismember("relay:nodes", dead.node_id):
            await asyncio.sleep(0.05)


async def test_takeover_moves_a_seat_and_drops_the_old_nodes_late_moves(started):
    old, seen_old = await started()
    new, seen_new = await started()
    for backplane in (old, new):
        await backplane.subscribe("r")
    joined = await old.join("r", "p", {"n": 1}, max_players=8, secret="s3cret")
    actor = joined.member.actor
    old.publish("r", [event_entry(actor, 1, protocol.pack("one"))], {actor: 7})
    await seen_new.until(lambda: bool(seen_new.entries) and seen_new.entries[-1].kind is MsgType.EVENT)
    assert await new.takeover("r", actor, "wrong", "p") is None
    assert await new.takeover("r", actor, "s3cret", "someone else") is None
    assert await new.takeover("r", actor + 1, "s3cret", "p") is None
    taken = await new.takeover("r", actor, "s3cret", "p")
    assert taken is not None
    assert (taken.member.actor, taken.member.player, taken.member.meta) == (actor, "p", {"n": 1})
    assert (taken.epoch, taken.offset, taken.last_seq) == (joined.epoch, 2, 7)
    await seen_old.until(lambda: seen_old.moved == [actor])
    assert seen_new.moved == []  # the taking node is not told about its own takeover
    old.publish("r", [event_entry(actor, 2, protocol.pack("late"))], {actor: 8})  # in flight on the old node
    new.publish("r", [event_entry(actor, 2, protocol.pack("again"))], {actor: 8})  # re-sent on the new one
    await seen_new.until(lambda: seen_new.entries[-1].offset == 3)  # "late" would have been 3
    old._rooms["r"].seated[actor] = joined.epoch  # as if the old node had missed the notice:
    seen_old.moved.clear()
    old.publish("r", [event_entry(actor, 3, protocol.pack("later"))], {actor: 9})
    await seen_old.until(lambda: seen_old.moved == [actor])  # its refused moves tell it instead
    assert [e.value for e in seen_new.entries if e.kind is MsgType.EVENT] == [protocol.pack("one"), protocol.pack("again")]
    await old.leave("r", actor, 1000)  # the old node can no longer remove it either
    await new.leave("r", actor, 1000)
    await seen_new.until(lambda: seen_new.entries[-1].kind is MsgType.LEAVE)
    assert seen_new.entries[-1].offset == 4


async def test_moves_of_a_seat_removed_meanwhile_do_not_follow_its_leave(started):
    """A node that missed its seat's removal (it was silent, or the player joined again
    elsewhere) still sends that seat's moves: they are not taken, and the node is told."""
    old, seen_old = await started()
    new, seen_new = await started()
    for backplane in (old, new):
        await backplane.subscribe("r")
    actor = (await old.join("r", "p", {}, max_players=8)).member.actor
    again = (await new.join("r", "p", {}, max_players=8)).member.actor  # replaces the seat
    await seen_new.until(lambda: [e.kind for e in seen_new.entries][-2:] == [MsgType.LEAVE, MsgType.JOIN])
    old.publish("r", [event_entry(actor, 1, protocol.pack("late"))], {actor: 1})
    await seen_old.until(lambda: seen_old.gone == [actor])  # its batch was refused...
    new.publish("r", [event_entry(again, 1, protocol.pack("new"))], {again: 1})
    await seen_new.until(lambda: seen_new.entries[-1].kind is MsgType.EVENT)
    assert [e.value for e in seen_new.entries if e.kind is MsgType.EVENT] == [protocol.pack("new")]  # ...not relayed
    assert seen_old.moved == []


async def test_a_node_told_its_seat_is_gone_waits_for_the_leave_to_learn_why(redis_server):
    """A refused batch can reach the node before the LEAVE that says why the seat went.
    Closed at once with 1011, a replaced player's old client would rejoin and replace its
    new connection in turn: the node waits for the room's order to reach the refusal."""
    nodes = [Node(RedisBackplane(Settings(redis=redis_server.url)), Settings(), Stats()) for _ in range(2)]
    for node in nodes:
        await node.start()
    closes: dict[str, list[int]] = {"replaced": [], "lost": []}

    def seat(player: str) -> Seat:
        outbox = Outbox(soft_bytes=1 << 16, hard_bytes=1 << 18, max_frame_bytes=1 << 16)
        return Seat(
            room=LocalRoom("r"), player=player, meta={}, echo=False, outbox=outbox,
            wake=lambda: None, close=lambda code, reason, flush: closes[player].append(code),
        )

    try:
        old, new = nodes
        replaced, lost = seat("replaced"), seat("lost")
        await old.join(replaced)
        await old.join(lost)
        at = (await old.backplane.room("r")).offset  # type: ignore[union-attr]
        async with asyncio.timeout(timeout(5)):
            while old.rooms["r"].state.offset < at:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)  # polling: the room's order reaches this node's copy
        old.seat_gone("r", replaced.actor, at + 2)  # the refusal of a batch after the LEAVE (+1), JOIN (+2) to come
        assert closes == {"replaced": [], "lost": []}  # it waits for the room's order
        old.seat_gone("r", lost.actor, at)  # no LEAVE in the order it had: a LEAVE this node missed
        assert closes == {"replaced": [], "lost": [1011]}
        await new.join(seat("replaced"))  # the same player joins on the other node: LEAVE 4409
        async with asyncio.timeout(timeout(5)):
            while not closes["replaced"] or not closes["lost"]:
                await asyncio.sleep(0.02)  # polling the recorded closes
        assert closes == {"replaced": [4409], "lost": [1011]}
    finally:
        for node in nodes:
            await node.close()


async def test_a_node_taken_for_dead_takes_its_held_seats_back_when_it_beats_again(started):
    """A node that stalled past its heartbeat's expiry finds its seats held for a resume
    elsewhere: it takes them back, or DIRECTs to its live players would be kept for a
    resume that never comes instead of reaching them."""
    back, seen = await started(node_ttl_s=1)
    other, _ = await started(node_ttl_s=1)
    for backplane in (back, other):
        await backplane.subscribe("r")
    actor = (await back.join("r", "p", {}, max_players=8)).member.actor
    client = other.link.client
    await client.delete(f"relay:node:{back.node_id}")  # its heartbeat expired...
    await client.hset("{relay:r}:hld", actor, "99999999999999/1006")  # ...and a reaper held its seat
    async with asyncio.timeout(timeout(5)):
        while await client.hexists("{relay:r}:hld", actor):
            await asyncio.sleep(0.05)  # polling Redis for the node's next beats
    other.direct("r", actor, b"\x94\x03\x01\x01\xa2hi")
    await seen.until(lambda: seen.directs == [(actor, b"\x94\x03\x01\x01\xa2hi")])
    assert not await client.exists(f"{{relay:r}}:dir:{actor}")
