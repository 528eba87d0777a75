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

from benchmarks import loadgen, servers
from benchmarks.figures import figures
from benchmarks.loadgen import Load
from benchmarks.progress import say

SCENARIOS = ("rooms", "bigroom", "idle", "slow", "cluster", "ramp")
SIZE_FIELDS = ("rooms", "players", "rate", "size", "duration", "warmup", "drain")

# Full presets; every field can be changed with the CLI flag of the same name.
PRESETS: dict[str, dict[str, float]] = {
    "rooms": dict(rooms=50, players=8, rate=10, size=64, duration=10, warmup=2, drain=1),
    "bigroom": dict(rooms=1, players=200, rate=2, size=64, duration=10, warmup=2, drain=1),
    "idle": dict(rooms=250, players=8, rate=0, size=0, duration=3, warmup=1, drain=0),
    "slow": dict(rooms=10, players=10, rate=30, size=2048, duration=10, warmup=2, drain=1),
    "cluster": dict(rooms=50, players=8, rate=10, size=64, duration=10, warmup=2, drain=1),
    "ramp": dict(rooms=20, players=8, rate=10, size=64, duration=4, warmup=1, drain=1),
}
# Smoke: every scenario tiny, about a second of load each.
SMOKE: dict[str, dict[str, float]] = {
    "rooms": dict(rooms=4, players=4, rate=10, size=64, duration=0.8, warmup=0.2, drain=0.3),
    "bigroom": dict(rooms=1, players=20, rate=5, size=64, duration=0.8, warmup=0.2, drain=0.3),
    "idle": dict(rooms=10, players=5, rate=0, size=0, duration=0.3, warmup=0, drain=0),
    "slow": dict(rooms=2, players=4, rate=20, size=2048, duration=0.8, warmup=0.2, drain=0.3),
    "cluster": dict(rooms=4, players=4, rate=10, size=64, duration=0.8, warmup=0.2, drain=0.3),
    "ramp": dict(rooms=2, players=4, rate=10, size=64, duration=0.6, warmup=0.2, drain=0.3),
}
RAMP_HOLDS = dict(min_ratio=0.99, max_p99_ms=50.0)


@dataclass
class Options:
    """How to run: which servers, where to pin them, and size overrides."""

    targets: list[str] = field(default_factory=lambda: list(servers.TARGETS))
    server_cpus: str | None = "0"
    generator_cpus: list[int] | None = None
    workers: int = 2
    flush_ms: float | None = None
    relay_args: list[str] = field(default_factory=list)
    overrides: dict[str, float] = field(default_factory=dict)
    smoke: bool = False
    ramp_steps: int = 8
    ramp_factor: float = 1.5

    def load(self, scenario: str, **extra: Any) -> Load:
        values = dict((SMOKE if self.smoke else PRESETS)[scenario])
        values.update(self.overrides)
        return Load(
            rooms=int(values["rooms"]), players=int(values["players"]), rate=values["rate"],
            size=int(values["size"]), duration=values["duration"], warmup=values["warmup"],
            drain=values["drain"], **extra,
        )


def _label(scenario: str, case: str, target: str) -> str:
    return " ".join(x for x in (scenario, case, target) if x)


def _offer(opts: Options, load: Load, nodes: list[servers.Server], label: str,
           side: list[servers.Server] | None = None) -> dict[str, Any]:
    urls = [f"ws://127.0.0.1:{s.port}/ws/" for s in nodes]
    outcome = loadgen.run(load, urls, [s.pid for s in nodes], workers=opts.workers,
                          cpus=opts.generator_cpus, label=label,
                          side_pids=[s.pid for s in side or []])
    cores = len(opts.generator_cpus) if opts.generator_cpus else 1
    return figures(outcome, cores)


def _record(scenario: str, case: str, target: str, load: Load, **result: Any) -> dict[str, Any]:
    run = {"scenario": scenario, "case": case, "target": target,
           "params": dataclasses.asdict(load), **result}
    if "figures" in run:
        f = run["figures"]
        lat = f["latency_ms"] or {}
        ratio = f["delivery_ratio"]
        say(f"  {_label(scenario, case, target)}: {f['deliveries_per_s']:.0f} deliveries/s, "
            f"ratio {ratio if ratio is None else round(ratio, 4)}, p99 {lat.get('p99')} ms, "
            f"{f['cpu_us_per_delivery'] or 0:.1f} us CPU/delivery"
            + (" [generator saturated]" if f["generator_saturated"] else ""))
    else:
        say(f"  {_label(scenario, case, target)}: {result.get('skipped') or result.get('error')}")
    return run


def _single(opts: Options, scenario: str, case: str, target: str, load: Load) -> dict[str, Any]:
    """Start one server, offer the load, stop it."""
    try:
        server = servers.start_target(target, cpus=opts.server_cpus, flush_ms=(
            opts.flush_ms if target == "relay" else None), relay_args=(
            opts.relay_args if target == "relay" else None))
    except servers.ServerFailed as exc:
        return _record(scenario, case, target, load, error=str(exc))
    try:
        result = _offer(opts, load, [server], _label(scenario, case, target))
    except Exception as exc:  # one broken run must not lose the others
        return _record(scenario, case, target, load, error=f"{type(exc).__name__}: {exc}")
    finally:
        server.stop()
    return _record(scenario, case, target, load, figures=result)


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
            started.append(servers.start_target(
                "relay", cpus=opts.server_cpus, redis_url=url, flush_ms=opts.flush_ms,
                relay_args=opts.relay_args))
    except servers.ServerFailed as exc:
        for s in started:
            s.stop()
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        return [_record("cluster", "", "relay x2", load, skipped=reason)]
    try:
        # Redis is measured apart: its CPU is shown beside the relays' (side_cpu_util).
        result = _offer(opts, load, started[1:], "cluster relay x2", side=started[:1])
        run = _record("cluster", "", "relay x2", load, figures=result)
    except Exception as exc:
        run = _record("cluster", "", "relay x2", load, error=f"{type(exc).__name__}: {exc}")
    finally:
        for s in started:
            s.stop()
    single = _single(opts, "cluster", "", "relay", dataclasses.replace(load, servers=1))
    return [run, single]


def ramp(opts: Options) -> list[dict[str, Any]]:
    """Grow the rooms load by ``ramp_factor`` per step until it no longer holds."""
    runs = []
    steps = 2 if opts.smoke else opts.ramp_steps
    for target in opts.targets:
        base = opts.load("ramp")
        for step in range(steps):
            rooms = max(1, round(base.rooms * opts.ramp_factor**step))
            load = dataclasses.replace(base, rooms=rooms, tag=f"ramp{step}-")
            run = _single(opts, "ramp", f"step {step + 1}", target, load)
            runs.append(run)
            f = run.get("figures")
            if f is None or not holds(f) or f["generator_saturated"]:
                break
    return runs


def holds(f: dict[str, Any]) -> bool:
    lat = f["latency_ms"]
    return (f["delivery_ratio"] or 0) >= RAMP_HOLDS["min_ratio"] and lat is not None and (
        lat["p99"] <= RAMP_HOLDS["max_p99_ms"])


RUNNERS: dict[str, Callable[[Options], list[dict[str, Any]]]] = {
    "rooms": each_target("rooms"),
    "bigroom": each_target("bigroom"),
    "idle": each_target("idle"),
    "slow": slow,
    "cluster": cluster,
    "ramp": ramp,
}
