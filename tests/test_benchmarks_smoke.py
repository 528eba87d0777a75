"""The benchmarks run end to end in smoke mode (tiny loads); speed is never asserted here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.figures import percentiles
from benchmarks.player import bucket

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"rooms", "bigroom", "idle", "slow", "cluster", "ramp"}
FIGURES = {
    "offered_moves_per_s", "deliveries_per_s", "delivery_ratio", "latency_ms", "frames_per_s",
    "msgs_per_frame", "dropped", "server_cpu_s", "cpu_us_per_delivery", "server_rss_mib",
    "rss_kib_per_conn", "connections", "generator_cpu", "generator_saturated",
}


def test_latency_buckets_keep_seven_significant_bits() -> None:
    assert bucket(100) == 100
    assert bucket(1000) == 1000 - 1000 % 8
    assert all(0 <= us - bucket(us) < us / 64 for us in range(128, 100_000, 37))


def test_percentiles_of_a_histogram() -> None:
    hist = {1000: 50, 2000: 40, 10_000: 9, 50_000: 1}  # microseconds -> count
    assert percentiles(hist) == [1.0, 2.0, 10.0]


def test_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "smoke", "--workers", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert {"meta", "runs", "ramp", "checks"} <= results.keys()
    runs = results["runs"]
    assert {r["scenario"] for r in runs} == SCENARIOS

    for run in runs:
        if run["scenario"] == "cluster" and "skipped" in run:
            continue  # e.g. the relay has no Redis backplane yet: it said so, and why
        assert "figures" in run, run
        assert FIGURES <= run["figures"].keys()

    relay = [r for r in runs if r["target"] in ("relay", "relay x2") and "figures" in r]
    moving = [r for r in relay if r["scenario"] != "idle"]
    assert {r["scenario"] for r in moving} >= {"rooms", "bigroom", "slow", "ramp"}
    for run in moving:
        assert run["figures"]["received_deliveries"] > 0, run
    idle = next(r for r in relay if r["scenario"] == "idle")
    assert idle["figures"]["connections"] > 0

    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("latency", "cpu", "ramp"):
            assert (tmp_path / f"smoke-{name}.png").stat().st_size > 0
