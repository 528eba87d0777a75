"""Tokens, origins, capacity limits, rate limits and game rules, over real sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import jwt
import msgpack
import pytest
import websockets

from relay import auth
from relay_client import Error, Event, Leave, RelayClosed, Resumed, State, connect, open_client
from tests.helpers import closed, collect, held_on, next_of, raw_close_code, raw_connect, raw_messages
from tests.relayproc import free_port

pytestmark = pytest.mark.asyncio

SECRET = "a-test-secret-that-is-long-enough-for-hs256-and-even-for-hs512-keys!"


def cli_token(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "token", "--secret", SECRET, *args],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return out.stdout.strip()


@pytest.fixture
def secured(relay_with):
    return relay_with(secret=SECRET)


async def refused(server, room, **params) -> RelayClosed:
    with pytest.raises(RelayClosed) as info:
        async with connect(server.url, room, **params):
            pass
    return info.value


async def test_token_from_cli_names_the_player_and_overrides_the_query(secured, room):
    token = cli_token("--player", "ann", "--room", "test:*", "--name", "Ann")
    async with connect(secured.url, room, token=token, player="mallory") as client:
        me = client.members[client.actor]
        assert (me.player, me.meta) == ("ann", {"name": "Ann"})


@pytest.mark.parametrize(
    "token",
    [
        None,
        "",
        "not-a-jwt",
        "a.b.c",
        jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, "another-secret-that-is-long-enough!!", algorithm="HS256"),
        jwt.encode({"sub": "ann", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "ann"}, SECRET, algorithm="HS256"),  # no expiry
        jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),  # no player
        jwt.encode({"sub": "ann", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"),
        jwt.encode({"sub": "a\x00b", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "ann", "name": "n" * 65, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "ann", "name": 7, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
    ],
    ids=["missing", "empty", "garbage", "three-parts", "bad-signature", "expired", "no-exp", "no-sub", "wrong-alg",
         "unprintable-sub", "long-name", "name-not-a-string"],
)
async def test_bad_tokens_close_4001(secured, room, token):
    params = {} if token is None else {"token": token}
    exc = await refused(secured, room, **params)
    assert exc.code == 4001 and exc.reason


async def test_tampered_token_closes_4001(secured, room):
    header, payload, signature = auth.issue(SECRET, "ann").split(".")
    forged = jwt.encode({"sub": "root", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256").split(".")[1]
    exc = await refused(secured, room, token=f"{header}.{forged}.{signature}")
    assert exc.code == 4001


async def test_room_outside_the_tokens_patterns_closes_4003(secured):
    token = cli_token("--player", "ann", "--room", "grid:*", "--room", "lobby")
    exc = await refused(secured, "turns:1", token=token)
    assert exc.code == 4003 and "turns:1" in exc.reason
    async with connect(secured.url, "lobby", token=token), connect(secured.url, "grid:7", token=token):
        pass


async def test_origin_not_allowed_is_refused(relay_with, room):
    server = relay_with(allowed_origins="https://game.example")
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"{server.url}/ws/{room}", origin="https://evil.example")
    assert info.value.response.status_code == 403
    ok = await websockets.connect(f"{server.url}/ws/{room}", origin="https://game.example")
    await ok.close()
    # The relay's own pages (the demo at /) connect from the relay's own origin.
    own = await websockets.connect(f"{server.url}/ws/{room}", origin=server.http)
    await own.close()
    with pytest.raises(websockets.InvalidStatus):  # the same host name alone is not enough
        await websockets.connect(f"{server.url}/ws/{room}", origin="http://127.0.0.1:1")


async def test_capacity_limits_close_1013(relay_with, room):
    server = relay_with(max_connections=2, max_rooms=1)
    async with connect(server.url, room):
        exc = await refused(server, "test:another-room")
        assert exc.code == 1013 and "room" in exc.reason
        async with connect(server.url, room):
            exc = await refused(server, room)
            assert exc.code == 1013 and "connection" in exc.reason


async def test_connections_per_ip_close_1013(relay_with, room):
    server = relay_with(max_connections_per_ip=1)
    async with connect(server.url, room):
        exc = await refused(server, room)
        assert exc.code == 1013


async def test_held_seats_count_against_the_connection_limits_until_their_hold_ends(relay_with, room):
    """Dropped connections leave held seats (rooms, memory): an address cannot pile them up."""
    server = relay_with(max_connections_per_ip=2, resume_window_s=60)
    a = await open_client(server.url, f"{room}-a", player="a", auto_resume=False)
    b = await open_client(server.url, f"{room}-b", player="b", auto_resume=False)
    try:
        a.ws.transport.abort()
        b.ws.transport.abort()
        await held_on(server, 2)
        exc = await refused(server, f"{room}-c", player="c")
        assert exc.code == 1013 and "too many connections from this address" in exc.reason
        # A held seat's player takes it back, at the limit: the seat's place is its own.
        again = await open_client(server.url, f"{room}-a", player="a", resume=a.resume_token,
                                  offset=str(a.offset), epoch=a.epoch)
        assert again.actor == a.actor
        await again.close()  # given up for good: its place is free again
        async with asyncio.timeout(5):
            while True:
                try:
                    c = await open_client(server.url, f"{room}-c", player="c")
                    break
                except RelayClosed as exc:
                    assert exc.code == 1013
                    await asyncio.sleep(0.02)  # until the server has counted a's close
        exc = await refused(server, f"{room}-d", player="d")  # b's hold and c: the limit again
        assert exc.code == 1013
        await c.close()
    finally:
        await a.close()
        await b.close()


async def test_a_held_seat_gives_its_place_back_when_its_hold_runs_out(relay_with, room):
    server = relay_with(max_connections_per_ip=2, resume_window_s=2)
    async with connect(server.url, room, player="watch") as watch:
        away = await open_client(server.url, room, player="away", auto_resume=False)
        away.ws.transport.abort()
        await held_on(server, 1)
        assert (await refused(server, room, player="c")).code == 1013  # watch + the held seat
        leave = await next_of(watch, Leave, seconds=10)  # the hold ran out: LEAVE 1006
        assert (leave.actor, leave.code) == (away.actor, 1006)
        async with connect(server.url, room, player="c") as c:  # its place was freed before its LEAVE
            assert c.actor != away.actor
        await away.close()


async def test_flood_is_rate_limited_then_closed_4029(relay_with, room):
    server = relay_with(max_msgs_per_s=10, burst=5, max_rate_errors=20)
    async with connect(server.url, room, player="watch") as watch:
        flooder = await open_client(server.url, room, player="flood")
        for i in range(10):
            flooder.send_event(i)
        await flooder.flush()
        errors = await collect(flooder, lambda ms: sum(isinstance(m, Error) for m in ms) >= 5)
        assert {m.code for m in errors if isinstance(m, Error)} == {"rate_limited"}
        relayed = await collect(watch, lambda ms: sum(isinstance(m, Event) for m in ms) >= 5)
        assert [m.data for m in relayed if isinstance(m, Event)][:5] == [0, 1, 2, 3, 4]
        for i in range(10, 100):
            flooder.send_event(i)
        assert (await closed(flooder)).code == 4029


async def test_byte_rate_limit(relay_with, room):
    server = relay_with(max_bytes_per_s=1000, burst_bytes=16384)
    async with connect(server.url, room) as client:
        await client.send_raw(msgpack.packb([1, 1, b"x" * 8000]))
        await client.send_raw(msgpack.packb([1, 2, b"x" * 8000]))
        await client.send_raw(msgpack.packb([1, 3, b"x" * 8000]) + msgpack.packb([1, 4, "small"]))
        errors = await collect(client, lambda ms: sum(isinstance(m, Error) for m in ms) == 2)
        errors = [m for m in errors if isinstance(m, Error)]
        assert [(e.ref_seq, e.code) for e in errors] == [(3, "rate_limited"), (4, "rate_limited")]
        assert all("bytes/s" in e.message for e in errors)
        await client.send_raw(msgpack.packb([9, 1]) * 1000)  # PINGs alone: one ERROR for the frame
        error = await next_of(client, Error)
        assert (error.ref_seq, error.code) == (None, "rate_limited")


async def test_deep_nesting_is_malformed(relay, room):
    deep: list = [1]
    for _ in range(40):
        deep = [deep]
    async with connect(relay.url, room) as client:
        seq = client.send_event(deep)
        error = await next_of(client, Error)
        assert (error.ref_seq, error.code) == (seq, "malformed") and "max_depth" in error.message


async def test_grid_rules_bounds_steps_and_occupied_cells(relay):
    room = f"grid:{time.monotonic_ns()}"
    async with connect(relay.url, room, player="a") as a, connect(relay.url, room, player="b") as b:
        a.send_state("pos", [0, 0])
        b.send_state("pos", [1, 0])
        await collect(b, lambda ms: any(isinstance(m, State) for m in ms))
        rejected = {
            a.send_state("pos", [1, 0]): "taken",   # b stands there
            a.send_state("pos", [0, 5]): "step",    # more than one step
            a.send_state("pos", [-1, 0]): "pos must",
            a.send_state("pos", "nowhere"): "pos must",
        }
        moved = a.send_state("pos", [0, 1])
        errors = await collect(a, lambda ms: sum(isinstance(m, Error) for m in ms) == 4)
        got = {m.ref_seq: m for m in errors if isinstance(m, Error)}
        for seq, words in rejected.items():
            assert got[seq].code == "rejected" and words in got[seq].message
        assert moved not in got
        final = await collect(b, lambda ms: any(isinstance(m, State) and m.data == [0, 1] for m in ms))
        assert [m.data for m in final if isinstance(m, State) and m.actor == a.actor] == [[0, 1]]
        a.send_event({"t": "boom"})  # events are not the grid's business
        assert (await next_of(b, Event)).data == {"t": "boom"}


async def test_grid_a_player_taken_off_the_board_comes_back_where_it_left(relay):
    room = f"grid:{time.monotonic_ns()}"
    async with connect(relay.url, room, player="a") as a, connect(relay.url, room, player="watch") as watch:
        a.send_state("pos", [0, 0])
        a.send_state("pos", None)  # off the board...
        jump = a.send_state("pos", [19, 14])  # ...and back on across it: refused
        a.send_state("pos", [1, 0])  # one step from where it left: fine
        error = await next_of(a, Error)
        assert (error.ref_seq, error.code) == (jump, "rejected") and "one step" in error.message
        got = await collect(watch, lambda ms: any(isinstance(m, State) and m.data == [1, 0] for m in ms))
        assert [m.data for m in got if isinstance(m, State)] == [[0, 0], None, [1, 0]]


async def test_late_joiner_cannot_land_on_a_taken_cell(relay):
    room = f"grid:{time.monotonic_ns()}"
    async with connect(relay.url, room, player="a", echo=True) as a:
        a.send_state("pos", [3, 3])
        await next_of(a, State)
        async with connect(relay.url, room, player="late") as late:
            seq = late.send_state("pos", [3, 3])
            error = await next_of(late, Error)
            assert (error.ref_seq, error.code) == (seq, "rejected")


async def test_turn_rules_only_the_current_player_moves(relay):
    room = f"turns:{time.monotonic_ns()}"
    async with connect(relay.url, room, player="first") as first, connect(relay.url, room, player="second") as second:
        early = second.send_event("out of turn")
        error = await next_of(second, Error)
        assert (error.ref_seq, error.code) == (early, "rejected") and "turn" in error.message
        first.send_event("move 1")
        assert (await next_of(second, Event)).data == "move 1"
        second.send_event("move 2")
        assert (await next_of(first, Event)).data == "move 2"
        again = second.send_event("twice")
        error = await next_of(second, Error)
        assert error.ref_seq == again
        first.send_event("move 3")
        assert (await next_of(second, Event)).data == "move 3"


async def test_turn_passes_when_the_current_player_leaves(relay):
    room = f"turns:{time.monotonic_ns()}"
    async with connect(relay.url, room, player="first") as first, connect(relay.url, room, player="third") as third:
        second = await open_client(relay.url, room, player="second")
        first.send_event("move 1")  # now it is second's turn
        assert (await next_of(second, Event)).data == "move 1"
        await second.close()  # second leaves on its turn: the turn passes to third
        await next_of(first, Leave)
        refused_seq = first.send_event("not mine")
        error = await next_of(first, Error)
        assert error.ref_seq == refused_seq
        third.send_event("move 2")
        assert (await next_of(first, Event)).data == "move 2"


async def test_first_connect_moves_past_an_unreachable_node_but_not_past_a_verdict(secured, room):
    nobody = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    token = auth.issue(SECRET, "ann")
    async with connect([nobody, secured.url], room, token=token) as client:
        assert client.members[client.actor].player == "ann"
    # A bad token is refused by every node alike: reported as it is, no other node tried
    # (trying the unreachable one would have raised a connection error instead).
    with pytest.raises(RelayClosed) as info:
        async with connect([secured.url, nobody], room, token="not-a-token"):
            pass
    assert info.value.code == 4001


async def test_tokens_and_resume_tokens_stay_out_of_the_log(relay_with, room):
    # uvicorn logs each WebSocket's path and query at INFO: both are bearer secrets.
    server = relay_with(secret=SECRET, log_level="info")
    token = cli_token("--player", "ann", "--room", "test:*")
    async with connect(server.url, room, token=token) as client:
        resume = client.resume_token
        client.ws.transport.abort()  # the client comes back with ?resume=...&token=...
        await next_of(client, Resumed, seconds=10)
    server.log.seek(0)
    log = server.log.read().decode(errors="replace")
    assert "[accepted]" in log and "token=<redacted>" in log and "resume=<redacted>" in log
    assert token not in log and token.split(".")[2] not in log
    assert resume.split(".", 1)[1] not in log
    # A name the relay reads percent-decoded is redacted as such.
    ws = await raw_connect(server.url, room, f"?%74oken={token}&player=x")
    await raw_messages(ws)
    await ws.close()
    server.log.seek(0)
    assert token.split(".")[2] not in server.log.read().decode(errors="replace")
    # After a ';' (which the relay does not take as a separator: 4001) it is still a secret.
    ws = await raw_connect(server.url, room, f"?x=1;token={token}")
    assert (await raw_close_code(ws))[0] == 4001
    server.log.seek(0)
    log = server.log.read().decode(errors="replace")
    assert token.split(".")[2] not in log and "x=1;token=<redacted>" in log
    # Nor can a quote in an earlier parameter hide it.
    async with connect(server.url, room, token=token, name="O'Brien") as client:
        assert client.members[client.actor].meta == {"name": "O'Brien"}
    ws = await raw_connect(server.url, room, f"?name=O'Brien&token={token}")
    await raw_messages(ws)
    await ws.close()
    server.log.seek(0)
    assert token.split(".")[2] not in server.log.read().decode(errors="replace")
