"""PNG plots: `python -m p2prl.plot RUN_DIR|SWEEP_DIR... [--out FILE] [--x step|time_s]` draws the training
return curves (`episode_return_mean` from metrics.jsonl) on one chart: the runs are grouped by the config
keys that differ between them (`p2prl.sweep`; seeds do not count), and each group of several runs is
drawn as its mean with a min-max band; `bar_chart` and `bar_panels` draw p2prl.bench's per-task medians
with min-max ranges.

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

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from p2prl.atomic import write_atomic
from p2prl.sweep import Group, find_runs, group_runs, saved_config


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, out: Path) -> Path:
    """The PNG, written atomically: a plot redrawn while a viewer reads it is never half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: fig.savefig(f, dpi=110, format="png"))
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


def series(rows: Sequence[dict[str, Any]], x: str = "step", y: str = "episode_return_mean") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the metrics rows that have a `y`, in the order of x."""
    rows = sorted((r for r in rows if r.get(y) is not None), key=lambda r: r[x])
    return np.array([r[x] for r in rows], dtype=float), np.array([r[y] for r in rows], dtype=float)


def curve(run_dir: Path, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, episode_return_mean) of a run's rows that have a return, in the order of x."""
    return series(read_metrics(run_dir), x)


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]],
         held: Optional[Sequence[bool]] = None) -> tuple[np.ndarray, ...]:
    """(grid, mean, min, max) of several curves on the union of their x values, each curve linearly
    interpolated within its own range. A curve marked in `held` (its run stopped because it reached
    the target) keeps its last value after it ends, so the runs that finished first still count and
    the mean does not fall back to the slower runs'; where an unheld run has ended, the statistics
    are those of the runs still going. Empty curves are left out."""
    held = list(held) if held is not None else [False] * len(curves)
    pairs = [(x, y, h) for (x, y), h in zip(curves, held) if len(x)]
    if not pairs:
        return (np.empty(0),) * 4
    grid = np.unique(np.concatenate([x for x, _, _ in pairs]))
    ys = np.stack([np.interp(grid, x, y, left=np.nan, right=y[-1] if h else np.nan) for x, y, h in pairs])
    return grid, np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


def _reached(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text())["reached"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_groups(run_dirs: Sequence[Path]) -> list[Group]:
    return group_runs(run_dirs, [saved_config(d) for d in run_dirs])


def draw_band(ax: Any, curves: Sequence[tuple[np.ndarray, np.ndarray]], held: Sequence[bool], color: str,
              label: str, **style: Any) -> None:
    """Several runs' curves as their mean (`band`) with a min-max band, labelled with how many; one run
    as its own line. `style`: matplotlib line options (a marker, a dashed line)."""
    grid, mean, lo, hi = band(curves, held)
    ax.plot(grid, mean, color=color, label=label if len(curves) == 1 else f"{label} (mean of {len(curves)})", **style)
    if len(curves) > 1:
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_returns(run_dirs: Sequence[Path], out: Path, x: str = "step",
                 groups: Optional[Sequence[Group]] = None) -> Path:
    """`episode_return_mean` against `x`: one line per group (`run_groups`), a group of several runs as
    their mean with a min-max band (a run that reached its target held at its last value); the first
    run's target as a dashed line."""
    fig, (ax,) = _figure()
    for i, g in enumerate(groups if groups is not None else run_groups(run_dirs)):
        draw_band(ax, [curve(d, x) for d in g.runs], [_reached(d) for d in g.runs], f"C{i}", g.label,
                  **({"marker": "."} if len(g.runs) == 1 else {}))
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
    tasks = dict.fromkeys(r["task"] for r in rows)
    return bar_panels(rows, {task: [(field, ylabel, annotate)] for task in tasks}, out)


Panel = tuple[str, str, bool]  # (field, y label, annotate with the runs that reached the target)


def bar_panels(rows: Sequence[dict[str, Any]], panels: dict[str, Sequence[Panel]], out: Path) -> Path:
    """`bar_chart` with a column per task of `panels` and, down it, a panel per (field, y label,
    annotate) of that task: fixed-budget tasks show steps/s and the return at the end, where seconds to
    a target they have none of would be empty."""
    tasks = list(panels)
    depth = max((len(p) for p in panels.values()), default=1)
    fig = Figure(figsize=(4.2 * max(len(tasks), 1), 4.2 * depth), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(depth, max(len(tasks), 1), squeeze=False)
    for j, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        for i in range(depth):
            if i < len(panels[task]):
                _bars(axes[i][j], mine, *panels[task][i])
                axes[i][j].set_title(task)
            else:
                axes[i][j].set_axis_off()
    return _save(fig, out)


def _bars(ax, mine: Sequence[dict[str, Any]], field: str, ylabel: str, annotate: bool) -> None:
    stats = [r.get(field) or {"median": math.nan, "min": math.nan, "max": math.nan} for r in mine]
    finite = [v for s in stats for v in s.values() if math.isfinite(v)]
    top = 1.15 * max(finite + [0.0]) or 1.0
    bottom = 1.15 * min(finite + [0.0])  # a negative return reaches below 0
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
    ax.set_ylim(bottom, top)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def main(argv: Optional[list[str]] = None, prog: str = "python -m p2prl.plot") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training return curves of runs or whole sweeps as one PNG: runs that differ only in their seed "
                    "are one group, drawn as its mean with a min-max band; prints one line per group.",
        epilog=f"examples:\n  {prog} multirun/<id>                   # a sweep: writes multirun/<id>/curves.png\n"
               f"  {prog} outputs/ppo-cartpole/<run> --x time_s --out returns.png")
    p.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR|SWEEP_DIR",
                   help="run dirs (holding metrics.jsonl) or dirs with run dirs below them (a Hydra multirun dir)")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG path (default: SWEEP_DIR/curves.png for a sweep, else RUN_DIR/returns.png of the first)")
    p.add_argument("--x", choices=("step", "time_s"), default="step", help="x axis: global steps or seconds")
    a = p.parse_args(argv)
    runs = find_runs(a.paths)
    empty = [str(d) for d in a.paths if not find_runs([d])]
    if empty:
        p.error(f"no metrics.jsonl in or below {', '.join(empty)}")
    first = a.paths[0]
    out = a.out or (first / "returns.png" if (first / "metrics.jsonl").is_file() else first / "curves.png")
    groups = run_groups(runs)
    for g in groups:
        sys.stdout.write(f"group {g.label}: {len(g.runs)} run{'s' if len(g.runs) != 1 else ''}\n")
    sys.stdout.write(f"{plot_returns(runs, out, a.x, groups)}\n")  # the CLI's output: the groups, where the plot went
    return 0


if __name__ == "__main__":
    sys.exit(main())
