"""The benchmarks run end to end in smoke mode (tiny loads); speed is never asserted here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.figures import percentiles
from benchmarks.player import bucket

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"rooms", "bigroom", "idle", "slow", "cluster", "ramp"}
FIGURES = {
    "offered_moves_per_s",
    "deliveries_per_s",
    "delivery_ratio",
    "latency_ms",
    "frames_per_s",
    "msgs_per_frame",
    "dropped",
    "server_cpu_s",
    "cpu_us_per_delivery",
    "server_rss_mib",
    "rss_kib_per_conn",
    "connections",
    "generator_cpu",
    "generator_saturated",
}


def test_latency_buckets_keep_seven_significant_bits() -> None:
    assert bucket(100) == 100
    assert bucket(1000) == 1000 - 1000 % 8
    assert all(0 <= us - bucket(us) < us / 64 for us in range(128, 100_000, 37))


def test_percentiles_of_a_histogram() -> None:
    hist = {1000: 50, 2000: 40, 10_000: 9, 50_000: 1}  # microseconds -> count
    assert percentiles(hist) == [1.0, 2.0, 10.0]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One smoke run of every scenario against every server (two generator processes)."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "smoke", "--workers", "2", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), out


def _relay_runs(results: dict[str, Any], target: str = "relay") -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["target"] == target]


def test_smoke_reports_every_scenario_and_figure(smoke: tuple[dict[str, Any], Path]) -> None:
    results, out = smoke
    assert {"meta", "runs", "ramp", "checks"} <= results.keys()
    assert {r["scenario"] for r in results["runs"]} == SCENARIOS
    assert {r["target"] for r in results["runs"]} >= {"relay", "tutorial", "broadcast"}
    for run in results["runs"]:
        if run["scenario"] == "cluster":
            continue  # checked below
        assert "figures" in run, run
        assert FIGURES <= run["figures"].keys()
    assert out.with_suffix(".md").read_text().count("####") >= 6
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("latency", "cpu", "ramp"):
            assert (out.parent / f"smoke-{name}.png").stat().st_size > 0


def test_relay_delivers_in_every_scenario(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    runs = _relay_runs(results)
    moving = [r for r in runs if r["scenario"] in ("rooms", "bigroom", "slow", "ramp")]
    assert {r["scenario"] for r in moving} == {"rooms", "bigroom", "slow", "ramp"}
    for run in moving:
        assert run["figures"]["received_deliveries"] > 0, run
    idle = next(r for r in runs if r["scenario"] == "idle")
    assert idle["figures"]["connections"] > 0


def test_relay_cluster_delivers(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    cluster = [r for r in results["runs"] if r["scenario"] == "cluster"]
    skipped = [r["skipped"] for r in cluster if "skipped" in r]
    if skipped:
        pytest.skip(f"cluster scenario skipped: {skipped[0]}")
    run = next(r for r in cluster if r["target"] == "relay x2")
    assert "figures" in run, run.get("error")
    figures = run["figures"]
    assert figures["received_deliveries"] > 0, (figures["failure_sample"], figures["error_sample"])


def test_players_of_a_room_can_send_on_one_tick(tmp_path: Path) -> None:
    out = tmp_path / "tick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "rooms", "--tick", "--targets", "relay", "--rooms", "3",
         "--players", "4", "--warmup", "0.5", "--duration", "1", "--drain", "0.5", "--no-plots",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert "--tick" in results["meta"]["argv"]
    [run] = results["runs"]
    assert run["figures"]["delivery_ratio"] == 1.0 and run["figures"]["deliveries_per_s"] > 0
