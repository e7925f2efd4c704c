"""The console tables of `p2prl.bench`: aggregates (`p2prl.bench.report.aggregate`: median and min-max
per task and system) as fixed-width text, one table per kind of bench. Pure functions of the rows, so
they are tested on synthetic results."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

GLOBAL_NOTE = ("\np2prl-1-global: 1 peer given the global batch the preset splits over 2 peers (SB3's settings): "
               "the per-core comparison; steps/s vs sb3: medians, p2prl-2 on 2 cores")


def fmt(s: Optional[dict[str, float]], digits: int = 1, center: str = "median") -> str:
    """`median (min-max)` (or `center`: "mean"), or one number where they agree; `-` when unknown, `inf`
    for a miss."""
    if s is None:
        return "-"
    f = (lambda x: "inf" if math.isinf(x) else f"{x:.{digits}f}")
    med, lo, hi = f(s[center]), f(s["min"]), f(s["max"])
    return med if med == lo == hi else f"{med} ({lo} to {hi})" if s["min"] < 0 else f"{med} ({lo}-{hi})"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def vs_sb3(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each row's median steps/s over SB3's on the same task ("1.25x"; "-" without both)."""
    sb3 = {r["task"]: r["sps"]["median"] for r in rows if r["system"] == "sb3" and r.get("sps")}
    return [f"{r['sps']['median'] / sb3[r['task']]:.2f}x" if r.get("sps") and sb3.get(r["task"]) else "-"
            for r in rows]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown (GitHub) table."""
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def format_results(rows: Sequence[dict[str, Any]]) -> str:
    """The time-to-target table: median (min-max) over seeds per task and system."""
    headers = ("task", "system", "reached", "launch->target s", "1st step->target s", "steps->target",
               "steps/s", "vs sb3", "comm_frac", "comm ms/call", "rest")
    body = [(r["task"], r["system"], f"{r['reached']}/{r['runs']}" + (f", {r['failed']} failed" if r["failed"] else ""),
             fmt(r["launch_to_target_s"]), fmt(r["first_step_to_target_s"]), fmt(r["steps_to_target"], 0),
             fmt(r["sps"], 0), ratio, fmt(r["comm_frac"], 3), fmt(r["comm_ms_per_call"], 2), fmt(r["rest_frac"], 3))
            for r, ratio in zip(rows, vs_sb3(rows))]
    note = GLOBAL_NOTE if any(r["system"] == "p2prl-1-global" for r in rows) else ""
    return table(headers, body) + ("\nmedian (min-max) over seeds; inf: a run that did not reach the target; rest: the share of "
                                   "rank 0's loop no part accounts for") + note


def format_budget(rows: Sequence[dict[str, Any]]) -> str:
    """The fixed-budget table: the return reached at the budget's end (greedy evaluation where the task
    evaluates), when a watched target was first reached, speed (and over SB3's) and memory."""
    headers = ("task", "system", "runs", "global steps", "greedy return at the end", "training return at the end",
               "reached", "steps->target", "time->target s", "steps/s", "vs sb3", "peak MiB per peer",
               "launch->exit s", "rest")
    body = [(r["task"], r["system"], f"{r['runs']}" + (f", {r['failed']} failed" if r["failed"] else ""),
             fmt(r["final_step"], 0), fmt(r["eval_return_mean"], 1), fmt(r["episode_return_mean"], 1),
             *((f"{r['reached']}/{r['runs']}", fmt(r["steps_to_target"], 0), fmt(r["time_to_target_s"], 0))
               if r.get("watched") else ("-", "-", "-")),
             fmt(r["sps"], 0), ratio, fmt(r["max_rss_mb"], 0), fmt(r["launch_to_exit_s"], 0),
              fmt(r["rest_frac"], 3))
            for r, ratio in zip(rows, vs_sb3(rows))]
    note = GLOBAL_NOTE if any(r["system"] == "p2prl-1-global" for r in rows) else ""
    return table(headers, body) + ("\nmedian (min-max) over seeds; greedy return: the mean of 10 greedy episodes "
                                   "at the budget; training return: of the last 20 episodes (Atari: games); "
                                   "target: when the training return first reached it (inf: never); rest: as above") + note


def format_presets(rows: Sequence[dict[str, Any]], presets: dict[str, dict[str, Any]]) -> str:
    """Every tuned preset on 2 peers: its target and budget, how many seeds reached it, in how many steps
    and seconds, and the return at the end (at the target, or at the budget's end)."""
    headers = ("preset", "target", "budget", "reached", "steps->target", "launch->target s", "return at the end",
               "steps/s")
    body = []
    for r in rows:
        p = presets[r["task"]]
        target = "-" if p["target"] is None else f"{p['target']:g}"
        budget = f"{p['budget']:,}" + (" (cut)" if p["cut"] else "")
        reached = f"{r['reached']}/{r['runs']}" if p["target"] is not None else "-"
        failed = f", {r['failed']} failed" if r["failed"] else ""
        body.append((r["task"], target, budget, reached + failed, fmt(r["steps_to_target"], 0) if p["target"] is not None
                     else "-", fmt(r["launch_to_target_s"]) if p["target"] is not None else "-",
                     fmt(r["episode_return_mean"], 1), fmt(r["sps"], 0)))
    return table(headers, body) + ("\nmedian (min-max) over seeds on 2 peers; inf: a run that missed the target; "
                                   "(cut): a budget longer than 5M steps cut short, schedules as over the whole one")


def format_stragglers(rows: Sequence[dict[str, Any]]) -> str:
    """A slowed peer without and with preemption: time to target and the slow peer's share of samples."""
    headers = ("task", "system", "reached", "launch->target s", "1st step->target s", "steps->target",
               "slow peer's share of samples")
    body = [(r["task"], r["system"], f"{r['reached']}/{r['runs']}" + (f", {r['failed']} failed" if r["failed"] else ""),
             fmt(r["launch_to_target_s"]), fmt(r["first_step_to_target_s"]), fmt(r["steps_to_target"], 0),
             fmt(r["last_rank_share"], 3)) for r in rows]
    return table(headers, body) + "\nmedian (min-max) over seeds; 0.500: both peers contributed alike"


def format_strategies(rows: Sequence[dict[str, Any]], cores: Optional[int]) -> str:
    """The strategy comparison: time and steps to target, and what each update costs in collectives."""
    headers = ("task", "strategy x peers", "reached", "launch->target s", "steps->target", "comm_frac",
               "collectives/update", "KiB/update (rank 0)")
    body = [(r["task"], r["system"], f"{r['reached']}/{r['runs']}" + (f", {r['failed']} failed" if r["failed"] else ""),
             fmt(r["launch_to_target_s"]), fmt(r["steps_to_target"], 0), fmt(r["comm_frac"], 3),
             fmt(r["calls_per_update"], 2), fmt(_kib(r["bytes_per_update"]), 1)) for r in rows]
    peers = [int(r["system"].rsplit("x", 1)[1]) for r in rows]
    note = ""
    if cores and peers and max(peers) > cores:
        note = (f"\n{max(peers)} peers on {cores} cores are oversubscribed: their times say more about the "
                "machine than about the strategy")
    return table(headers, body) + "\nmedian (min-max) over seeds; inf: a run that did not reach the target" + note


def _kib(s: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    return None if s is None else {k: v / 1024 for k, v in s.items()}


def format_scaling(s: dict[str, Any]) -> str:
    names = {"1": "1 peer", "apart": "2 peers, never averaging", "2": "2 peers"}
    body = [(name, fmt(s[f"sps_{k}"], 0), fmt(s[f"comm_frac_{k}"], 3)) for k, name in names.items()
            if s.get(f"sps_{k}") is not None]
    eff = "-" if s["efficiency"] is None else f"{s['efficiency']:.2f} (2 peers: {s['speedup']:.2f}x the steps/s)"
    ceiling = "" if s.get("ceiling") is None else (
        f"\nthe machine's ceiling, 2 peers never averaging: {s['ceiling']:.2f}x the steps/s of 1 peer"
        + ("" if s.get("of_ceiling") is None else f"; 2 peers reach {s['of_ceiling']:.2f} of it"))
    return table(("peers", "global steps/s", "comm_frac"), body) + f"\nscaling efficiency sps2/(2*sps1): {eff}" + ceiling
