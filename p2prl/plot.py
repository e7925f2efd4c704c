"""PNG plots: `python -m p2prl.plot RUN_DIR... [--out FILE] [--x step|time_s]` draws the training return
curves (`episode_return_mean` from metrics.jsonl) of one or more runs on one chart; `bar_chart` draws
p2prl.bench's per-task medians with min-max ranges.

Figures are drawn on matplotlib's Agg canvas without pyplot, so importing this module never switches
the backend of an interactive session and needs no display.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a torn last line, from a crash, is skipped)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _target(run_dir: Path) -> Optional[float]:
    try:
        return json.loads((run_dir / "summary.json").read_text())["config"]["train"]["target_return"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def labels(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (run dirs are often all called seed0 or a date)."""
    for k in range(1, max((len(d.parts) for d in run_dirs), default=1) + 1):
        tails = ["/".join(d.parts[-k:]) for d in run_dirs]
        if len(set(tails)) == len(tails):
            return tails
    return [str(d) for d in run_dirs]


def plot_returns(run_dirs: Sequence[Path], out: Path, x: str = "step") -> Path:
    """One line per run: `episode_return_mean` against `x`; the first run's target as a dashed line."""
    fig, (ax,) = _figure()
    for d, label in zip(run_dirs, labels(run_dirs)):
        rows = [r for r in read_metrics(d) if r.get("episode_return_mean") is not None]
        ax.plot([r[x] for r in rows], [r["episode_return_mean"] for r in rows], marker=".", label=label)
    target = _target(run_dirs[0]) if run_dirs else None
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("global env steps" if x == "step" else "seconds since start")
    ax.set_ylabel("mean return, last 20 episodes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def bar_chart(rows: Sequence[dict[str, Any]], field: str, ylabel: str, out: Path, annotate: bool = True) -> Path:
    """One panel per task, one bar per system: the median of `field` with a min-max range.

    `rows` are p2prl.bench aggregates ({"task", "system", "runs", "reached", field: {median, min, max}}).
    A median that is infinite (most runs missed the target) draws no bar, and an infinite max draws
    the range to the top of the panel; with `annotate`, every bar is labelled with how many runs reached
    the target.
    """
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = _figure(len(tasks), width=4.2)
    for ax, task in zip(axes, tasks):
        mine = [r for r in rows if r["task"] == task]
        stats = [r.get(field) or {"median": math.nan, "min": math.nan, "max": math.nan} for r in mine]
        finite = [v for s in stats for v in s.values() if math.isfinite(v)]
        top = 1.15 * max(finite, default=1.0)
        for i, (r, s) in enumerate(zip(mine, stats)):
            med = s["median"] if math.isfinite(s["median"]) else 0.0
            ax.bar(i, med, color=f"C{i}")
            if math.isfinite(s["min"]):  # the range over runs; an infinite max (a miss) reaches the top
                lo, hi = s["min"], min(s["max"], top)
                ax.errorbar(i, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", color="black", capsize=4)
            if annotate:
                ax.annotate(f"{r['reached']}/{r['runs']} reached", (i, med), ha="center", va="bottom",
                            xytext=(0, 3), textcoords="offset points", fontsize="small")
        ax.set_xticks(range(len(mine)), [r["system"] for r in mine])
        ax.set_ylim(0, top)
        ax.set_title(task)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m p2prl.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run dirs holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/returns.png of the first)")
    p.add_argument("--x", choices=("step", "time_s"), default="step", help="x axis: global steps or seconds")
    a = p.parse_args(argv)
    missing = [str(d) for d in a.run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        p.error(f"no metrics.jsonl in {', '.join(missing)}")
    out = plot_returns(a.run_dirs, a.out or a.run_dirs[0] / "returns.png", a.x)
    sys.stdout.write(f"{out}\n")  # the CLI's output: where the plot went


if __name__ == "__main__":
    main()
