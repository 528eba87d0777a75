"""Resume on another node: two relays sharing a real Redis, seats moving between them."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from relay_client import Direct, Dropped, Event, Join, Leave, RelayClosed, Resumed, Resynced, connect, open_client

from tests.helpers import closed, collect, held_on, next_of, raw_connect, raw_messages
from tests.test_e2e_resume import events, history_too_short_gives_a_fresh_snapshot, resume_welcome_is_the_room_at_the_clients_offset
from tests.test_e2e_backpressure import FAST_PLAYERS_SLACK, HARD, SOFT, drain_slow, run_room
from tests.relayproc import timeout

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

TTL = 2.0  # node_ttl_s in these tests
BUSY = {"max_msgs_per_s": 5000, "burst": 5000}  # busy rooms: players faster than the default rate limit


def room_order(messages):
    return [(type(m).__name__, m.actor, m.offset) for m in messages if isinstance(m, (Event, Join, Leave))]


async def drain(client) -> list:
    """Everything a client had received before its connection ended."""
    got = []
    try:
        while True:
            got.append(await client.recv(timeout=timeout(5)))
    except RelayClosed:
        return got


async def exited(relay, seconds: float = 15) -> None:
    async with asyncio.timeout(timeout(seconds)):
        while relay.proc.poll() is None:
            await asyncio.sleep(0.05)  # polling another process's exit


async def test_an_aborted_connection_resumes_on_the_other_node_exactly(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, **BUSY)
    async with connect(a.url, room, player="sender") as sender, connect(b.url, room, player="watch") as watch:
        flaky = await open_client(a.url, room, player="flaky", auto_resume=False)
        actor, token = flaky.actor, flaky.resume_token
        total = 300
        seen_by_watch = []
        for i in range(total):
            sender.send_event(i)
            if i == 100:
                seen_by_watch += await collect(watch, lambda ms: 90 in events(ms))
                flaky.ws.transport.abort()  # the network drops in a busy room: no close frame
                before = await drain(flaky)
                await held_on(a, 1)
                watch.send_direct(actor, "while you were away")  # kept for the held seat
            if i == 200:  # it comes back, through the other node
                again = await open_client(
                    b.url, room, player="flaky", resume=token, offset=str(flaky.offset), epoch=flaky.epoch
                )
            if i % 10 == 0:
                await asyncio.sleep(0.005)
        try:
            after = await collect(again, lambda ms: total - 1 in events(ms), seconds=10)
            seen_by_watch += await collect(watch, lambda ms: total - 1 in events(ms), seconds=10)
        finally:
            await again.close()
    assert again.actor == actor and again.welcome.offset == flaky.offset  # same seat, an exact replay
    assert not [m for m in after if isinstance(m, Resynced)]
    assert events(before) + events(after, sender.actor) == list(range(total))  # no gap, nothing twice
    assert [m.data for m in after if isinstance(m, Direct)] == ["while you were away"]
    mine = room_order(before + after)  # the same room order as a member that never left
    assert mine == [o for o in room_order(seen_by_watch) if mine[0][2] <= o[2] <= mine[-1][2]]
    comings_and_goings = [type(m) for m in seen_by_watch if isinstance(m, (Join, Leave)) and m.actor == actor]
    assert comings_and_goings == [Join]  # its first join only: the others never saw it go


async def test_the_old_connection_is_replaced_when_its_seat_resumes_elsewhere(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="watch", echo=True) as watch:
        old = await open_client(a.url, room, player="p", auto_resume=False)
        query = f"?player=p&resume={old.resume_token}&offset={old.offset}&epoch={old.epoch}"
        new = await raw_connect(b.url, room, query)  # the old link is half-dead; a new one comes
        try:
            [welcome, *_] = await raw_messages(new)
            assert welcome[2] == old.actor
            assert (await closed(old)).code == 4409
            watch.send_event("still here")
            seen = await collect(watch, lambda ms: "still here" in events(ms))
            assert [type(m) for m in seen if isinstance(m, (Join, Leave))] == [Join]  # its first join only
        finally:
            await new.close()
        leave = await next_of(watch, Leave)  # the new node owns the seat: its close is the LEAVE
        assert (leave.actor, leave.code) == (old.actor, 1000)


async def test_a_token_is_bound_to_its_player_on_every_node(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(a.url, room, player="p") as p:
        async with connect(b.url, room, player="thief", resume=p.resume_token) as thief:
            assert thief.actor != p.actor
        forged = p.resume_token.split(".")[0] + ".not-the-secret"
        async with connect(b.url, room, player="p2", resume=forged) as other:
            assert other.actor != p.actor
        p.send_event("mine still")
        await p.ping()


async def test_a_history_too_short_gives_a_fresh_snapshot_on_the_other_node(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, history_size=5, **BUSY)
    # Redis trims the history in whole stream nodes of 100: 300 moves pass 5 for sure.
    await history_too_short_gives_a_fresh_snapshot(a, b, room, moves=300)


async def test_a_resume_welcome_on_the_other_node_is_the_room_at_the_clients_offset(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    await resume_welcome_is_the_room_at_the_clients_offset(a, b, room)


async def test_a_killed_nodes_players_resume_on_the_other_node_and_resend_once(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL, **BUSY)
    async with connect(b.url, room, player="watch") as watch:
        mover = await open_client([a.url, b.url], room, player="mover")
        try:
            actor = mover.actor
            total = 200
            got = []
            for i in range(total):
                mover.send_event(i)
                if i == 100:
                    got += await collect(watch, lambda ms: 50 in events(ms))
                    a.proc.send_signal(signal.SIGKILL)  # moves in flight on the node are lost with it
                if i % 10 == 0:
                    await asyncio.sleep(0.005)
            got += await collect(watch, lambda ms: total - 1 in events(ms), seconds=10)
            await mover.ping()
            await watch.ping()
            while not watch._queue.empty():
                got.append(watch._queue.get_nowait())
            assert mover.actor == actor
            assert events(got, actor) == list(range(total))  # re-sent after last_seq: each exactly once
            assert [type(m) for m in got if isinstance(m, (Join, Leave))] == [Join]  # its first join only
        finally:
            await mover.close()


async def test_a_killed_nodes_players_leave_after_node_ttl_and_the_window(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL, resume_window_s=1)
    async with connect(a.url, room, player="stays") as stays:
        doomed = await open_client(b.url, room, player="doomed", auto_resume=False)
        doomed.send_state("pos", [1, 2])
        await collect(stays, lambda ms: doomed.actor in stays.snapshot)
        killed = time.monotonic()
        b.proc.send_signal(signal.SIGKILL)
        leave = await next_of(stays, Leave, seconds=TTL + 1 + 5)
        assert (leave.actor, leave.code) == (doomed.actor, 1006)
        assert time.monotonic() - killed >= 1  # held for the window first
        assert doomed.actor not in stays.snapshot and doomed.actor not in stays.members
        detail = a.get_json(f"/rooms/{room}")
        assert [m["player"] for m in detail["members"]] == ["stays"] and detail["snapshot_keys"] == 0
        await doomed.close()


async def test_a_node_shutting_down_hands_its_players_to_the_other_node(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(b.url, room, player="watch") as watch:
        players = [await open_client([a.url, b.url], room, player=f"p{i}") for i in range(3)]
        try:
            actors = [p.actor for p in players]
            for i, p in enumerate(players):
                p.send_state("pos", i)
                p.send_event(f"before {i}")
            await collect(watch, lambda ms: len(events(ms)) == 3)
            a.proc.send_signal(signal.SIGTERM)  # graceful: 1001, and the seats stay held
            for p in players:
                await next_of(p, Resumed, seconds=10)
            await exited(a)
            assert [p.actor for p in players] == actors
            for i, p in enumerate(players):
                p.send_event(f"after {i}")
            got = await collect(watch, lambda ms: len(events(ms)) == 3, seconds=10)
            assert sorted(events(got)) == ["after 0", "after 1", "after 2"]
            assert not [m for m in got if isinstance(m, (Join, Leave))]
            assert all(watch.snapshot.get(a_) == {"pos": i} for i, a_ in enumerate(actors))
        finally:
            for p in players:
                await p.close()


async def test_seats_handed_off_by_a_stopped_node_leave_with_1001_if_nobody_resumes(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, node_ttl_s=TTL, resume_window_s=1)
    async with connect(b.url, room, player="watch") as watch:
        gone = await open_client(a.url, room, player="gone", auto_resume=False)
        await collect(watch, lambda ms: gone.actor in watch.members)
        a.proc.send_signal(signal.SIGTERM)
        assert (await closed(gone, seconds=10)).code == 1001
        leave = await next_of(watch, Leave, seconds=TTL + 1 + 5)
        assert (leave.actor, leave.code) == (gone.actor, 1001)


SLOW_READER = {  # a reader that stalls soon and is closed fast; history enough for its replay
    "outbox_soft_bytes": SOFT, "outbox_hard_bytes": HARD, "slow_client_timeout_s": 0.5, "history_size": 5000,
    "max_replay_bytes": 50 * 2**20, "max_bytes_per_s": 10**8, "burst_bytes": 10**8, **BUSY, **FAST_PLAYERS_SLACK,
}


async def slow_reader_catches_up(a, b, room: str) -> None:
    """A reader stalls on node ``a`` until closed with 4008, then resumes on ``b``: it gets
    every room message after the last one it had, exactly once, far past its outbox limits."""
    fast, slow, _, _ = await run_room(a, room, 300)
    try:
        messages, code = await drain_slow(slow)
        assert code == 4008
        welcome = messages[0]
        actor, epoch, token = welcome[2], welcome[9], welcome[10]
        seen = [m[-1] for m in messages[1:] if m[0] in (1, 2, 5, 6)]
        offset = max(seen, default=welcome[8])
        last = (await asyncio.to_thread(a.get_json, f"/rooms/{room}"))["offset"]
        assert last - offset > 100  # it had missed a lot
        ws = await raw_connect(b.url, room, f"?player=slow&resume={token}&offset={offset}&epoch={epoch}")
        try:
            got = []
            async with asyncio.timeout(timeout(20)):
                while not got or got[-1][-1] != last:
                    got += [m for m in await raw_messages(ws) if m[0] in (0, 1, 2, 5, 6, 8)]
        finally:
            await ws.close()
        assert got[0][0] == 0 and got[0][2] == actor and got[0][8] == offset  # same seat, exact replay
        assert [m[-1] for m in got[1:]] == list(range(offset + 1, last + 1))  # all it missed, once, no DROPPED
    finally:
        for p in fast:
            await p.close()


async def test_a_slow_reader_closed_with_4008_catches_up_from_history_on_the_other_node(
    redis_server, redis_relays, room
):
    a, b = redis_relays(redis_server.url, 2, **SLOW_READER)
    await slow_reader_catches_up(a, b, room)


async def test_a_resume_whose_history_cannot_be_read_gets_a_fresh_snapshot(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2)
    async with connect(b.url, room, player="watch", echo=True) as watch:
        p = await open_client(a.url, room, player="p", auto_resume=False)
        watch.send_event("before")
        await next_of(p, Event)
        actor, token, offset, epoch = p.actor, p.resume_token, p.offset, p.epoch
        p.ws.transport.abort()
        await drain(p)
        await held_on(a, 1)
        watch.send_event("while away")  # in the history to replay, as seen by the node resumed on
        await collect(watch, lambda ms: "while away" in events(ms))
        # The room's history in Redis is damaged: same ids, unreadable batches.
        log = f"{{relay:{room}}}:log"
        with redis.Redis(port=redis_server.port) as r:
            ids = [entry_id for entry_id, _ in r.xrange(log)]
            r.delete(log)
            for entry_id in ids:
                r.xadd(log, {"b": b"\xc1"}, id=entry_id)
        again = await open_client(b.url, room, player="p", resume=token, offset=str(offset), epoch=epoch)
        try:
            # The seat is taken over all the same, with a fresh snapshot instead of a replay.
            assert again.actor == actor and again.welcome.epoch == epoch and again.welcome.offset > offset
            again.send_event("back")
            assert (await next_of(watch, Event)).data == "back"
        finally:
            await again.close()
        leave = await next_of(watch, Leave)  # no seat left behind: its close is the LEAVE
        assert (leave.actor, leave.code) == (actor, 1000)


async def test_directs_sent_while_a_seat_moves_between_nodes_arrive_once_each(redis_server, redis_relays, room):
    a, b = redis_relays(redis_server.url, 2, max_held_directs=1000, **BUSY)
    async with connect(b.url, room, player="sender") as sender:
        p = await open_client(a.url, room, player="p", auto_resume=False)
        actor, token = p.actor, p.resume_token
        p.ws.transport.abort()
        await drain(p)
        await held_on(a, 1)
        total = 400

        async def send_directs() -> None:
            for i in range(total):
                sender.send_direct(actor, i)  # some kept by a, some by b while it takes the seat over
                await asyncio.sleep(0.001)
            await sender.flush()

        sending = asyncio.create_task(send_directs())
        await asyncio.sleep(0.05)
        again = await open_client(b.url, room, player="p", resume=token, offset=str(p.offset), epoch=p.epoch)
        try:
            await sending
            got = await collect(again, lambda ms: total - 1 in [m.data for m in ms if isinstance(m, Direct)], 10)
        finally:
            await again.close()
    directs = [m.data for m in got if isinstance(m, Direct)]
    assert sorted(directs) == list(range(total))  # each once: kept by a, passed on, or sent to b


async def test_a_seat_resumed_on_its_own_node_in_a_busy_room_stays_resumed(redis_server, redis_relays, room):
    # With Redis the history read is a round trip; the room's moves keep coming meanwhile.
    (a,) = redis_relays(redis_server.url, 1, resume_window_s=1.0, **BUSY)
    async with connect(a.url, room, player="sender") as sender, connect(a.url, room, player="watch") as watch:
        p = await open_client(a.url, room, player="p", auto_resume=False)
        actor, token = p.actor, p.resume_token
        sender.send_event(-1)
        await next_of(p, Event)
        offset, epoch = p.offset, p.epoch
        p.ws.transport.abort()
        await drain(p)
        await held_on(a, 1)

        async def busy(n: int) -> None:
            for i in range(n):
                sender.send_event(i)
                if i % 4 == 3:
                    await asyncio.sleep(0.001)  # a move every quarter millisecond or so

        moving = asyncio.create_task(busy(1000))
        await asyncio.sleep(0.05)  # the room is busy when the player comes back
        again = await open_client(a.url, room, player="p", resume=token, offset=str(offset), epoch=epoch)
        try:
            assert again.actor == actor
            await moving
            got = await collect(again, lambda ms: 999 in events(ms), seconds=15)  # past the resume window
            assert events(got) == list(range(1000))
            await watch.ping()
            seen = await collect(watch, lambda ms: 999 in events(ms))
            assert not [m for m in seen if isinstance(m, Leave)]  # nobody saw it leave
        finally:
            await again.close()


@pytest.mark.parametrize("where", ["a node new to the room", "the same node"])
async def test_a_resume_welcome_is_the_room_at_the_clients_offset_past_the_mirrors_undo_log(
    redis_server, redis_relays, room, where
):
    """Everyone plays on ``a``; p resumes on ``b``, which has no copy of the room before
    the takeover, or on ``a``, whose undo log (history_size changes) no longer reaches
    back that far. Either way its WELCOME must be the room as of its offset, rewound with
    the undo records Redis keeps in the room's history, then exactly what followed."""
    # history_size 30: the node's undo log keeps 30 changes, and the Redis stream, trimmed
    # with XADD MINID ~ (whole stream nodes of 100 entries), still holds the 40 and more.
    a, b = redis_relays(redis_server.url, 2, history_size=30, **BUSY)
    target = b if where == "a node new to the room" else a
    p = await raw_connect(a.url, room, "?player=p")
    [welcome] = await raw_messages(p)
    actor, epoch, token = welcome[2], welcome[9], welcome[10]
    async with connect(a.url, room, player="q") as q:
        r = await open_client(a.url, room, player="r", auto_resume=False)
        q.send_state("k", "v0")
        r.send_state("s", 1)
        seen: list = []
        while sum(m[0] == 2 for m in seen) < 2:
            seen += await raw_messages(p)
        offset = seen[-1][-1]  # p's view ends at both STATEs
        p.transport.abort()  # the network drops
        await held_on(a, 1)
        for i in range(40):  # more changes than the undo log keeps (history_size)
            q.send_state("k", f"v{i + 1}")
        await q.ping()  # taken, and queued for the room's order before what follows
        await r.close()  # LEAVE, with its STATE gone
        async with connect(a.url, room, player="t") as t:  # JOIN, and a STATE of its own
            t.send_state("u", 2)
            await t.ping()
            last = (await asyncio.to_thread(a.get_json, f"/rooms/{room}"))["offset"]
            again = await raw_connect(target.url, room, f"?player=p&resume={token}&offset={offset}&epoch={epoch}")
            try:
                got = await raw_messages(again)
                while got[-1][-1] != last:
                    got += await raw_messages(again)
            finally:
                await again.close()
    [resumed, *replay] = got
    assert resumed[2] == actor and resumed[9] == epoch and resumed[8] == offset
    assert resumed[4] == [[actor, "p", {}], [q.actor, "q", {}], [r.actor, "r", {}]]  # r still there, t not yet
    assert resumed[5] == {q.actor: {"k": "v0"}, r.actor: {"s": 1}}
    assert [m[-1] for m in replay] == list(range(offset + 1, last + 1))  # all it missed, once
    assert replay[-3:] == [[6, r.actor, 1000, last - 2], [5, t.actor, "t", {}, last - 1], [2, t.actor, "u", 2, last]]


async def test_directs_to_a_seat_whose_node_went_away_are_kept_for_its_resume(redis_server, redis_relays, room):
    """No node serves a seat held after its node stopped: Redis keeps the DIRECTs sent to
    it meanwhile (the last max_held_directs), and its resume, anywhere, gets them once."""
    a, b = redis_relays(redis_server.url, 2, max_held_directs=3)
    async with connect(b.url, room, player="sender") as sender:
        away = await open_client(a.url, room, player="away", auto_resume=False)
        actor, token, offset, epoch = away.actor, away.resume_token, away.offset, away.epoch
        await collect(sender, lambda ms: actor in sender.members)
        a.proc.send_signal(signal.SIGTERM)  # graceful: 1001, and the seat stays held in Redis
        assert (await closed(away, seconds=10)).code == 1001
        for i in range(5):  # at once: held before its players heard 1001
            sender.send_direct(actor, f"while away {i}")
        await sender.ping()  # all taken
        await exited(a)
        again = await open_client(b.url, room, player="away", resume=token, offset=str(offset), epoch=epoch)
        try:
            assert again.actor == actor
            got = await collect(again, lambda ms: len([m for m in ms if isinstance(m, Direct)]) == 3, seconds=10)
            assert [m.data for m in got if isinstance(m, Direct)] == [f"while away {i}" for i in (2, 3, 4)]
            # The two that did not fit are not lost silently: DROPPED says so, first.
            assert [m.count for m in got if isinstance(m, Dropped)] == [2]
            assert isinstance(next(m for m in got if isinstance(m, (Dropped, Direct))), Dropped)
            sender.send_direct(actor, "back")  # and after the resume, as usual
            assert (await next_of(again, Direct)).data == "back"
        finally:
            await again.close()
        await away.close()


async def test_directs_past_the_bound_for_a_seat_held_on_one_node_are_reported_on_the_next(
    redis_server, redis_relays, room
):
    a, b = redis_relays(redis_server.url, 2, max_held_directs=3)
    async with connect(b.url, room, player="sender") as sender:
        p = await open_client(a.url, room, player="p", auto_resume=False)
        p.ws.transport.abort()  # held by node a, which is alive: it keeps the DIRECTs
        await held_on(a, 1)
        for i in range(5):
            sender.send_direct(p.actor, i)
        await sender.ping()
        again = await open_client(b.url, room, player="p", resume=p.resume_token, offset=str(p.offset), epoch=p.epoch)
        try:
            got = await collect(again, lambda ms: len([m for m in ms if isinstance(m, Direct)]) == 3, seconds=10)
        finally:
            await again.close()
            await p.close()
    assert [m.data for m in got if isinstance(m, Direct)] == [2, 3, 4]
    assert [m.count for m in got if isinstance(m, Dropped)] == [2]
