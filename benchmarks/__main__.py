"""``python -m benchmarks SCENARIO... [options]``: load the relay and its baselines, compare.

Scenarios: rooms, bigroom, idle, slow, cluster, ramp; ``all`` runs every one,
``smoke`` (or ``--smoke``) runs every one tiny, in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import plots, report, servers
from benchmarks.progress import say
from benchmarks.scenarios import PRESETS, RUNNERS, SCENARIOS, SIZE_FIELDS, Options, cpu_list

DEFAULT_OUT = Path("benchmarks/results/latest.json")
SMOKE_OUT = Path("benchmarks/results/smoke.json")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenarios",
        nargs="+",
        metavar="SCENARIO",
        choices=[*SCENARIOS, "all", "smoke"],
        help=" | ".join([*SCENARIOS, "all", "smoke"]),
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="every scenario tiny (about half a second of load each)",
    )
    p.add_argument(
        "--targets",
        default=",".join(servers.TARGETS),
        help="servers to compare, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--server-cpus",
        default="0",
        help="pin the server(s) with taskset -c; 'none' to not pin (default: 0)",
    )
    p.add_argument(
        "--generator-cpus",
        default=None,
        help="CPUs for the load generator (default: every CPU the server is not on)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="load generator processes (default: one per generator CPU; more "
        "processes than CPUs cost more CPU per frame, not less)",
    )
    sizes = p.add_argument_group("sizes (override the scenario's preset)")
    for name in SIZE_FIELDS:
        kind = int if name in ("rooms", "players", "size") else float
        preset = ", ".join(f"{s} {v[name]:g}" for s, v in PRESETS.items())
        sizes.add_argument(f"--{name}", type=kind, default=None, help=f"presets: {preset}")
    p.add_argument("--ramp-steps", type=int, default=8, help="most ramp steps (default: 8)")
    p.add_argument(
        "--ramp-factor",
        type=float,
        default=1.5,
        help="rooms multiply by this each ramp step (default: 1.5)",
    )
    p.add_argument(
        "--ramp-retries",
        type=int,
        default=1,
        help="times a failing ramp step is tried again before the ramp stops (default: 1)",
    )
    p.add_argument("--flush-ms", type=float, default=None, help="passed to relay serve")
    p.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for relay serve (repeatable), e.g. --relay-arg=--burst=500",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results JSON; the tables (.md) and PNG plots go beside it (default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each server N times per scenario and keep the run that other programs "
        "disturbed least (for shared machines; not the ramp; default: 1)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other work on the machine "
        "to drop under 0.25 cores (default: 0, don't wait)",
    )
    p.add_argument(
        "--tick",
        action="store_true",
        help="the players of a room send on one shared tick, as a game loop does "
        "(default: each player at a random phase of its period)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(servers.TARGETS)
    if unknown:
        sys.exit(f"unknown targets: {', '.join(sorted(unknown))}")
    server_cpus = None if args.server_cpus.lower() == "none" else args.server_cpus
    available = sorted(os.sched_getaffinity(0))
    gen: list[int] | None
    if args.generator_cpus:
        gen = cpu_list(args.generator_cpus)
    elif server_cpus:
        gen = [c for c in available if c not in cpu_list(server_cpus)] or None
    else:
        gen = None
    if gen:
        os.sched_setaffinity(0, gen)  # the parent keeps the clock: keep it off the server's CPU
    overrides = {k: getattr(args, k) for k in SIZE_FIELDS if getattr(args, k) is not None}
    return Options(
        targets=targets,
        server_cpus=server_cpus,
        generator_cpus=gen,
        workers=args.workers or len(gen or available),
        flush_ms=args.flush_ms,
        relay_args=args.relay_arg,
        overrides=overrides,
        smoke=args.smoke or "smoke" in args.scenarios,
        ramp_steps=args.ramp_steps,
        ramp_factor=args.ramp_factor,
        ramp_retries=args.ramp_retries,
        repeat=args.repeat,
        wait_quiet=args.wait_quiet,
        tick=args.tick,
    )


def meta(args: argparse.Namespace, opts: Options, began: float) -> dict:
    import msgpack
    import websockets

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
        "seconds": round(time.time() - began, 1),
        "argv": sys.argv[1:],
        "smoke": opts.smoke,
        "targets": opts.targets,
        "server_cpus": opts.server_cpus,
        "generator_cpus": opts.generator_cpus,
        "workers": opts.workers,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "websockets": websockets.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The work tree's commit, "-dirty" when it has changes (figures depend on the relay's code)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=servers.ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    opts = options(args)
    names = [s for s in args.scenarios if s not in ("all", "smoke")]
    if not names or "all" in args.scenarios or "smoke" in args.scenarios:
        names = list(SCENARIOS)
    out = args.out or (SMOKE_OUT if opts.smoke else DEFAULT_OUT)
    began = time.time()
    say(
        f"benchmarks: {', '.join(names)} against {', '.join(opts.targets)}; server on CPU "
        f"{opts.server_cpus or 'any'}, generator ({opts.workers} processes) on CPU "
        f"{','.join(map(str, opts.generator_cpus or [])) or 'any'}"
        + (" [smoke]" if opts.smoke else "")
    )
    runs: list[dict] = []
    for name in dict.fromkeys(names):
        say(f"{name}:")
        runs.extend(RUNNERS[name](opts))
    checks = report.checks(runs)
    if opts.smoke:  # tiny loads say nothing about the targets: no verdicts
        checks = [dict(c, ok=None) for c in checks]
    results = {
        "meta": meta(args, opts, began),
        "runs": runs,
        "ramp": report.ramp_summary(runs),
        "checks": checks,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(report.table(runs))
    print()
    print(report.checks_table(checks))
    if opts.smoke:
        print("(smoke sizes: these figures only show that every part runs, not how fast)")
    markdown = out.with_suffix(".md")
    report.write_markdown(runs, checks, markdown)
    made = [] if args.no_plots else plots.write_all(runs, out)
    say(f"\nresults: {out}, {markdown}" + "".join(f"\nplot: {p}" for p in made))
    if not args.no_plots and not plots.available():
        say("no plots: matplotlib is not installed (pip install -e '.[bench]')")
    broken = [r for r in runs if "error" in r]
    if broken:
        say(f"{len(broken)} run(s) failed: see 'error' above and in {out}")
    return 0 if any("figures" in r for r in runs) and not broken else 1


if __name__ == "__main__":
    sys.exit(main())
