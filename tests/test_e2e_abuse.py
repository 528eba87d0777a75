"""An abuse run against `relay serve` while honest players play: nothing honest is lost,
nothing crashes.

The main test runs one real server, three honest players and a silent watcher in a
room, and waves of attackers in that room and in others: garbage frames, invalid
msgpack, nesting bombs, lying length headers, extension types, unhashable map keys,
oversized frames, text frames, floods, bad seqs, DIRECTs to nobody, bad handshake
queries, WebSocket framing violations, connect/disconnect churn and half-open
sockets. Each attacker must be closed with its code; the honest players must see
every honest move exactly once, in one order, and nothing of the attackers' but
JOIN and LEAVE; the server must stay healthy and give its memory back.

The tests after it pin down capacity abuse, handshake garbage (slowloris, overlong
request lines, bad query values), ping floods, and what a rejected seq leaves behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter
from typing import Any

import pytest

from relay_client import (
    Direct,
    Dropped,
    Error,
    Event,
    Join,
    Leave,
    RelayClosed,
    State,
    connect,
    open_client,
)
from tests import abuse
from tests.abuse import ATTACK_MARK, Outcome, RawSocket, Sockets, pack, ws_frame
from tests.helpers import collect, metrics, next_of, raw_close_code, raw_connect, raw_messages, wait_metrics
from tests.relayproc import RelayProcess, timeout

pytestmark = pytest.mark.asyncio

MAX_ERRORS = 20
MAX_RATE_ERRORS = 50
MAX_FRAME_BYTES = 16384  # the default
MAX_MESSAGE_BYTES = 8192  # the default
SETTINGS: dict[str, Any] = {
    "max_errors": MAX_ERRORS,
    "errors_window_s": 10,
    "max_rate_errors": MAX_RATE_ERRORS,
    "ping_interval_s": 0.5,  # silent peers are reaped within ~1.5 s
    "ping_timeout_s": 1.0,
    "resume_window_s": 1.0,  # seats of vanished peers are held for resume, then leave
}
HONEST_MOVES = 150  # EVENTs per player, and one STATE every STATE_EVERY moves
STATE_EVERY = 5
PACE_S = 0.02  # ~60 messages/s per player: well inside the default 120/s
WAVES = 4  # spread over the honest game, one every HONEST_MOVES * PACE_S / WAVES seconds
CHURN = 8  # abrupt connect/disconnects per wave, in the honest room and in fresh rooms
RSS_GROWTH_MB = 50
ABRUPT = 1006  # the LEAVE code of a peer that vanished without a close frame

# kind -> (close code, the ERROR codes it may get). A kind closed for its rejections
# gets exactly MAX_ERRORS + 1 ERRORs, a flood exactly MAX_RATE_ERRORS + 1.
EXPECT: dict[str, tuple[int, set[str]]] = {
    "garbage": (1008, {"malformed", "bad_type"}),
    "c1": (1008, {"malformed"}),
    "bombs": (1008, {"malformed"}),
    "headers": (1008, {"malformed"}),
    "ext": (1008, {"malformed"}),
    "unhashable": (1008, {"malformed"}),
    "seq-types": (1008, {"malformed"}),
    "too-large": (1008, {"too_large"}),
    "directs": (1008, {"no_such_actor"}),
    "bad-seq": (1008, {"bad_seq"}),
    "text": (1003, {"malformed"}),
    "oversized": (1009, set()),
    "ping-flood": (4029, {"rate_limited"}),
    "event-flood": (4029, {"rate_limited"}),
    "byte-flood": (4029, {"rate_limited"}),
    "bad-query": (4400, set()),  # refused before joining: never in the room
}
BAD_QUERIES = ["?echo=2", "?player=%07", "?name=" + "n" * 65, "?offset=-5", "?player=" + "x" * 65]
# WebSocket framing violations on raw sockets, and the close code RFC 6455 gives them.
FRAMING: dict[str, tuple[bytes, int]] = {
    "unmasked": (ws_frame(2, b"\xc1", mask=False), 1002),
    "rsv-bits": (ws_frame(2, b"\xc1", rsv=4), 1002),
    "bad-opcode": (ws_frame(3, b"\xc1"), 1002),
    "huge-length": (ws_frame(2, b"", length=2**62), 1009),  # a header only: nothing follows
    "fragments": (  # 30 kB in unfinished fragments: more than max_frame_bytes
        ws_frame(2, b"\x90" * 6000, fin=False) + ws_frame(0, b"\x90" * 6000, fin=False) * 4,
        1009,
    ),
}


# --- honest players ------------------------------------------------------------------


class Honest:
    """An honest client and everything it received, read by a task of its own."""

    def __init__(self, name: str, client: Any, *, sees_all: bool) -> None:
        self.name = name
        self.client = client
        self.sees_all = sees_all  # a silent watcher, or a player with echo=1
        self.seen: list[Any] = []
        self.frozen = False  # set once the run is over: what comes later is not the run's
        self.progress = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.client.recv()
                if not self.frozen:
                    self.seen.append(message)
                self.progress.set()
        except RelayClosed:
            self.progress.set()

    async def until(self, predicate: Any, seconds: float) -> None:
        async with asyncio.timeout(timeout(seconds)):
            while not predicate(self.seen):
                if self.client.close_code is not None:
                    raise AssertionError(f"{self.name} was disconnected: {self.client.close_code}")
                self.progress.clear()
                await self.progress.wait()

    def log(self, after: int) -> list[tuple[Any, ...]]:
        """The room messages it saw after room offset ``after``, as comparable tuples."""
        out: list[tuple[Any, ...]] = []
        for m in self.seen:
            if isinstance(m, (Event, State, Join, Leave)) and m.offset <= after:
                continue
            if isinstance(m, Event):
                out.append(("EVENT", m.actor, m.offset, m.data))
            elif isinstance(m, State):
                out.append(("STATE", m.actor, m.offset, m.key, m.data))
            elif isinstance(m, Join):
                out.append(("JOIN", m.actor, m.offset, m.player))
            elif isinstance(m, Leave):
                out.append(("LEAVE", m.actor, m.offset, m.code))
        return out

    async def close(self) -> None:
        try:
            await self.client.close()
        finally:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


def honest_moves(name: str) -> tuple[list[Any], list[Any]]:
    events = [["h", name, i] for i in range(HONEST_MOVES)]
    states = [["h", name, i] for i in range(HONEST_MOVES) if i % STATE_EVERY == STATE_EVERY - 1]
    return events, states


async def play(player: Honest) -> None:
    for i in range(HONEST_MOVES):
        player.client.send_event(["h", player.name, i])
        if i % STATE_EVERY == STATE_EVERY - 1:
            player.client.send_state("pos", ["h", player.name, i])
        await asyncio.sleep(PACE_S)  # a steady game pace
    await player.client.flush()


# --- attackers -----------------------------------------------------------------------


def protocol_attacks(
    url: str, room: str, wave: int, rng: random.Random, *, honest_room: bool
) -> list[Any]:
    """Coroutines of attackers that join and then misbehave inside the protocol."""
    n = 3 * MAX_ERRORS  # more than enough: each of these frames is rejected
    where = "h" if honest_room else "s"

    def atk(kind: str, frames: list[bytes | str]) -> Any:
        player = f"atk.{kind}.{wave}.{where}"
        return abuse.send_frames(url, room, kind, player, frames, pace=0.005)

    def fld(kind: str, message: Any, per_frame: int, frames: int) -> Any:
        player = f"atk.{kind}.{wave}.{where}"
        return abuse.flood(url, room, kind, player, message, per_frame=per_frame, frames=frames)

    if wave % 2:  # valid msgpack, one move too big for a frame
        oversized = pack([1, 1, ATTACK_MARK + "x" * (MAX_FRAME_BYTES + 100)])
    else:
        oversized = b"\x00" * (MAX_FRAME_BYTES + 1)
    attacks = [
        atk("garbage", abuse.garbage_frames(rng, 4 * MAX_ERRORS)),
        atk("c1", abuse.cycle(abuse.c1_frames(), n)),
        atk("bombs", abuse.cycle(abuse.bomb_frames(), n)),
        atk("headers", abuse.cycle(abuse.header_frames(), n)),
        atk("ext", abuse.cycle(abuse.ext_frames(), n)),
        atk("unhashable", abuse.cycle(abuse.unhashable_key_frames(), n)),
        atk("seq-types", abuse.cycle(abuse.bad_seq_type_frames(), n)),
        atk("too-large", abuse.cycle(abuse.too_large_frames(MAX_MESSAGE_BYTES), n)),
        atk("directs", abuse.direct_frames(n)),
        atk("text", [b"\xc1", "a text frame"]),
        atk("oversized", [oversized]),
        fld("ping-flood", lambda i: pack([9, i]), per_frame=40, frames=30),
    ]
    if not honest_room:  # these send valid moves too, which would rightly be relayed
        attacks += [
            atk("bad-seq", abuse.bad_seq_frames(n)),
            fld("event-flood", lambda i: pack([1, i + 1, ["flood", i]]), per_frame=40, frames=30),
            fld("byte-flood", lambda i: pack([1, i + 1, b"b" * 8000]), per_frame=1, frames=300),
        ]
    return attacks


async def framing_attack(port: int, room: str, kind: str, player: str, data: bytes) -> Outcome:
    outcome = Outcome(kind, room, player)
    raw = await RawSocket.websocket(port, room, player)
    try:
        await raw.send(data)
        outcome.code = await raw.close_code(seconds=5)
    except TimeoutError:
        outcome.note = "the server did not close the connection in time"
    finally:
        await raw.close(reset=True)
    return outcome


async def bad_query(url: str, room: str, query: str) -> Outcome:
    outcome = Outcome("bad-query", room, query)
    ws = await raw_connect(url, room, query)
    try:
        outcome.code, _ = await raw_close_code(ws)
    except TimeoutError:
        outcome.note = "the server did not close the connection in time"
    finally:
        await ws.close()
    return outcome


async def churn(url: str, port: int, room: str, player: str, how: int) -> str:
    """Connect and vanish without a close frame, in one of several ways."""
    if how == 0:  # a real client sends junk, then its transport is torn down
        client = await open_client(url, room, player=player, auto_resume=False)
        try:
            await client.send_raw(b"\xc1")
            client.ws.transport.abort()
            await asyncio.wait_for(client.ws.wait_closed(), timeout(5))
        finally:
            await client.close()
        return "joined"
    if how in (1, 2):  # a raw WebSocket: a junk frame and a TCP reset, or just a FIN
        raw = await RawSocket.websocket(port, room, player)
        try:
            if how == 1:
                await raw.send(ws_frame(2, b"\x93\x01"))
        finally:
            await raw.close(reset=how == 1)
        return "joined"
    if how == 3:  # half a handshake, then a reset
        request = abuse.handshake(port, f"/ws/{room}?player={player}")
        raw = await RawSocket.connect(port, request[:40])
        await raw.close(reset=True)
        return "never joined"
    raw = await RawSocket.connect(port, os.urandom(200) + b"\r\n\r\n")  # not HTTP at all
    try:
        await raw.closed_by_server(seconds=5)  # 400 Bad Request, then EOF
    finally:
        await raw.close()
    return "never joined"


async def attack_wave(
    server: RelayProcess, room: str, wave: int, rng: random.Random, held: Sockets
) -> tuple[list[Outcome], list[str]]:
    """One wave of every attack at once: the outcomes, and who joined ``room`` and vanished."""
    side = f"{room}-side{wave % 2}"
    coros: list[Any] = []
    coros += protocol_attacks(server.url, room, wave, rng, honest_room=True)
    coros += protocol_attacks(server.url, side, wave, rng, honest_room=False)
    coros += [
        framing_attack(server.port, room, kind, f"atk.{kind}.{wave}.h", data)
        for kind, (data, _) in FRAMING.items()
    ]
    coros += [bad_query(server.url, room, query) for query in BAD_QUERIES]
    churned = [f"atk.churn.{wave}.{i}" for i in range(CHURN)]
    churns = [churn(server.url, server.port, room, p, i % 5) for i, p in enumerate(churned)]
    churns += [
        churn(server.url, server.port, f"{room}-c{wave}-{i}", f"atk.roomchurn.{wave}.{i}", i % 5)
        for i in range(CHURN)
    ]
    # Half-open sockets, left open: a WebSocket that goes silent (the keepalive must reap
    # it), and TCP connections that stop before or in the middle of an HTTP request.
    ghost = held.keep(await RawSocket.websocket(server.port, room, f"atk.ghost.{wave}.h"))
    ghost.go_silent()
    for partial in (b"", f"GET /ws/{room} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode(), b"GET /hea"):
        held.keep(await RawSocket.connect(server.port, partial))
    async with asyncio.TaskGroup() as tg:  # one failure cancels the rest: nothing left running
        attacks = [tg.create_task(c) for c in coros]
        churning = [tg.create_task(c) for c in churns]
    joined = [p for p, t in zip(churned, churning) if t.result() == "joined"]
    return [t.result() for t in attacks], joined + [f"atk.ghost.{wave}.h"]


# --- the server from outside ---------------------------------------------------------


def rss_mb(server: RelayProcess, field: str = "VmRSS") -> float:
    """The server's resident memory in MB (``VmHWM``: its peak so far)."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as f:
        found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert found, f"no {field} for the server process"
    return int(found.group(1)) / 1024


def server_log(server: RelayProcess) -> str:
    fd = server.log.fileno()  # pread: the server shares this file's offset
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


async def health_probe(server: RelayProcess, stop: asyncio.Event, answers: list[Any]) -> None:
    """GET /healthz every 0.2 s until ``stop``; each must answer (urllib's own 5 s timeout)."""
    while not stop.is_set():
        started = time.monotonic()
        body = await asyncio.to_thread(server.get_json, "/healthz")
        answers.append((time.monotonic() - started, body))
        try:
            async with asyncio.timeout(0.2):
                await stop.wait()
        except TimeoutError:
            pass


# --- the abuse run -------------------------------------------------------------------


async def test_abuse_while_honest_players_play(relay_with, room):
    server = relay_with(**SETTINGS)
    rng = random.Random(20240611)
    held = Sockets()
    honest: list[Honest] = []
    stop_probe = asyncio.Event()
    answers: list[Any] = []
    probe: asyncio.Task[None] | None = None
    outcomes: list[Outcome] = []
    vanished: list[str] = []  # players that joined the honest room and vanished abruptly
    try:
        # auto_resume off: a disconnect must show as one, not be papered over by a resume.
        watch = await open_client(server.url, room, player="watch", auto_resume=False)
        watcher = Honest("watch", watch, sees_all=True)
        honest.append(watcher)
        for i in range(3):
            client = await open_client(
                server.url, room, player=f"p{i}", echo=i == 0, auto_resume=False
            )
            honest.append(Honest(f"p{i}", client, sees_all=i == 0))
        players = honest[1:]
        await watcher.until(lambda ms: sum(isinstance(m, Join) for m in ms) == 3, 5)
        start = max(h.client.welcome.offset for h in honest)  # from here on all see everything
        before = await asyncio.to_thread(metrics, server)
        rss_before = rss_mb(server)
        probe = asyncio.create_task(health_probe(server, stop_probe, answers))

        async def attack() -> None:
            spacing = HONEST_MOVES * PACE_S / WAVES
            for wave in range(WAVES):
                await asyncio.sleep(max(0.0, started + wave * spacing - time.monotonic()))  # pacing
                got, gone = await attack_wave(server, room, wave, rng, held)
                outcomes.extend(got)
                vanished.extend(gone)

        started = time.monotonic()
        async with asyncio.timeout(timeout(40)), asyncio.TaskGroup() as tg:
            for p in players:
                tg.create_task(play(p))
            tg.create_task(attack())

        # Every attacker is gone: the ghosts reaped by the keepalive, the seats of vanished
        # peers held for resume and then given up, the rooms they made forgotten.
        honest_actors = {h.client.actor for h in honest}
        await watcher.until(lambda ms: set(watcher.client.members) == honest_actors, 15)
        gone = {"relay_connections_open": len(honest), "relay_rooms_local": 1}
        await wait_metrics(server, gone, 15)
        # One last honest move: once everyone has it, everyone has seen the whole room.
        fin = ["h", "p0", "fin"]
        players[0].client.send_event(fin)
        for h in honest:
            await h.until(lambda ms: any(isinstance(m, Event) and m.data == fin for m in ms), 15)
        stop_probe.set()
        await probe
        assert (await asyncio.to_thread(server.get_json, "/healthz")) == {"status": "ok"}
        rss_after, rss_peak = rss_mb(server), rss_mb(server, "VmHWM")
        after = await asyncio.to_thread(metrics, server)
        close_codes = {h.name: h.client.close_code for h in honest}  # before we close them
        for h in honest:
            h.frozen = True
        assert server.proc is not None and server.proc.poll() is None, "the server died"
    finally:
        stop_probe.set()
        if probe is not None:
            await asyncio.gather(probe, return_exceptions=True)
        await held.close_all()
        for h in honest:
            await h.close()

    # 1. Honest players: every honest move exactly once, in one order; nothing else relayed.
    actors = {h.client.actor: h.name for h in players}
    expected = {h.name: honest_moves(h.name) for h in players}
    expected["p0"][0].append(fin)
    for h in honest:
        assert close_codes[h.name] is None, f"{h.name} was disconnected: {close_codes[h.name]}"
        unwanted = [m for m in h.seen if isinstance(m, (Error, Dropped, Direct))]
        assert not unwanted, f"{h.name} got {unwanted[:3]}"
        assert h.client.dropped == 0
        moves = [m for m in h.seen if isinstance(m, (Event, State))]
        strangers = [m for m in moves if m.actor not in actors]
        assert not strangers, f"{h.name} got moves of attackers: {strangers[:3]}"
        for m in moves:
            assert m.data[:2] == ["h", actors[m.actor]], f"{h.name} got a move nobody made: {m}"
        for actor, name in actors.items():
            if name == h.name and not h.sees_all:
                assert not [m for m in moves if m.actor == actor], f"{h.name} got its own moves"
                continue
            events, states = expected[name]
            got_events = [m.data for m in moves if isinstance(m, Event) and m.actor == actor]
            got_states = [m.data for m in moves if isinstance(m, State) and m.actor == actor]
            assert got_events == events, (h.name, name)
            assert got_states == states, (h.name, name)
        left_honest = {m.actor for m in h.seen if isinstance(m, Leave)} & set(actors)
        assert not left_honest, f"{h.name} saw an honest player leave"
        offsets = [entry[2] for entry in h.log(start)]
        assert offsets == sorted(set(offsets)), f"{h.name}: room order broken"
        if h.sees_all:  # consecutive: not one room message lost
            assert offsets == list(range(start + 1, start + 1 + len(offsets))), h.name
    room_order = watcher.log(start)
    assert players[0].log(start) == room_order
    for h in players[1:]:
        mine = ("EVENT", "STATE")
        others = [e for e in room_order if not (e[0] in mine and e[1] == h.client.actor)]
        assert h.log(start) == others, h.name

    # 2. Attackers: each closed with its code, after exactly its error budget.
    kinds = Counter(o.kind for o in outcomes)
    assert set(kinds) == set(EXPECT) | set(FRAMING), kinds
    for o in outcomes:
        if o.kind in FRAMING:
            assert o.code == FRAMING[o.kind][1], (o.kind, o.room, o.code, o.note)
            continue
        code, allowed = EXPECT[o.kind]
        last = [(e.ref_seq, e.code, e.message) for e in o.errors[-3:]]
        assert o.code == code, (o.kind, o.room, o.code, o.note, last)
        assert o.codes() <= allowed, (o.kind, o.codes())
        if code == 1008:
            assert len(o.errors) == MAX_ERRORS + 1, (o.kind, len(o.errors))
        elif code == 4029:
            assert len(o.errors) == MAX_RATE_ERRORS + 1, (o.kind, len(o.errors))
        assert all(e.message for e in o.errors)
        if o.kind == "directs":
            assert all(isinstance(e.ref_seq, int) for e in o.errors)
        if o.kind == "byte-flood":
            assert all(isinstance(e.ref_seq, int) and "bytes/s" in e.message for e in o.errors)
    # The room saw every attacker that joined it leave, with the code it was closed with.
    player_of = {m.actor: m.player for m in watcher.seen if isinstance(m, Join)}
    left = {player_of[m.actor]: m.code for m in watcher.seen if isinstance(m, Leave)}
    for o in outcomes:
        if o.room == room and o.kind != "bad-query":
            want = FRAMING[o.kind][1] if o.kind in FRAMING else EXPECT[o.kind][0]
            assert left.get(o.player) == want, (o.player, left.get(o.player))
    for player in vanished:
        assert left.get(player) == ABRUPT, (player, left.get(player))
    assert set(left) == {p for p in player_of.values() if p.startswith("atk.")}

    # 3. The server: healthy throughout, memory given back, errors and closes counted by code.
    assert len(answers) >= 3 and all(body == {"status": "ok"} for _, body in answers), answers
    assert rss_after - rss_before < RSS_GROWTH_MB, (rss_before, rss_after)
    assert rss_peak - rss_before < 2 * RSS_GROWTH_MB, (rss_before, rss_peak)  # even at its worst

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    seen_errors = Counter(e.code for o in outcomes for e in o.errors)
    for code in ("malformed", "too_large", "no_such_actor", "bad_seq", "rate_limited"):
        assert seen_errors[code] > 0, code
    for code, n in seen_errors.items():
        assert delta(f'relay_errors_total{{code="{code}"}}') >= n, (code, n)
    closes = Counter(o.code for o in outcomes if o.kind != "bad-query")  # (4400s: never seated)
    closes[ABRUPT] += len(vanished)
    for code, n in closes.items():
        counted = delta(f'relay_closes_total{{code="{code}"}}')
        assert counted >= n, (code, n, counted)
    assert delta('relay_closes_total{code="1011"}') == 0, "an internal error closed a connection"
    log = server_log(server)
    assert "Traceback" not in log, log[-3000:]


# --- capacity abuse ------------------------------------------------------------------


async def try_open(url: str, room: str, player: str) -> Any:
    """A client, or the RelayClosed the server refused it with."""
    try:
        return await open_client(url, room, player=player, auto_resume=False)
    except RelayClosed as exc:
        return exc


async def test_capacity_abuse_is_refused_and_released(relay_with, room):
    """Room squatting, room and connection flooding get 4009/1013; honest play goes on."""
    server = relay_with(
        max_players_per_room=8, max_rooms=6, max_connections_per_ip=20, resume_window_s=0.5
    )
    a = await open_client(server.url, room, player="a", auto_resume=False)
    b = await open_client(server.url, room, player="b", auto_resume=False)
    attackers: list[Any] = []

    async def opened(room_id: str, players: list[str]) -> list[RelayClosed]:
        got = await asyncio.gather(*(try_open(server.url, room_id, p) for p in players))
        attackers.extend(c for c in got if not isinstance(c, RelayClosed))
        return [c for c in got if isinstance(c, RelayClosed)]

    async def moves() -> None:
        for i in range(50):
            a.send_event(["a", i])
            await asyncio.sleep(0.005)  # a steady game pace
        await a.flush()

    try:
        # 10 at once into a room with 6 free seats, while a plays.
        refused, _ = await asyncio.gather(opened(room, [f"sq{i}" for i in range(10)]), moves())
        assert sorted(c.code for c in refused) == [4009] * 4, refused
        # 10 new rooms where 5 more may exist.
        flooded = await asyncio.gather(*(opened(f"{room}-r{i}", ["rf"]) for i in range(10)))
        refused = [c for got in flooded for c in got]
        assert len(refused) == 5 and all(c.code == 1013 and "room" in c.reason for c in refused)
        # 10 more connections from an address that has 7 left (2 + 6 + 5 of 20 are open).
        refused = await opened(attackers[-1].room, [f"ip{i}" for i in range(10)])
        assert len(refused) == 3 and all(c.code == 1013 and "address" in c.reason for c in refused)
        # The honest pair noticed nothing but JOINs.
        seen = await collect(b, lambda ms: sum(isinstance(m, Event) for m in ms) == 50)
        assert [m.data for m in seen if isinstance(m, Event)] == [["a", i] for i in range(50)]
        assert not [m for m in seen if isinstance(m, (Error, Dropped))]
        # The attackers go, half of them without a close frame; all they held is given back.
        for i, c in enumerate(attackers):
            if i % 2:
                c.ws.transport.abort()
            await c.close()
        await collect(b, lambda ms: set(b.members) == {a.actor, b.actor}, seconds=10)
        await wait_metrics(server, {"relay_connections_open": 2, "relay_rooms_local": 1}, 10)
        assert not await opened(room, [f"new{i}" for i in range(6)])
        assert not await opened(f"{room}-again", ["new"])
        assert a.close_code is None and b.close_code is None
    finally:
        for c in attackers:
            await c.close()
        await a.close()
        await b.close()


# --- garbage in the handshake --------------------------------------------------------



@pytest.mark.parametrize(
    "query",
    [
        "?echo=%FF",
        "?echo=maybe",
        "?player=%00",
        "?player=" + "p" * 65,
        "?player=" + "%C3%A9" * 40,  # 40 characters, 80 bytes
        "?name=" + "n" * 65,
        "?name=%0A",
        "?offset=-1",
        "?offset=1%00",
        "?offset=0x10",
        "?resume=x&offset=%20",
        pytest.param("?offset=%C2%B2", id="offset-superscript-two"),
        pytest.param("?offset=" + "9" * 5000, id="offset-5000-digits"),
    ],
    ids=lambda q: q[:24],
)
async def test_garbage_query_parameters_close_4400(relay, room, query):
    ws = await raw_connect(relay.url, room, query)
    try:
        code, reason = await raw_close_code(ws)
    finally:
        await ws.close()
    assert (code, bool(reason)) == (4400, True), f"{query[:40]!r}: closed with {code} {reason!r}"
    assert (await asyncio.to_thread(relay.get_json, "/healthz")) == {"status": "ok"}


@pytest.mark.parametrize(
    "query",
    [
        "?resume=not-a-token",
        "?resume=x&offset=5&epoch=nope",
        "?resume=" + "r" * 3000 + "&offset=" + "9" * 18,
    ],
    ids=["token", "token-offset-epoch", "long"],
)
async def test_unknown_resume_token_is_a_fresh_join(relay, room, query):
    ws = await raw_connect(relay.url, room, query)
    try:
        welcome = (await raw_messages(ws))[0]
    finally:
        await ws.close()
    assert welcome[0] == 0 and welcome[3] == room and welcome[11] is None  # WELCOME, last_seq nil


# --- server bugs found by the abuse run ----------------------------------------------


async def test_half_open_http_request_is_reaped(relay_with, room):
    server = relay_with(ping_interval_s=0.5, ping_timeout_s=0.5, request_timeout_s=1)
    held = Sockets()
    partial = f"GET /ws/{room}?player=slow HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()
    # A generous bound: ping interval and timeout, plus uvicorn's 5 s idle keep-alive.
    bound = 0.5 + 0.5 + 5 + 0.5

    async def reaped_in_time(raw: RawSocket) -> bool:
        try:
            return await raw.closed_by_server(seconds=bound)
        except TimeoutError:
            return False

    try:
        silent = held.keep(await RawSocket.connect(server.port))
        halfway = held.keep(await RawSocket.connect(server.port, partial))
        reaped = await asyncio.gather(reaped_in_time(silent), reaped_in_time(halfway))
        assert (await asyncio.to_thread(server.get_json, "/healthz")) == {"status": "ok"}
    finally:
        await held.close_all()
    assert reaped == [True, True], f"open after {bound} s: (no bytes, half a request) -> {reaped}"


async def test_overlong_upgrade_request_is_answered(relay_with, room):
    server = relay_with()
    long_line = abuse.handshake(server.port, f"/ws/{room}?name=" + "n" * 9000)
    head, _, rest = abuse.handshake(server.port, f"/ws/{room}").partition(b"\r\n")
    long_header = head + b"\r\nX-Pad: " + b"p" * 9000 + b"\r\n" + rest
    held = Sockets()

    async def answer(raw: RawSocket) -> bytes | None:
        try:
            async with asyncio.timeout(timeout(3)):
                return await raw.reader.read(200)
        except TimeoutError:
            return None

    try:
        requests = (long_line, long_header)
        raws = [held.keep(await RawSocket.connect(server.port, r)) for r in requests]
        answers = await asyncio.gather(*(answer(r) for r in raws))
        assert (await asyncio.to_thread(server.get_json, "/healthz")) == {"status": "ok"}
    finally:
        await held.close_all()
    for what, got in zip(("long request line", "long header line"), answers):
        assert got is not None, f"{what}: no HTTP answer and no close 3 s after a complete request"
        assert got == b"" or got.startswith(b"HTTP/1.1 4"), (what, got)


@pytest.mark.parametrize("rejection", ["direct-to-nobody", "grid-rules"])
async def test_rejected_seq_is_not_taken_as_last_seq(relay, rejection):
    room = f"{'grid' if rejection == 'grid-rules' else 'test'}:{time.monotonic_ns()}"
    a = await open_client(relay.url, room, player="a", auto_resume=False)
    b = await open_client(relay.url, room, player="b", auto_resume=False)
    try:
        await a.send_raw(pack([2, 1, "pos", [0, 0]]))  # accepted: seq 1
        if rejection == "direct-to-nobody":
            await a.send_raw(pack([3, 100, 9999, "x"]))  # no_such_actor
        else:
            await a.send_raw(pack([2, 100, "pos", [9, 9]]))  # rejected: more than one step
        await a.send_raw(pack([1, 50, "after the rejection"]) + pack([1, 101, "sentinel"]))
        seen = await collect(b, lambda ms: any(getattr(m, "data", None) == "sentinel" for m in ms))
        first_error = await collect(a, lambda ms: any(isinstance(m, Error) for m in ms))
    finally:
        await a.close()
        await b.close()
    error = first_error[-1]
    assert error.ref_seq == 100 and error.code in ("no_such_actor", "rejected"), error
    got = [m.data for m in seen if isinstance(m, Event)]
    assert got == ["after the rejection", "sentinel"], f"seq 50 after a rejected seq 100: {got}"


async def test_websocket_ping_flood_from_a_non_reader_keeps_memory_bounded(relay_with, room):
    server = relay_with(ping_interval_s=60, ping_timeout_s=60)  # not what should bound this
    held = Sockets()
    target, bound_mb = 40 * 2**20, 16
    chunk = ws_frame(9, b"p" * 125) * 1000
    sent = 0
    try:
        raw = held.keep(await RawSocket.websocket(server.port, room, "pinger"))
        raw.go_silent()
        rss_before = rss_mb(server)
        async with asyncio.timeout(timeout(15)):
            while sent < target:
                try:
                    async with asyncio.timeout(1):
                        if not await raw.send(chunk):
                            break
                except TimeoutError:
                    break  # the server stopped reading us: pushed back, as it should
                sent += len(chunk)
        grown = rss_mb(server) - rss_before
        assert (await asyncio.to_thread(server.get_json, "/healthz")) == {"status": "ok"}
    finally:
        await held.close_all()
    assert grown < bound_mb, f"RSS grew {grown:.0f} MB; a non-reader sent {sent >> 20} MB of pings"


async def test_a_message_in_endless_empty_fragments_is_cut_off(relay, room):
    held = Sockets()
    try:
        async with connect(relay.url, room, player="watch") as watch:
            honest = held.keep(await RawSocket.websocket(relay.port, room, "honest"))
            # A message may come in fragments (a few here), then goes to the room as one.
            fragments = [pack([1, 1, "in pieces"])[i : i + 3] for i in range(0, 15, 3)]
            await honest.send(b"".join(ws_frame(2 if i == 0 else 0, f, fin=i == len(fragments) - 1)
                                       for i, f in enumerate(fragments)))
            assert (await next_of(watch, Event)).data == "in pieces"
            # Empty continuation frames cost no bytes: without a limit on fragments they
            # grew the server's memory, and held its event loop, for as long as they came.
            flood = held.keep(await RawSocket.websocket(relay.port, room, "flood"))
            await flood.send(ws_frame(2, pack([1, 1, "x"])[:2], fin=False) + ws_frame(0, fin=False) * 10_000)
            assert await flood.close_code() == 1009
    finally:
        await held.close_all()


async def test_an_endless_request_header_is_answered_431_without_being_buffered(relay, room):
    head, _, rest = abuse.handshake(relay.port, f"/ws/{room}").partition(b"\r\n")
    held = Sockets()
    try:
        raw = held.keep(await RawSocket.connect(relay.port, head + b"\r\nX-Big: "))
        before = rss_mb(relay)
        sent = 0
        async with asyncio.timeout(timeout(10)):
            while sent < 32 << 20 and await raw.send(b"x" * (1 << 20)):  # never finished
                sent += 1 << 20
            answer = await raw.reader.read(200)
        assert answer.startswith(b"HTTP/1.1 431"), answer
        assert rss_mb(relay) - before < 8  # the 32 MiB that followed were dropped, not kept
    finally:
        await held.close_all()


async def test_a_flood_of_websocket_pings_from_a_reader_is_cut_off_with_4029(relay, room):
    held = Sockets()
    try:
        calm = held.keep(await RawSocket.websocket(relay.port, room, "calm"))
        await calm.send(ws_frame(9, b"hello"))
        frames = []
        async with asyncio.timeout(timeout(5)):
            while not frames or frames[-1][0] != 10:
                frames.append(await calm.read_frame())  # WELCOME, then the pong
        assert frames[-1] == (10, b"hello")
        # Pings are answered by the server's event loop like moves: past the message
        # rate they end the connection, as moves past it repeatedly do.
        flood = held.keep(await RawSocket.websocket(relay.port, room, "flood"))
        await flood.send(ws_frame(9, b"p") * 1000)
        assert await flood.close_code() == 4029
        await calm.send(ws_frame(9, b"still"))
        async with asyncio.timeout(timeout(5)):
            while (frame := await calm.read_frame())[0] != 10:
                pass
        assert frame == (10, b"still")
    finally:
        await held.close_all()


async def test_a_request_head_too_big_is_refused_on_a_kept_alive_connection_too(relay_with):
    server = relay_with(max_request_head_bytes=2000, request_timeout_s=1)
    held = Sockets()
    try:
        first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        raw = held.keep(await RawSocket.connect(server.port, first))
        async with asyncio.timeout(timeout(5)):
            head = await raw.reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await raw.reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.I).group(1)))
            # The next request on it: its head, 3.4 KB in one write, is over the limit.
            await raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 3400 + b"\r\n\r\n")
            assert (await raw.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 431")
            assert await raw.reader.read() == b""  # and, quiet or not, the connection is then ended
    finally:
        await held.close_all()
