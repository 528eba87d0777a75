"""The Python client library against a real relay: frame size, resume and how a close is reported."""

from __future__ import annotations

import asyncio
import time
import urllib.error

import pytest
import websockets

from relay import auth
from relay_client import Direct, Error, Event, Leave, RelayClosed, Resumed, Resynced, State, connect, open_client
from tests.helpers import LinkCutter, closed, collect, held_on, next_of

pytestmark = pytest.mark.asyncio

SECRET = "a-test-secret-that-is-long-enough-for-hs256-and-even-for-hs512-keys!"


def events(messages, actor=None):
    return [m.data for m in messages if isinstance(m, Event) and (actor is None or m.actor == actor)]


async def test_one_iterations_moves_beyond_max_frame_bytes_go_out_in_several_frames(relay, room):
    async with connect(relay.url, room, player="watch") as watch, connect(relay.url, room, player="big") as big:
        limit = big.limits["max_frame_bytes"]
        count = 2 * limit // 1000 + 2  # 1 KB each: more than two frames' worth
        for key in range(count):
            big.send_state(key, "x" * 1000)
        got = await collect(watch, lambda ms: len([m for m in ms if isinstance(m, State)]) == count)
        assert [m.key for m in got if isinstance(m, State)] == list(range(count))
        assert await big.ping() >= 0  # not closed with 1009


async def test_a_message_too_big_for_any_frame_is_refused_before_it_is_sent(relay, room):
    async with connect(relay.url, room, player="big") as big:
        with pytest.raises(ValueError, match="max_frame_bytes"):
            big.send_event("x" * big.limits["max_frame_bytes"])
        assert await big.ping() >= 0


async def test_moves_sent_while_the_seat_was_lost_go_out_from_the_new_seat(relay_with, room):
    server = relay_with(resume_window_s=0.5)
    link = await LinkCutter(server.port).up()
    async with connect(server.url, room, player="watch") as watch, connect(link.url, room, player="away") as away:
        old_actor = away.actor
        away.send_event("before")
        await collect(watch, lambda ms: events(ms) == ["before"])
        await link.down()  # the player's network is gone, longer than the seat is held
        async with asyncio.timeout(5):
            while away.ws.state is not websockets.protocol.State.CLOSED:
                await asyncio.sleep(0.01)  # until the client has seen its link go
        away.send_event("while away")
        away.send_state("pos", [1, 2])
        await collect(watch, lambda ms: any(isinstance(m, Leave) and m.actor == old_actor for m in ms))
        await link.up()
        notice = await collect(away, lambda ms: any(isinstance(m, (Resumed, Resynced)) for m in ms), seconds=10)
        assert isinstance(notice[-1], Resynced) and away.actor != old_actor
        got = await collect(watch, lambda ms: any(isinstance(m, State) for m in ms))
        assert events(got, away.actor) == ["while away"]
        assert watch.snapshot[away.actor] == {"pos": [1, 2]}
        assert away.snapshot[away.actor] == {"pos": [1, 2]}  # its own copy, without echo
    await link.down()


async def test_directs_queued_for_an_earlier_epoch_of_the_room_are_not_sent(relay_with, room):
    """Actors are numbered anew in a room's new epoch (it emptied, or Redis restarted
    empty): a DIRECT queued for an old actor could reach someone else, itself included."""
    server = relay_with(resume_window_s=0.3)
    link = await LinkCutter(server.port).up()
    away = await open_client(link.url, room, player="away")  # actor 1
    try:
        async with connect(server.url, room, player="gone") as gone:  # actor 2
            old_epoch, target = away.epoch, gone.actor
        await link.down()  # away's seat is lost and the room empties: its epoch ends
        async with asyncio.timeout(5):
            while away.ws.state is not websockets.protocol.State.CLOSED:
                await asyncio.sleep(0.01)  # until the client has seen its link go
        seq = away.send_direct(target, "for gone only")
        away.send_event("still sent")
        async with asyncio.timeout(5):
            while await asyncio.to_thread(room_exists, server, room):
                await asyncio.sleep(0.05)  # polling the relay: the held seat's hold runs out
        async with connect(server.url, room, player="watch") as watch:  # actor 1 of the new epoch
            await link.up()
            notice = await collect(away, lambda ms: any(isinstance(m, Resynced) for m in ms), seconds=10)
            assert away.epoch != old_epoch and away.actor == target  # the old target's number
            assert notice[-1].unsent_directs == [seq]
            assert events(await collect(watch, lambda ms: events(ms) == ["still sent"])) == ["still sent"]
            away.send_direct(away.actor, "to itself")  # a DIRECT of this epoch is sent
            assert (await next_of(away, Direct)).data == "to itself"  # and nothing came before it
    finally:
        await away.close()
    await link.down()


def room_exists(server, room: str) -> bool:
    try:
        server.get_json(f"/rooms/{room}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise
    return True


async def test_a_refusal_during_a_resume_is_reported_with_its_code_at_once(relay_with, room):
    server = relay_with(secret=SECRET)
    tokens = iter([auth.issue(SECRET, "ann", rooms=[room]), auth.issue(SECRET, "ann", rooms=["elsewhere"])])
    client = await open_client(server.url, room, token=lambda: next(tokens), resume_for_s=30)
    try:
        client.ws.transport.abort()  # the reconnect's token does not allow this room
        exc = await closed(client, seconds=5)  # well before resume_for_s runs out
        assert exc.code == 4003 and "does not allow" in exc.reason
        with pytest.raises(RelayClosed):
            client.send_event("late")
    finally:
        await client.close()


async def test_each_reconnect_asks_for_a_fresh_token(relay_with, room):
    server = relay_with(secret=SECRET)
    issued = []

    def token() -> str:
        issued.append(auth.issue(SECRET, "ann", rooms=[room], ttl_s=60 + len(issued)))
        return issued[-1]

    async with connect(server.url, room, token=token) as client:
        actor = client.actor
        client.ws.transport.abort()
        await collect(client, lambda ms: any(isinstance(m, Resumed) for m in ms), seconds=10)
        assert client.actor == actor
        assert len(issued) == 2 and issued[0] != issued[1]


async def test_a_resume_while_the_apps_queue_is_full_keeps_every_message(relay_with, room):
    relay = relay_with()  # its own: seats held by other tests would count in held_on
    async with connect(relay.url, room, player="sender") as sender:
        async with connect(relay.url, room, player="behind", max_queue=1) as behind:
            for i in range(3):
                sender.send_event(i)
            async with asyncio.timeout(5):
                while not behind._queue.full():
                    await asyncio.sleep(0.01)  # the reader fills the app's queue from the socket
            behind.ws.transport.abort()
            await held_on(relay, 1)
            first = [await behind.recv(), await behind.recv()]
            await held_on(relay, 0)  # resumed while the app, busy, leaves its queue full
            for i in range(3, 6):
                sender.send_event(i)
            rest = await collect(behind, lambda ms: events(ms) == [2, 3, 4, 5], seconds=10)
            assert events(first) == [0, 1]
            assert [type(m) for m in rest].count(Resumed) == 1


async def test_own_state_is_in_the_snapshot_without_echo_as_a_late_joiner_sees_it(relay, room):
    async with connect(relay.url, room, player="ann") as ann:
        ann.send_state("pos", [3, 4])
        ann.send_state("hp", 10)
        ann.send_state("hp", None)
        assert ann.snapshot == {ann.actor: {"pos": [3, 4]}}
        async with connect(relay.url, room, player="late") as late:
            assert late.snapshot == ann.snapshot
            ann.send_state("pos", None)
            await collect(late, lambda ms: any(isinstance(m, State) and m.data is None for m in ms))
            assert ann.snapshot == late.snapshot == {}


async def test_a_move_the_rules_refused_is_not_sent_again_after_a_resume(relay):
    room = f"turns:{time.monotonic_ns()}"
    async with connect(relay.url, room, player="ann") as ann, connect(relay.url, room, player="bob") as bob:
        early = bob.send_event("out of turn")  # ann's turn: refused
        error = await next_of(bob, Error)
        assert error.ref_seq == early
        ann.send_event("a1")  # now it is bob's turn
        await next_of(bob, Event)
        bob.ws.transport.abort()  # the link breaks; the seat is resumed
        await collect(bob, lambda ms: any(isinstance(m, Resumed) for m in ms), seconds=10)
        bob.send_event("b1")
        assert (await next_of(ann, Event)).data == "b1"  # not the refused move, played out of its time


async def test_an_http_url_names_the_same_relay(relay, room):
    async with connect(relay.http, room, player="web") as client:  # http://host:port, as in a browser
        assert client.actor >= 1 and await client.ping() >= 0
