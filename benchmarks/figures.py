"""Turning what a load run observed into the figures we report (plain dicts, JSON-ready)."""

from __future__ import annotations

from typing import Any

from benchmarks.loadgen import Outcome

MIB = 1024 * 1024
SATURATED = 0.9  # share of a core above which a generator process is the bottleneck


def percentiles(hist: dict[int, int], points: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[float]:
    """Percentiles of a latency histogram (microsecond keys), in ms."""
    total = sum(hist.values())
    keys = sorted(hist)
    out, cum, i = [], 0, 0
    for p in points:
        want = p * total
        while cum < want and i < len(keys):
            cum += hist[keys[i]]
            i += 1
        out.append(keys[max(0, i - 1)] / 1000)
    return out


def expected(outcome: Outcome) -> tuple[int, int]:
    """Deliveries owed to reading players: every move x (reading room members but the sender).

    Returned apart for moves that reading players sent and moves that slow readers
    sent: a server may rightly close a slow reader (4008), which cannot tell, being
    slow, and goes on sending into a closed connection.
    """
    from_readers = from_slow = 0
    for room, (by_readers, by_slow) in outcome.tally.sent.items():
        readers, _slow = outcome.members.get(room, [0, 0])
        from_readers += by_readers * max(0, readers - 1)
        from_slow += by_slow * readers
    return from_readers, from_slow


def figures(outcome: Outcome, generator_cores: int) -> dict[str, Any]:
    load, tally = outcome.load, outcome.tally
    dur = load.duration
    wall = max(outcome.window_s, 1e-9)
    sent = sum(a + b for a, b in tally.sent.values())
    owed_readers, owed_slow = expected(outcome)
    owed = owed_readers + owed_slow
    from_readers = tally.received - tally.received_from_slow
    cpu_s = outcome.end.cpu_since(outcome.start)
    cpu_rate = cpu_s / wall
    deliveries_per_s = tally.received / dur
    gen = outcome.generator_cpu
    latency = None
    if tally.hist:
        p50, p90, p99 = percentiles(tally.hist)
        latency = {"p50": p50, "p90": p90, "p99": p99, "max": max(tally.hist) / 1000}
    conns = max(outcome.joined, 1)
    gen_busy = (
        None if outcome.generator_cpus_busy_s is None else outcome.generator_cpus_busy_s / wall
    )
    ours = cpu_s + (outcome.side_cpu_s or 0) + sum(gen) * wall
    return {
        "connections": outcome.joined,
        "connect_failures": len(outcome.failures),
        "failure_sample": outcome.failures[:3],
        "connect_s": round(outcome.connect_s, 3),
        "connects_per_s": outcome.joined / outcome.connect_s if outcome.connect_s > 0 else None,
        "offered_moves_per_s": outcome.joined * load.rate,
        "sent_moves_per_s": sent / dur,
        "expected_deliveries": owed,
        "received_deliveries": tally.received,
        # Moves of reading players that reached the other reading players: with no slow
        # readers, received / (moves x (room members - 1)).
        "delivery_ratio": from_readers / owed_readers if owed_readers else None,
        "slow_senders_delivery_ratio": (
            tally.received_from_slow / owed_slow if owed_slow else None
        ),
        "deliveries_per_s": deliveries_per_s,
        "latency_ms": latency,
        "frames_per_s": tally.frames / wall,
        "msgs_per_frame": tally.messages / tally.frames if tally.frames else None,
        "dropped": tally.dropped,
        "errors": tally.errors,
        "error_sample": tally.error_sample,
        "closes": {str(k): v for k, v in sorted(tally.closes.items())},
        "server_cpu_s": cpu_s,
        "server_cpu_util": cpu_rate,
        "cpu_us_per_delivery": cpu_rate / deliveries_per_s * 1e6 if deliveries_per_s else None,
        "side_cpu_util": (outcome.side_cpu_s / wall if outcome.side_cpu_s is not None else None),
        "server_rss_mib": outcome.end.rss / MIB,
        "server_rss_base_mib": outcome.base.rss / MIB,
        "server_rss_growth_mib": (outcome.end.rss - outcome.start.rss) / MIB,
        "rss_kib_per_conn": (outcome.end.rss - outcome.base.rss) / conns / 1024,
        "generator_cpu": [round(g, 3) for g in gen],
        # Cores busy with anything else during the window (other jobs on the machine).
        "other_cpu_util": max(0.0, (outcome.machine_cpu_s - ours) / wall),
        # ... and on the servers' own CPUs: the time the servers could not have.
        "other_on_server_cpus": None
        if outcome.server_cpus_busy_s is None
        else max(0.0, (outcome.server_cpus_busy_s - cpu_s - (outcome.side_cpu_s or 0)) / wall),
        # Busy time of the generator's CPUs, whoever used it: above SATURATED, moves
        # wait for the generator and latency is the generator's as much as the server's.
        "generator_cpus_busy": gen_busy,
        "generator_saturated": bool(gen)
        and (
            max(gen) > SATURATED
            or sum(gen) > SATURATED * max(generator_cores, 1)
            or (gen_busy or 0) > SATURATED * max(generator_cores, 1)
        ),
    }
