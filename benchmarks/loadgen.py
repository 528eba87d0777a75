"""The load generator: players spread over worker processes, each on uvloop.

The parent lays out the seats, forks the workers, and keeps the clock: once
every worker reports its players joined, it sends one start time, reads the
servers' /proc figures at the window's edges, and shows progress while the
workers play. Workers send back a :class:`~benchmarks.player.Tally` each.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from benchmarks import procstats
from benchmarks.player import Player, Seat, Tally, Window
from benchmarks.progress import Progress

CONNECT_CONCURRENCY = 64  # handshakes in flight per worker


@dataclass(frozen=True)
class Load:
    """What to offer: a layout of seats and how each player plays."""

    rooms: int
    players: int  # per room
    rate: float  # moves/s per player; 0: idle connections
    size: int  # bytes per move on the wire, roughly
    warmup: float
    duration: float
    drain: float = 1.0
    slow_per_room: int = 0
    servers: int = 1  # players of a room alternate between servers
    tick: bool = False  # players of a room send on one shared tick (a game loop), not each at its own phase
    tag: str = "r"  # room name prefix, unique per run

    def seats(self) -> list[Seat]:
        return [
            Seat(r * self.players + j, r, j % self.servers, j >= self.players - self.slow_per_room)
            for r in range(self.rooms)
            for j in range(self.players)
        ]


@dataclass(frozen=True)
class Job:
    seats: list[Seat]
    urls: list[str]  # ws://host:port/ws/ per server
    load: Load
    cpus: list[int] | None
    connect_timeout: float


# ---------------------------------------------------------------- worker side


def _worker(job: Job, conn: Connection) -> None:
    if job.cpus:
        os.sched_setaffinity(0, job.cpus)
    try:
        import uvloop

        uvloop.run(_work(job, conn))
    except Exception:  # noqa: BLE001 - the parent reports it with the traceback
        conn.send(("error", traceback.format_exc()))


async def _work(job: Job, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    load, tally = job.load, Tally()
    window = Window(slow_senders=frozenset(s.index for s in load.seats() if s.slow))
    players = [
        Player(s, f"{job.urls[s.server]}{load.tag}{s.room}?player=p{s.index}", window, tally)
        for s in job.seats
    ]
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    failures: list[str] = []

    async def join(p: Player) -> Player | None:
        async with limit:
            try:
                await p.join(job.connect_timeout)
                return p
            except Exception as exc:  # noqa: BLE001 - counted and reported, not fatal
                failures.append(f"{type(exc).__name__}: {exc or 'timed out'}")
                return None

    began = time.time()
    tasks = [asyncio.ensure_future(join(p)) for p in players]
    # One deadline for all: a server that never answers must not hold the run for long.
    deadline = job.connect_timeout + 1
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    if pending:
        failures.append(f"{len(pending)} joins still pending after {deadline:.0f} s")
    joined = [p for t in done if (p := t.result()) is not None]
    ended = time.time()
    watchers = [loop.create_task(p.watch()) for p in joined]
    members: dict[int, list[int]] = {}
    for p in joined:
        members.setdefault(p.seat.room, [0, 0])[1 if p.seat.slow else 0] += 1
    conn.send(
        (
            "ready",
            {
                "joined": len(joined),
                "failures": failures,
                "members": members,
                "began": began,
                "ended": ended,
            },
        )
    )

    start_ns, end_ns, go_ns = await loop.run_in_executor(None, conn.recv)
    window.start, window.end = start_ns, end_ns
    go = loop.time() + (go_ns - time.time_ns()) / 1e9
    senders = []
    if load.rate > 0:
        senders = [loop.create_task(p.play(load.rate, load.size, go, load.tick)) for p in joined]
    finish = loop.time() + (end_ns - time.time_ns()) / 1e9 + load.drain
    while loop.time() < finish:
        await asyncio.sleep(min(0.25, max(0.0, finish - loop.time())))
        conn.send(("progress", sum(c[0] + c[1] for c in tally.sent.values()), tally.received))
    for task in senders + watchers:
        task.cancel()
    await asyncio.gather(*senders, *watchers, return_exceptions=True)
    conn.send(("done", tally))
    await asyncio.gather(*(p.leave() for p in joined), return_exceptions=True)


# ---------------------------------------------------------------- parent side


@dataclass
class Outcome:
    """Everything one load run observed, before it is turned into figures."""

    load: Load
    joined: int
    failures: list[str]
    connect_s: float
    members: dict[int, list[int]]  # room -> [readers, slow readers]
    tally: Tally
    window_s: float
    base: procstats.Sample  # servers before any player joined
    joined_sample: procstats.Sample  # servers with everyone joined
    start: procstats.Sample  # window start
    end: procstats.Sample  # window end
    generator_cpu: list[float]  # per worker, share of one core over the window
    side_cpu_s: float | None = None  # helpers measured apart, e.g. Redis, over the window
    machine_cpu_s: float = 0.0  # busy time of all cores over the window, whoever used it
    server_cpus_busy_s: float | None = None  # busy time of the servers' CPUs, whoever used it
    generator_cpus_busy_s: float | None = None  # the same for the generator's CPUs


def _merge(tallies: list[Tally]) -> Tally:
    total = Tally()
    for t in tallies:
        total.received += t.received
        total.received_from_slow += t.received_from_slow
        total.frames += t.frames
        total.messages += t.messages
        total.dropped += t.dropped
        total.errors += t.errors
        total.error_sample.extend(t.error_sample[: 3 - len(total.error_sample)])
        for code, n in t.closes.items():
            total.closes[code] = total.closes.get(code, 0) + n
        for key, n in t.hist.items():
            total.hist[key] = total.hist.get(key, 0) + n
        for room, counts in t.sent.items():
            mine = total.sent.setdefault(room, [0, 0])
            mine[0] += counts[0]
            mine[1] += counts[1]
    return total


def run(
    load: Load,
    urls: list[str],
    server_pids: list[int],
    *,
    workers: int,
    cpus: list[int] | None,
    label: str,
    side_pids: list[int] | None = None,
    server_cpus: list[int] | None = None,
    connect_timeout: float = 30.0,
) -> Outcome:
    """Offer ``load`` to the servers at ``urls``; ``server_pids`` (and apart from them
    ``side_pids``) are measured."""
    seats = load.seats()
    workers = max(1, min(workers, len(seats)))
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    base = procstats.sample(server_pids, time.monotonic())
    for w in range(workers):
        parent_end, child_end = ctx.Pipe()
        job = Job(seats[w::workers], urls, load, cpus, connect_timeout)
        proc = ctx.Process(target=_worker, args=(job, child_end), daemon=True)
        proc.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(proc)
    progress = Progress(label)
    try:
        return _drive(
            load,
            pipes,
            procs,
            server_pids,
            side_pids or [],
            server_cpus,
            cpus,
            base,
            progress,
            connect_timeout,
        )
    finally:
        progress.close()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _receive(pipe: Connection, want: str) -> object:
    kind, payload = pipe.recv()
    if kind == "error":
        raise RuntimeError(f"load generator worker failed:\n{payload}")
    if kind != want:
        raise RuntimeError(f"worker sent {kind!r}, expected {want!r}")
    return payload


def _drive(
    load: Load,
    pipes: list[Connection],
    procs: list[Any],
    server_pids: list[int],
    side_pids: list[int],
    server_cpus: list[int] | None,
    generator_cpus: list[int] | None,
    base: procstats.Sample,
    progress: Progress,
    connect_timeout: float,
) -> Outcome:
    total_seats = load.rooms * load.players
    progress.update(0, total_seats, "joining")
    ready: dict[int, dict] = {}
    deadline = time.monotonic() + connect_timeout + 30
    while len(ready) < len(pipes):
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not finish joining in time")
        for ready_pipe in wait([p for i, p in enumerate(pipes) if i not in ready], 0.2):
            pipe = cast(Connection, ready_pipe)
            ready[pipes.index(pipe)] = cast(dict, _receive(pipe, "ready"))
        progress.update(sum(r["joined"] for r in ready.values()), total_seats, "joining")
    if not any(r["joined"] for r in ready.values()):
        first = next((f for r in ready.values() for f in r["failures"]), "no reason given")
        raise RuntimeError(f"no player could join: {first}")
    joined_sample = procstats.sample(server_pids, time.monotonic())
    members: dict[int, list[int]] = {}
    for r in ready.values():
        for room, (readers, slow) in r["members"].items():
            m = members.setdefault(room, [0, 0])
            m[0] += readers
            m[1] += slow

    now = time.time_ns()
    go_ns = now + 100_000_000  # time for every worker to receive the start
    start_ns = go_ns + int(load.warmup * 1e9)
    end_ns = start_ns + int(load.duration * 1e9)
    for pipe in pipes:
        pipe.send((start_ns, end_ns, go_ns))

    worker_pids = [p.pid for p in procs if p.pid is not None]
    start = end = None
    gen0: list[float] = []
    gen_cpu: list[float] = []
    sent = received = 0
    progress_by: dict[int, tuple[int, int]] = {}
    tallies: dict[int, Tally] = {}
    total_s = (end_ns - now) / 1e9 + load.drain
    finish_by = time.monotonic() + total_s + 30
    while len(tallies) < len(pipes):
        t = time.time_ns()
        if start is None and t >= start_ns:
            start = procstats.sample(server_pids, time.monotonic())
            side0 = procstats.sample(side_pids, start.wall)
            busy0 = procstats.busy_seconds()
            pinned0 = procstats.busy_seconds(server_cpus) if server_cpus else 0.0
            gen_busy0 = procstats.busy_seconds(generator_cpus) if generator_cpus else 0.0
            gen0 = [procstats.cpu_seconds(p) for p in worker_pids]
        if end is None and t >= end_ns:
            end = procstats.sample(server_pids, time.monotonic())
            side1 = procstats.sample(side_pids, end.wall)
            busy1 = procstats.busy_seconds()
            pinned1 = procstats.busy_seconds(server_cpus) if server_cpus else 0.0
            gen_busy1 = procstats.busy_seconds(generator_cpus) if generator_cpus else 0.0
            assert start is not None
            wall = end.wall - start.wall
            gen_cpu = [(procstats.cpu_seconds(p) - c) / wall for p, c in zip(worker_pids, gen0)]
        nxt = start_ns if start is None else end_ns if end is None else t + 250_000_000
        timeout = max(0.0, min(0.25, (nxt - t) / 1e9))
        for ready_pipe in wait([p for i, p in enumerate(pipes) if i not in tallies], timeout):
            pipe = cast(Connection, ready_pipe)
            i = pipes.index(pipe)
            kind, *payload = cast(tuple[Any, ...], pipe.recv())
            if kind == "progress":
                progress_by[i] = (payload[0], payload[1])
            elif kind == "done":
                tallies[i] = payload[0]
            elif kind == "error":
                raise RuntimeError(f"load generator worker failed:\n{payload[0]}")
        sent = sum(s for s, _ in progress_by.values())
        received = sum(r for _, r in progress_by.values())
        elapsed = (time.time_ns() - now) / 1e9
        phase = "warmup" if start is None else "measure" if end is None else "drain"
        progress.update(min(elapsed, total_s), total_s, f"{phase} sent {sent} recv {received}")
        if time.monotonic() > finish_by:
            raise RuntimeError("workers did not report their results in time")
    assert start is not None and end is not None
    return Outcome(
        load=load,
        joined=sum(r["joined"] for r in ready.values()),
        failures=[f for r in ready.values() for f in r["failures"]],
        connect_s=max(r["ended"] for r in ready.values()) - min(r["began"] for r in ready.values()),
        members=members,
        tally=_merge(list(tallies.values())),
        window_s=end.wall - start.wall,
        base=base,
        joined_sample=joined_sample,
        start=start,
        end=end,
        generator_cpu=gen_cpu,
        side_cpu_s=side1.cpu_since(side0) if side_pids else None,
        machine_cpu_s=busy1 - busy0,
        server_cpus_busy_s=pinned1 - pinned0 if server_cpus else None,
        generator_cpus_busy_s=gen_busy1 - gen_busy0 if generator_cpus else None,
    )
