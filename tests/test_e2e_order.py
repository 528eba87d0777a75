"""One room order for everyone, and late joiners consistent with it."""

from __future__ import annotations

import asyncio

import pytest

from relay_client import Event, Join, State, connect, open_client
from tests.helpers import collect

pytestmark = pytest.mark.asyncio

MOVES = 200


async def send_moves(client, name: str, count: int) -> None:
    for i in range(count):
        client.send_event([name, i])
        if i % 10 == 9:
            client.send_state("score", [name, i])
        if i % 25 == 0:
            await asyncio.sleep(0)  # let the others interleave: the point is concurrency
    await client.flush()


def room_messages(messages):
    return [m for m in messages if isinstance(m, (Event, State))]


async def watch_senders(watchers, senders) -> list[list]:
    """Every sender sends MOVES moves at once; what each watcher saw, once it saw them all."""
    expected = len(senders) * (MOVES + MOVES // 10)
    done = lambda ms: len(room_messages(ms)) >= expected  # noqa: E731
    watching = [asyncio.create_task(collect(w, done, seconds=20)) for w in watchers]
    await asyncio.gather(*(send_moves(s, f"s{i}", MOVES) for i, s in enumerate(senders)))
    return list(await asyncio.gather(*watching))


def one_gapless_order(seen1, seen2) -> list[tuple]:
    """The room order two watchers saw: the same for both, with consecutive offsets."""
    order1 = [(type(m).__name__, m.actor, m.offset, m.data) for m in room_messages(seen1)]
    order2 = [(type(m).__name__, m.actor, m.offset, m.data) for m in room_messages(seen2)]
    assert order1 == order2
    offsets = [o for _, _, o, _ in order1]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))  # consecutive: nothing lost
    return order1


def assert_each_senders_order_kept(order, senders) -> None:
    for sender in senders:
        own = [d[1] for kind, actor, _, d in order if kind == "Event" and actor == sender.actor]
        assert own == list(range(MOVES))


async def test_three_senders_two_watchers_see_one_order(relay, room):
    async with connect(relay.url, room, player="w1") as w1, connect(relay.url, room, player="w2") as w2:
        senders = [await open_client(relay.url, room, player=f"s{i}") for i in range(3)]
        try:
            seen1, seen2 = await watch_senders((w1, w2), senders)
        finally:
            for s in senders:
                await s.close()
    assert_each_senders_order_kept(one_gapless_order(seen1, seen2), senders)


async def test_late_joiner_gets_snapshot_then_exactly_later_messages(relay, room):
    async with connect(relay.url, room, player="watch") as watch, connect(relay.url, room, player="mover") as mover:
        total = 100  # 200 messages: within the default burst, so none is rate limited
        late_box = {}

        async def move() -> None:
            for i in range(total):
                mover.send_state("pos", i)
                mover.send_event(i)
                if i == total // 2:
                    late_box["client"] = await open_client(relay.url, room, player="late")
                if i % 20 == 0:
                    await asyncio.sleep(0)
            await mover.flush()

        await move()
        late = late_box["client"]
        try:
            last_pos = lambda ms: any(isinstance(m, State) and m.data == total - 1 for m in ms)  # noqa: E731
            seen_by_watch = await collect(watch, last_pos, seconds=20)
            seen_by_late = await collect(late, last_pos, seconds=20)
        finally:
            await late.close()
    start = late.welcome.offset
    pos_at_join = late.welcome.snapshot.get(mover.actor, {}).get("pos")
    watch_order = [(m.offset, type(m).__name__, m.data) for m in seen_by_watch if isinstance(m, (Event, State))]
    late_order = [(m.offset, type(m).__name__, m.data) for m in seen_by_late if isinstance(m, (Event, State))]
    # The late joiner sees exactly the watcher's messages after its WELCOME offset...
    assert late_order == [x for x in watch_order if x[0] > start]
    # ...and its snapshot is the state the watcher had at that offset.
    before = [x for x in watch_order if x[0] <= start and x[1] == "State"]
    assert pos_at_join == (before[-1][2] if before else None)
    joins = [m for m in seen_by_watch if isinstance(m, Join) and m.player == "late"]
    assert joins and joins[0].offset == start
    assert late.snapshot[mover.actor]["pos"] == total - 1
