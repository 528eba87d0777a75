"""PNG plots of a results file: latency percentiles, CPU per delivery, the ramp.

matplotlib is only needed here (the ``bench`` extra); without it no plot is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import groups, subject_first

COLORS = {"relay": "#1f77b4", "relay x2": "#17becf", "tutorial": "#d62728", "broadcast": "#ff7f0e"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(axis: Any) -> None:
    """Log scale, labelled 0.5, 1, 20 rather than 5x10^-1."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # Label only the 2s and 5s between decades: all of them crowd the axis.
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))


def latency(runs: list[dict], path: Path) -> None:
    """One panel per scenario (and case): p50, p90, p99 per server, log scale."""
    plt = _pyplot()
    blocks = [(k, subject_first(v)) for k, v in groups(runs).items() if k[0] != "idle"]
    blocks = [(k, [r for r in v if (r.get("figures") or {}).get("latency_ms")]) for k, v in blocks]
    blocks = [(k, v) for k, v in blocks if v]
    if not blocks:
        return
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.2 * len(blocks) + 1, 3.8), squeeze=False)
    for ax, ((scenario, case), rs) in zip(axes[0], blocks):
        width = 0.8 / len(rs)
        for i, r in enumerate(rs):
            lat = r["figures"]["latency_ms"]
            xs = [j + i * width for j in range(3)]
            ax.bar(
                xs,
                [max(lat[p], 1e-3) for p in ("p50", "p90", "p99")],
                width,
                label=r["target"],
                color=COLORS.get(r["target"]),
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], ["p50", "p90", "p99"])
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(scenario + (f"\n{case}" if case else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("latency (ms, log)")
    legend: dict[str, Any] = {}
    for ax in axes[0]:  # one legend for every server in any panel
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="upper right", fontsize=8)
    fig.suptitle("Move latency, sender to receiver (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu(runs: list[dict], path: Path) -> None:
    """Server CPU microseconds per delivered move, per scenario, per server."""
    plt = _pyplot()
    blocks = [
        (k, [r for r in subject_first(v) if (r.get("figures") or {}).get("cpu_us_per_delivery")])
        for k, v in groups(runs).items()
    ]
    blocks = [(k, v) for k, v in blocks if v]
    if not blocks:
        return
    targets = list(dict.fromkeys(r["target"] for _, v in blocks for r in v))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(blocks), 4))
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        xs, ys = [], []
        for j, (_, rs) in enumerate(blocks):
            for r in rs:
                if r["target"] == t:
                    xs.append(j + i * width)
                    ys.append(r["figures"]["cpu_us_per_delivery"])
        ax.bar(xs, ys, width, label=t, color=COLORS.get(t))
    labels = [s + (f"\n{c}" if c else "") for (s, c), _ in blocks]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(blocks))], labels, fontsize=8)
    ax.set_ylabel("server CPU us per delivered move")
    ax.set_title("CPU per delivery (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ramp(runs: list[dict], path: Path) -> None:
    """p99 latency against delivered moves/s as the ramp grows, per server."""
    plt = _pyplot()
    steps = [r for r in runs if r["scenario"] == "ramp" and r.get("figures")]
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in dict.fromkeys(r["target"] for r in steps):
        pts = [
            (r["figures"]["deliveries_per_s"], (r["figures"]["latency_ms"] or {}).get("p99"))
            for r in steps
            if r["target"] == t
        ]
        pts = [(x, y) for x, y in pts if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=t, color=COLORS.get(t))
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="50 ms limit")
    ax.set_xlabel("deliveries/s")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_title("Ramp: rooms of 8 at 10 moves/s, more rooms each step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def available() -> bool:
    try:
        _pyplot()
    except ImportError:
        return False
    return True


def write_all(runs: list[dict], out_json: Path) -> list[Path]:
    """Write ``<stem>-latency.png``, ``<stem>-cpu.png``, ``<stem>-ramp.png`` beside the JSON."""
    try:
        _pyplot()
    except ImportError:
        return []
    made = []
    for name, draw in (("latency", latency), ("cpu", cpu), ("ramp", ramp)):
        path = out_json.with_name(f"{out_json.stem}-{name}.png")
        path.unlink(missing_ok=True)
        draw(runs, path)
        if path.exists():
            made.append(path)
    return made
