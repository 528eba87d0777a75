"""Resume after a broken connection (one node): same seat, every missed move, nothing twice."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from relay_client import Direct, Dropped, Event, Join, Leave, Resumed, Resynced, State, connect, open_client
from tests.helpers import collect, held_on, next_of, raw_connect, raw_messages
from tests.relayproc import timeout

pytestmark = pytest.mark.asyncio


def events(messages, actor=None):
    return [m.data for m in messages if isinstance(m, Event) and (actor is None or m.actor == actor)]


async def test_aborted_connection_resumes_with_every_missed_move_once(relay, room):
    async with connect(relay.url, room, player="sender") as sender, connect(relay.url, room, player="flaky") as flaky:
        actor = flaky.actor
        for i in range(20):
            sender.send_event(i)
        await collect(flaky, lambda ms: events(ms) == list(range(20)))
        flaky.ws.transport.abort()  # the network drops: no close frame
        for i in range(20, 60):
            sender.send_event(i)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        got = await collect(flaky, lambda ms: events(ms) == list(range(20, 60)), seconds=10)
        assert any(isinstance(m, Resumed) for m in got)
        assert not any(isinstance(m, Resynced) for m in got)
        assert flaky.actor == actor
        await sender.ping()
        seen_by_sender = []
        while not sender._queue.empty():
            seen_by_sender.append(sender._queue.get_nowait())
        assert not [m for m in seen_by_sender if isinstance(m, Leave)]  # nobody saw it go...
        assert [m.actor for m in seen_by_sender if isinstance(m, Join)] in ([], [actor])  # ...or come back


async def test_moves_resent_after_resume_are_applied_once(relay, room):
    async with connect(relay.url, room, player="watch") as watch, connect(relay.url, room, player="mover") as mover:
        for i in range(30):
            mover.send_event(i)
        await mover.flush()
        mover.ws.transport.abort()  # some of these may not have reached the server
        for i in range(30, 40):
            mover.send_event(i)  # queued while the link is down; sent after the resume
        got = await collect(watch, lambda ms: len(events(ms)) >= 40, seconds=10)
        await mover.ping()
        await watch.ping()
        while not watch._queue.empty():
            got.append(watch._queue.get_nowait())
        assert events(got, mover.actor) == list(range(40))


async def test_resume_with_history_too_short_gives_a_fresh_snapshot_same_seat(relay_with, room):
    server = relay_with(history_size=5)
    await history_too_short_gives_a_fresh_snapshot(server, server, room, moves=20)


async def history_too_short_gives_a_fresh_snapshot(first, second, room: str, moves: int) -> None:
    """A seat broken on ``first`` resumes on ``second`` after ``moves`` STATEs, more than the
    history holds: same actor, a fresh snapshot at the current offset."""
    async with connect(first.url, room, player="sender") as sender:
        flaky = await open_client(first.url, room, player="flaky", auto_resume=False)
        actor, token, offset, epoch = flaky.actor, flaky.resume_token, flaky.offset, flaky.epoch
        flaky.ws.transport.abort()
        await flaky.close()
        for i in range(moves):
            sender.send_state("n", i)
            if i % 50 == 0:
                await sender.ping()  # paced under the rate limit
        await sender.ping()
        ws = await raw_connect(second.url, room, f"?player=flaky&resume={token}&offset={offset}&epoch={epoch}")
        try:
            [welcome, *_] = await raw_messages(ws)
            assert welcome[2] == actor  # same seat
            assert welcome[8] > offset  # a fresh snapshot at the current offset, not a replay
            assert welcome[5][sender.actor] == {"n": moves - 1}
        finally:
            await ws.close()


@pytest.mark.parametrize("before", ["0", "1", "1000"], ids=["before-the-room", "before-its-join", "in-the-future"])
async def test_a_resume_from_before_the_seats_own_join_gets_the_room_as_it_is_now(relay_with, room, before):
    """No client saw the room before its own JOIN (nor past the room's offset), and a
    WELCOME as of then could not list its player: the seat is kept, with the room as it
    is now and no replay."""
    relay = relay_with()  # its own: seats held by other tests would count in held_on
    async with connect(relay.url, room, player="b") as b:  # JOIN at offset 1
        a = await raw_connect(relay.url, room, "?player=a")  # JOIN at offset 2
        [welcome] = await raw_messages(a)
        actor, epoch, token = welcome[2], welcome[9], welcome[10]
        b.send_state("k", "v")
        [state] = await raw_messages(a)
        a.transport.abort()
        await held_on(relay, 1)
        again = await raw_connect(relay.url, room, f"?player=a&resume={token}&offset={before}&epoch={epoch}")
        try:
            [resumed] = await raw_messages(again)
            b.send_event("next")
            [event] = await raw_messages(again)
        finally:
            await again.close()
    assert resumed[2] == actor and resumed[8] == state[4] == 3
    assert resumed[4] == [[b.actor, "b", {}], [actor, "a", {}]]
    assert resumed[5] == {b.actor: {"k": "v"}}
    assert event == [1, b.actor, event[2], "next", 4]  # then the live order, nothing replayed


async def test_resume_after_the_window_is_a_fresh_join(relay_with, room):
    server = relay_with(resume_window_s=0.3)
    async with connect(server.url, room, player="watch") as watch:
        flaky = await open_client(server.url, room, player="flaky", auto_resume=False)
        actor, token = flaky.actor, flaky.resume_token
        flaky.ws.transport.abort()
        await flaky.close()
        leave = await next_of(watch, Leave)
        assert (leave.actor, leave.code) == (actor, 1006)
        async with connect(server.url, room, player="flaky", resume=token, offset="0", epoch="x") as again:
            assert again.actor != actor
            assert again.welcome.last_seq is None


async def test_a_token_cannot_be_used_by_another_player(relay, room):
    async with connect(relay.url, room, player="watch") as watch:
        flaky = await open_client(relay.url, room, player="flaky", auto_resume=False)
        token = flaky.resume_token
        flaky.ws.transport.abort()
        await flaky.close()
        async with connect(relay.url, room, player="thief", resume=token) as thief:
            assert thief.actor != flaky.actor
            seen = await collect(watch, lambda ms: any(isinstance(m, Join) and m.player == "thief" for m in ms))
            assert not [m for m in seen if isinstance(m, Leave)]
            assert flaky.actor in thief.members  # the real seat is still held


async def test_last_seq_reports_what_the_server_has(relay, room):
    async with connect(relay.url, room, player="watch") as watch:
        mover = await open_client(relay.url, room, player="mover", auto_resume=False)
        for i in range(5):
            mover.send_event(i)
        await mover.ping()  # all five are in
        token, offset, epoch = mover.resume_token, mover.offset, mover.epoch
        mover.ws.transport.abort()
        await mover.close()
        await collect(watch, lambda ms: len(events(ms)) == 5)
        ws = await raw_connect(relay.url, room, f"?player=mover&resume={token}&offset={offset}&epoch={epoch}")
        try:
            [welcome, *_] = await raw_messages(ws)
            assert welcome[11] == 5
        finally:
            await ws.close()


async def test_a_slow_reader_closed_with_4008_catches_up_from_history(relay_with, room):
    from tests.test_redis_resume import SLOW_READER, slow_reader_catches_up

    server = relay_with(**SLOW_READER)
    await slow_reader_catches_up(server, server, room)


async def test_a_resume_welcome_is_the_room_at_the_clients_offset_then_what_followed(relay_with, room):
    relay = relay_with()  # its own: seats held by other tests would count in held_on
    await resume_welcome_is_the_room_at_the_clients_offset(relay, relay, room)


async def resume_welcome_is_the_room_at_the_clients_offset(first, second, room) -> None:
    """a plays on ``first``, b and c on ``second``, where a resumes.

    Black-box, as the protocol puts it: WELCOME's offset is the one its snapshot and
    member list include, and a resume's WELCOME is followed by exactly what came after.
    """
    a = await raw_connect(first.url, room, "?player=a")
    [welcome] = await raw_messages(a)
    epoch, token = welcome[9], welcome[10]
    async with connect(second.url, room, player="b") as b:
        c = await open_client(second.url, room, player="c", auto_resume=False)
        b.send_state("k", "v0")
        seen: list = []
        while not any(m[0] == 2 for m in seen):
            seen += await raw_messages(a)
        offset = seen[-1][4]  # the client's view ends at the STATE
        a.transport.abort()  # the network drops
        await held_on(first, 1)
        b.send_state("k", "v1")
        await collect(c, lambda ms: any(isinstance(m, State) and m.data == "v1" for m in ms))
        await c.close()
        assert (await next_of(b, Leave)).actor == c.actor
        again = await raw_connect(second.url, room, f"?player=a&resume={token}&offset={offset}&epoch={epoch}")
        try:
            got = await raw_messages(again)
            while got[-1][0] != 6:
                got += await raw_messages(again)
        finally:
            await again.close()
    [resumed, *replay] = got
    assert resumed[2] == welcome[2] and resumed[8] == offset
    assert resumed[4] == [[welcome[2], "a", {}], [b.actor, "b", {}], [c.actor, "c", {}]]  # c was still there
    assert resumed[5] == {b.actor: {"k": "v0"}}  # and k was v0
    assert replay == [[2, b.actor, "k", "v1", offset + 1], [6, c.actor, 1000, offset + 2]]


async def test_directs_past_the_bound_for_a_held_seat_are_reported_as_dropped(relay_with, room):
    server = relay_with(max_held_directs=3)
    async with connect(server.url, room, player="sender") as sender:
        away = await open_client(server.url, room, player="away", auto_resume=False)
        away.ws.transport.abort()
        await held_on(server, 1)
        for i in range(5):
            sender.send_direct(away.actor, i)
        await sender.ping()
        again = await open_client(server.url, room, player="away", resume=away.resume_token,
                                  offset=str(away.offset), epoch=away.epoch)
        try:
            got = await collect(again, lambda ms: len([m for m in ms if isinstance(m, Direct)]) == 3)
            assert again.actor == away.actor
        finally:
            await again.close()
            await away.close()
    assert [m.data for m in got if isinstance(m, Direct)] == [2, 3, 4]
    assert [type(m) for m in got if isinstance(m, (Dropped, Direct))][0] is Dropped
    assert [m.count for m in got if isinstance(m, Dropped)] == [2]


async def test_a_resume_as_the_hold_runs_out_either_keeps_the_seat_or_joins_afresh(relay_with):
    # A resume that lands right as the window closes used to get its seat back, then lose
    # it to the LEAVE already on its way: the others saw LEAVE, the player nothing more.
    window = 0.5
    server = relay_with(resume_window_s=window)

    async def trial(i: int) -> bool:
        room = f"edge-{i}-{time.monotonic_ns()}"
        keeper = await raw_connect(server.url, room, "?player=keeper")
        await raw_messages(keeper)
        player = await raw_connect(server.url, room, "?player=p&echo=1")
        _, _, actor, _, _, _, _, _, offset, epoch, token, _ = (await raw_messages(player))[0]
        broke = time.monotonic()
        player.transport.abort()
        await asyncio.sleep(max(0.0, broke + window + (i % 9 - 4) * 0.005 - time.monotonic()))
        again = await raw_connect(server.url, room, f"?player=p&echo=1&resume={token}&offset={offset}&epoch={epoch}")
        welcome = (await raw_messages(again))[0]
        await again.send(msgpack.packb([1, 1, "still here"]))
        seen_by_keeper = []
        async with asyncio.timeout(timeout(5)):
            while not any(m[0] == 1 and m[1] == welcome[2] for m in seen_by_keeper):
                seen_by_keeper += await raw_messages(keeper)
        echoed = any(m[0] == 1 and m[1] == welcome[2] for m in await raw_messages(again))
        await again.close()
        await keeper.close()
        left = [m[1] for m in seen_by_keeper if m[0] == 6]
        if welcome[2] == actor:  # its seat back: it stays in the room
            assert actor not in left and echoed, (i, left, echoed)
        return welcome[2] == actor

    kept = await asyncio.gather(*(trial(i) for i in range(45)))
    assert 0 < sum(kept) < len(kept)  # the trials straddled the end of the window
