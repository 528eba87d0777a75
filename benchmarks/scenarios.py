"""The scenarios: presets of a load, which servers to offer it to, and in which cases.

Each scenario returns a list of runs, one per (case, target): a dict with
``scenario``, ``case``, ``target``, ``params`` and either ``figures`` or
``skipped`` / ``error`` with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks import loadgen, procstats, servers
from benchmarks.figures import figures
from benchmarks.loadgen import Load
from benchmarks.progress import say

SCENARIOS = ("rooms", "bigroom", "idle", "slow", "cluster", "ramp")
SIZE_FIELDS = ("rooms", "players", "rate", "size", "duration", "warmup", "drain")

# Presets; every column can be changed with the CLI flag of the same name (--rooms ...).
# fmt: off
_PRESETS = {  # rooms, players per room, moves/s per player, bytes per move, duration s,
              # warmup s, drain s
    "rooms":   (50,   8, 10,   64, 10, 2, 1),
    "bigroom": (1,  200,  2,   64, 10, 2, 1),
    "idle":    (250,  8,  0,    0,  3, 1, 0),
    "slow":    (10,  10, 30, 2048, 10, 2, 1),
    "cluster": (50,   8, 10,   64, 10, 2, 1),
    "ramp":    (20,   8, 10,   64,  4, 1, 1),  # the first step; rooms grow each step
}
_SMOKE = {  # every scenario tiny, about half a second of load each
    "rooms":   (4,    4, 10,   64, 0.5, 0.1, 0.2),
    "bigroom": (1,   20,  5,   64, 0.5, 0.1, 0.2),
    "idle":    (10,   5,  0,    0, 0.2, 0.0, 0.0),
    "slow":    (2,    4, 20, 2048, 0.5, 0.1, 0.2),
    "cluster": (4,    4, 10,   64, 0.5, 0.1, 0.2),
    "ramp":    (2,    4, 10,   64, 0.5, 0.1, 0.2),
}
# fmt: on
PRESETS = {name: dict(zip(SIZE_FIELDS, row, strict=True)) for name, row in _PRESETS.items()}
SMOKE = {name: dict(zip(SIZE_FIELDS, row, strict=True)) for name, row in _SMOKE.items()}
RAMP_HOLDS = {"min_ratio": 0.99, "max_p99_ms": 50.0}


@dataclass
class Options:
    """How to run: which servers, where to pin them, and size overrides."""

    targets: list[str] = field(default_factory=lambda: list(servers.TARGETS))
    server_cpus: str | None = "0"
    generator_cpus: list[int] | None = None
    workers: int = 1
    flush_ms: float | None = None
    relay_args: list[str] = field(default_factory=list)
    overrides: dict[str, float] = field(default_factory=dict)
    smoke: bool = False
    ramp_steps: int = 8
    ramp_factor: float = 1.5
    ramp_retries: int = 1
    connect_timeout: float = 30.0  # per join (a smoke run waits 3 s)
    repeat: int = 1  # runs per (scenario, case, target); the one with the least other load is kept
    wait_quiet: float = 0.0  # seconds to wait, before each run, for other work to stop
    tick: bool = False  # players of a room send on one shared tick

    def load(self, scenario: str, **extra: Any) -> Load:
        values = dict((SMOKE if self.smoke else PRESETS)[scenario])
        values.update(self.overrides)
        return Load(
            rooms=int(values["rooms"]),
            players=int(values["players"]),
            rate=values["rate"],
            size=int(values["size"]),
            duration=values["duration"],
            warmup=values["warmup"],
            drain=values["drain"],
            tick=self.tick,
            **extra,
        )


def cpu_list(text: str) -> list[int]:
    """``"0"``, ``"1-3"``, ``"0,2"`` -> CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _label(scenario: str, case: str, target: str) -> str:
    return " ".join(x for x in (scenario, case, target) if x)


def _offer(
    opts: Options,
    load: Load,
    nodes: list[servers.Server],
    label: str,
    side: list[servers.Server] | None = None,
) -> dict[str, Any]:
    urls = [f"ws://127.0.0.1:{s.port}/ws/" for s in nodes]
    if opts.wait_quiet > 0:
        busy = procstats.wait_quiet(opts.wait_quiet)
        if busy >= 0.25:
            say(f"  (machine still busy with {busy:.2f} cores of other work)")
    server_cpus = cpu_list(opts.server_cpus) if opts.server_cpus else None
    outcome = loadgen.run(
        load,
        urls,
        [s.pid for s in nodes],
        workers=opts.workers,
        cpus=opts.generator_cpus,
        label=label,
        side_pids=[s.pid for s in side or []],
        server_cpus=server_cpus,
        connect_timeout=3.0 if opts.smoke else opts.connect_timeout,
    )
    cores = len(opts.generator_cpus) if opts.generator_cpus else 1
    return figures(outcome, cores)


def _record(scenario: str, case: str, target: str, load: Load, **result: Any) -> dict[str, Any]:
    run = {
        "scenario": scenario,
        "case": case,
        "target": target,
        "params": dataclasses.asdict(load),
        **result,
    }
    if "figures" in run:
        f = run["figures"]
        lat = f["latency_ms"] or {}
        ratio = f["delivery_ratio"]
        say(
            f"  {_label(scenario, case, target)}: {f['deliveries_per_s']:.0f} deliveries/s, "
            f"ratio {ratio if ratio is None else round(ratio, 4)}, p99 {lat.get('p99')} ms, "
            f"{f['cpu_us_per_delivery'] or 0:.1f} us CPU/delivery"
            + (" [generator saturated]" if f["generator_saturated"] else "")
            + (
                f" [other load {f['other_cpu_util']:.2f} cores]"
                if f["other_cpu_util"] > 0.25
                else ""
            )
            + (
                f" [{f['connect_failures']} players could not join: {f['failure_sample'][0]}]"
                if f["connect_failures"]
                else ""
            )
            + (f" [{f['errors']} ERRORs, e.g. {f['error_sample'][0]}]" if f["errors"] else "")
        )
    else:
        say(f"  {_label(scenario, case, target)}: {result.get('skipped') or result.get('error')}")
    return run


def _start(opts: Options, target: str) -> servers.Server:
    relay = target == "relay"
    return servers.start_target(
        target,
        cpus=opts.server_cpus,
        flush_ms=opts.flush_ms if relay else None,
        relay_args=opts.relay_args if relay else None,
    )


def _measure(
    opts: Options,
    scenario: str,
    case: str,
    target: str,
    load: Load,
    nodes: list[servers.Server],
    side: list[servers.Server] | None = None,
) -> dict[str, Any]:
    try:
        result = _offer(opts, load, nodes, _label(scenario, case, target), side)
    except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
        run = _record(scenario, case, target, load, error=f"{type(exc).__name__}: {exc}")
    else:
        run = _record(scenario, case, target, load, figures=result)
    f = run.get("figures")
    if f is None or f["connect_failures"] or f["errors"]:
        # Something went wrong: keep what the servers said about it.
        run["server_logs"] = {f"{s.name}:{s.port}": s.output(1500) for s in nodes + (side or [])}
    return run


def _single(opts: Options, scenario: str, case: str, target: str, load: Load) -> dict[str, Any]:
    """Start one server, offer the load, stop it; ``repeat`` times, keeping the cleanest run."""
    runs = []
    for _ in range(max(1, opts.repeat)):
        try:
            server = _start(opts, target)
        except servers.ServerFailed as exc:
            return _record(scenario, case, target, load, error=str(exc))
        try:
            runs.append(_measure(opts, scenario, case, target, load, [server]))
        finally:
            server.stop()
    best = min(runs, key=_noise)
    best["repeats"] = len(runs)
    return best


def _noise(run: dict[str, Any]) -> float:
    """How much other work disturbed a run: CPU others used, on the server's CPU above all."""
    f = run.get("figures")
    if f is None:
        return float("inf")
    return f["other_cpu_util"] + 2 * (f["other_on_server_cpus"] or 0)


def each_target(scenario: str, case: str = "", **extra: Any) -> Callable[[Options], list]:
    def run(opts: Options) -> list[dict[str, Any]]:
        load = opts.load(scenario, tag=f"{scenario}-", **extra)
        return [_single(opts, scenario, case, t, load) for t in opts.targets]

    return run


def slow(opts: Options) -> list[dict[str, Any]]:
    runs = each_target("slow", "no slow readers")(opts)
    return runs + each_target("slow", "1 slow reader per room", slow_per_room=1)(opts)


def cluster(opts: Options) -> list[dict[str, Any]]:
    """The rooms load over two relay nodes sharing a Redis, against one node."""
    load = opts.load("cluster", tag="cluster-", servers=2)
    if "relay" not in opts.targets:
        return [_record("cluster", "", "relay x2", load, skipped="relay is not among the targets")]
    started: list[servers.Server] = []
    try:
        redis = servers.start_redis(cpus=opts.server_cpus)
        started.append(redis)
        url = f"redis://127.0.0.1:{redis.port}/0"
        for _ in range(2):
            started.append(
                servers.start_target(
                    "relay",
                    cpus=opts.server_cpus,
                    redis_url=url,
                    flush_ms=opts.flush_ms,
                    relay_args=opts.relay_args,
                )
            )
    except servers.ServerFailed as exc:
        for s in started:
            s.stop()
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        return [_record("cluster", "", "relay x2", load, skipped=reason)]
    try:
        # Redis is measured apart: its CPU is shown beside the relays' (side_cpu_util).
        run = _measure(opts, "cluster", "", "relay x2", load, started[1:], side=started[:1])
    finally:
        for s in started:
            s.stop()
    single = _single(opts, "cluster", "", "relay", dataclasses.replace(load, servers=1))
    return [run, single]


def ramp(opts: Options) -> list[dict[str, Any]]:
    """Grow the rooms load by ``ramp_factor`` per step until it no longer holds.

    One server per target takes every step, as a live server would see its load grow;
    each step has rooms of its own, and figures are taken over each step's window.
    """
    runs = []
    steps = 2 if opts.smoke else opts.ramp_steps
    base = opts.load("ramp")
    for target in opts.targets:
        try:
            server = _start(opts, target)
        except servers.ServerFailed as exc:
            runs.append(_record("ramp", "step 1", target, base, error=str(exc)))
            continue
        try:
            for step in range(steps):
                rooms = max(1, round(base.rooms * opts.ramp_factor**step))
                load = dataclasses.replace(base, rooms=rooms, tag=f"ramp{step}-")
                run = _ramp_step(opts, f"step {step + 1}", target, load, server)
                runs.append(run)
                f = run.get("figures")
                if f is None or not holds(f) or f["generator_saturated"]:
                    break
        finally:
            server.stop()
    return runs


def _ramp_step(
    opts: Options, case: str, target: str, load: Load, server: servers.Server
) -> dict[str, Any]:
    """One step; a step that fails is tried again (``ramp_retries``) before the ramp stops,
    so that one burst of other work on a shared machine does not end it."""
    for attempt in range(1 + opts.ramp_retries):
        run = _measure(opts, "ramp", case, target, load, [server])
        run["attempts"] = attempt + 1
        f = run.get("figures")
        if f is None or holds(f) or f["generator_saturated"]:
            break
    return run


def holds(f: dict[str, Any]) -> bool:
    lat = f["latency_ms"]
    return (
        (f["delivery_ratio"] or 0) >= RAMP_HOLDS["min_ratio"]
        and lat is not None
        and (lat["p99"] <= RAMP_HOLDS["max_p99_ms"])
    )


RUNNERS: dict[str, Callable[[Options], list[dict[str, Any]]]] = {
    "rooms": each_target("rooms"),
    "bigroom": each_target("bigroom"),
    "idle": each_target("idle"),
    "slow": slow,
    "cluster": cluster,
    "ramp": ramp,
}
