"""The results table, the ratios to the baselines, and the check against our targets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from benchmarks.scenarios import holds

Run = dict[str, Any]

# (label, how to read it from a run's figures, format)
METRICS: list[tuple[str, Callable[[dict], Any], str]] = [
    ("connections", lambda f: f["connections"], "{:.0f}"),
    ("offered moves/s", lambda f: f["offered_moves_per_s"], "{:.0f}"),
    ("sent moves/s", lambda f: f["sent_moves_per_s"], "{:.0f}"),
    ("deliveries/s", lambda f: f["deliveries_per_s"], "{:.0f}"),
    ("delivery ratio", lambda f: f["delivery_ratio"], "{:.4f}"),
    ("latency p50 ms", lambda f: (f["latency_ms"] or {}).get("p50"), "{:.2f}"),
    ("latency p90 ms", lambda f: (f["latency_ms"] or {}).get("p90"), "{:.2f}"),
    ("latency p99 ms", lambda f: (f["latency_ms"] or {}).get("p99"), "{:.2f}"),
    ("latency max ms", lambda f: (f["latency_ms"] or {}).get("max"), "{:.2f}"),
    ("frames/s received", lambda f: f["frames_per_s"], "{:.0f}"),
    ("messages/frame", lambda f: f["msgs_per_frame"], "{:.2f}"),
    ("DROPPED count", lambda f: f["dropped"], "{:.0f}"),
    ("server CPU (cores)", lambda f: f["server_cpu_util"], "{:.2f}"),
    ("CPU us/delivery", lambda f: f["cpu_us_per_delivery"], "{:.2f}"),
    ("server RSS MiB", lambda f: f["server_rss_mib"], "{:.1f}"),
    ("RSS growth in window MiB", lambda f: f["server_rss_growth_mib"], "{:.1f}"),
    ("RSS KiB/connection", lambda f: f["rss_kib_per_conn"], "{:.1f}"),
    ("connects/s", lambda f: f["connects_per_s"], "{:.0f}"),
    ("generator CPU (max proc)", lambda f: max(f["generator_cpu"] or [0]), "{:.2f}"),
    ("other load (cores)", lambda f: f["other_cpu_util"], "{:.2f}"),
]
IDLE_METRICS = {"connections", "connects/s", "server RSS MiB", "RSS KiB/connection",
                "server CPU (cores)", "generator CPU (max proc)", "other load (cores)"}
RAMP_METRICS = {"connections", "offered moves/s", "deliveries/s", "delivery ratio",
                "latency p99 ms", "CPU us/delivery", "server CPU (cores)"}


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (scenario, case), in the order they ran; the ramp is summarised apart."""
    out: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run["scenario"] != "ramp":
            out.setdefault((run["scenario"], run["case"]), []).append(run)
    return out


def ramp_summary(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per target: the last ramp step that held (>= 99 % delivered, p99 <= 50 ms), and why it stopped."""
    out: dict[str, dict[str, Any]] = {}
    for run in (r for r in runs if r["scenario"] == "ramp"):
        entry = out.setdefault(run["target"], {"held": None, "steps": 0, "stopped": "steps done"})
        entry["steps"] += 1
        f = run.get("figures")
        if f is None:
            entry["stopped"] = run.get("error") or run.get("skipped")
        elif holds(f):
            entry["held"] = {"case": run["case"], "rooms": run["params"]["rooms"], **f}
            if f["generator_saturated"]:
                entry["stopped"] = "generator saturated (the server may hold more)"
        else:
            lat = (f["latency_ms"] or {}).get("p99")
            entry["stopped"] = (f"{run['case']} ({run['params']['rooms']} rooms) failed: "
                                f"ratio {f['delivery_ratio']:.4f}, p99 {lat} ms")
    return out


def _table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(columns), line(["-" * w for w in widths]), *map(line, rows)])


def _block(title: str, runs: list[Run], wanted: set[str] | None) -> str:
    subject = runs[0]["target"]  # the relay (or the relay cluster) is run first
    others = [r["target"] for r in runs[1:]]
    columns = ["metric", *(r["target"] for r in runs), *(f"{subject}/{o}" for o in others)]
    rows = []
    notes = [f"  {r['target']}: {r.get('error') or r.get('skipped')}" for r in runs
             if "figures" not in r]
    for label, get, fmt in METRICS:
        if wanted is not None and label not in wanted:
            continue
        values = [get(r["figures"]) if "figures" in r else None for r in runs]
        rows.append([label, *(_fmt(v, fmt) for v in values),
                     *(_ratio(values[0], v) for v in values[1:])])
    saturated = [r["target"] for r in runs if r.get("figures", {}).get("generator_saturated")]
    if saturated:
        notes.append(f"  generator saturated during: {', '.join(saturated)}")
    return _table(title, columns, rows) + ("\n" + "\n".join(notes) if notes else "")


def subject_first(runs: list[Run]) -> list[Run]:
    order = {"relay x2": 0, "relay": 1, "tutorial": 2, "broadcast": 3}
    return sorted(runs, key=lambda r: order.get(r["target"], 9))


def table(runs: list[Run]) -> str:
    blocks = []
    for (scenario, case), group in groups(runs).items():
        title = f"== {scenario}" + (f" ({case})" if case else "")
        wanted = IDLE_METRICS if scenario == "idle" else None
        blocks.append(_block(title, subject_first(group), wanted))
    ramp = ramp_summary(runs)
    if ramp:
        held = [{"target": t, "case": (e["held"] or {}).get("case", "none held"),
                 "figures": e["held"]} if e["held"] else {"target": t, "error": "no step held"}
                for t, e in ramp.items()]
        title = "== ramp (last step with >= 99% delivered and p99 <= 50 ms)"
        block = _block(title, subject_first(held), RAMP_METRICS)
        stops = "\n".join(f"  {t}: held {(e['held'] or {}).get('rooms', 0)} rooms; "
                          f"stopped: {e['stopped']}" for t, e in ramp.items())
        blocks.append(block + "\n" + stops)
    return "\n\n".join(blocks)


# ---------------------------------------------------------------- targets


def _find(runs: Iterable[Run], scenario: str, target: str, case: str = "") -> dict | None:
    for r in runs:
        if (r["scenario"], r["target"], r["case"]) == (scenario, target, case) and "figures" in r:
            return r["figures"]
    return None


def _check(name: str, goal: str, measured: str | None, ok: bool | None) -> dict[str, Any]:
    return {"scenario": name, "target": goal, "measured": measured or "not measured", "ok": ok}


def _cpu(f: dict | None) -> float | None:
    return f and f["cpu_us_per_delivery"]


def _p99(f: dict | None) -> float | None:
    return f and (f["latency_ms"] or {}).get("p99")


def checks(runs: list[Run]) -> list[dict[str, Any]]:
    """The relay's figures against the targets of issue 5 (None: could not be measured)."""
    out = []
    for scen, limit, p99_limit in (("rooms", 0.5, 5.0), ("bigroom", 0.2, 20.0)):
        relay, tut = _find(runs, scen, "relay"), _find(runs, scen, "tutorial")
        r_cpu, t_cpu = _cpu(relay), _cpu(tut)
        ok = None if r_cpu is None or t_cpu is None else r_cpu <= limit * t_cpu
        out.append(_check(scen, f"CPU/delivery <= {limit}x tutorial",
                          r_cpu and t_cpu and f"{r_cpu:.2f} vs {t_cpu:.2f} us = "
                          f"{r_cpu / t_cpu:.2f}x", ok))
        p99 = _p99(relay)
        out.append(_check(scen, f"p99 < {p99_limit:g} ms", p99 and f"{p99:.2f} ms",
                          None if p99 is None else p99 < p99_limit))
    fast, slow = (_find(runs, "slow", "relay", c) for c in ("no slow readers",
                                                             "1 slow reader per room"))
    if slow:
        ratio = slow["delivery_ratio"]
        out.append(_check("slow", "100% of moves reach fast players",
                          f"{ratio:.4%}" if ratio is not None else None,
                          None if ratio is None else ratio >= 1.0))
        bound = 16 + slow["connections"] / 10  # MiB: noise + ~1 MiB per slow reader
        out.append(_check("slow", f"memory growth bounded (<= {bound:.0f} MiB in the window)",
                          f"{slow['server_rss_growth_mib']:.1f} MiB",
                          slow["server_rss_growth_mib"] <= bound))
    if slow and fast:
        a, b = _p99(slow), _p99(fast)
        out.append(_check("slow", "p99 within 1.5x of the run without slow readers",
                          a and b and f"{a:.2f} vs {b:.2f} ms = {a / b:.2f}x",
                          None if not (a and b) else a <= 1.5 * b))
    idle = _find(runs, "idle", "relay")
    kib = idle and idle["rss_kib_per_conn"]
    out.append(_check("idle", "<= 20 KiB per idle connection", kib and f"{kib:.1f} KiB",
                      None if kib is None else kib <= 20))
    ramp = ramp_summary(runs)
    r_held = (ramp.get("relay") or {}).get("held")
    t_held = (ramp.get("tutorial") or {}).get("held")
    if r_held and t_held:
        r, t = r_held["deliveries_per_s"], t_held["deliveries_per_s"]
        out.append(_check("ramp", ">= 3x tutorial's sustained deliveries/s",
                          f"{r:.0f} vs {t:.0f}/s = {r / t:.2f}x", r >= 3 * t))
    else:
        out.append(_check("ramp", ">= 3x tutorial's sustained deliveries/s", None, None))
    single, multi = _find(runs, "cluster", "relay"), _find(runs, "cluster", "relay x2")
    skipped = next((r.get("skipped") for r in runs if r["scenario"] == "cluster"
                    and r.get("skipped")), None)
    a, b = _cpu(multi), _cpu(single)
    out.append(_check("cluster", "CPU/delivery <= 1.5x single process",
                      (a and b and f"{a:.2f} vs {b:.2f} us = {a / b:.2f}x")
                      or (skipped and f"skipped: {skipped}"),
                      None if not (a and b) else a <= 1.5 * b))
    return out


def checks_table(items: list[dict[str, Any]]) -> str:
    mark = {True: "met", False: "MISSED", None: "n/a"}
    rows = [[c["scenario"], c["target"], c["measured"], mark[c["ok"]]] for c in items]
    return _table("== targets (relay)", ["scenario", "target", "measured", "result"], rows)
