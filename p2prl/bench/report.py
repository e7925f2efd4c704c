"""Reporting for `p2prl.bench`: run records from what each run leaves behind (summary.json, metrics.jsonl,
the SB3 worker's JSON), aggregates (median and min-max) and bench.json; `p2prl.bench.tables` prints
them. Apart from the readers, pure functions of the run records, so they are tested on synthetic results.

Time columns (all seconds, wall clock):
- `launch_to_target_s`: from the bench starting the process (`python -m p2prl.train`, `torchrun`, or the
  SB3 worker) to that process's exit, for runs that reached the target (every system exits as soon as it
  does); interpreter start, imports, rendezvous and shutdown included.
- `time_to_target_s`: inside the training process, from the start of training (p2prl: entry of
  `runner.run`, SB3: just before its envs and model are built; imports excluded) to the target.
- `first_step_to_target_s`: from the first env step to the target. SB3: measured. p2prl: the startup
  (`wall_s` minus the training loop's time, `(final_step - resumed_at_step) / sps`) taken off
  `time_to_target_s`, unless summary.json has `first_step_to_target_s` itself.
A run that did not reach the target counts as +inf in medians and ranges (`null` in bench.json).

Where the time went (p2prl): `time_shares`, rank 0's breakdown of its training loop (summary.json's
`time`: env stepping, inference, forward, backward, optimizer, communication, checkpoints, evaluations,
logging) as shares of the loop, and `rest_frac`, the unattributed share (`rest`), which should stay small.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from p2prl.atomic import write_json_atomic
from p2prl.plot import read_metrics
from p2prl.timing import shares

TO_TARGET = ("launch_to_target_s", "time_to_target_s", "first_step_to_target_s", "steps_to_target")
MEASURES = (*TO_TARGET, "sps", "comm_frac", "comm_ms_per_call", "grad_bytes", "calls_per_update",
            "bytes_per_update", "episode_return_mean", "eval_return_mean", "final_step", "max_rss_mb",
            "launch_to_exit_s", "last_rank_share", "rest_frac")
SUMMARY_KEYS = ("reached", "steps_to_target", "time_to_target_s", "first_step_to_target_s", "final_step",
                "world_size", "wall_s", "sps", "comm_frac", "comm_calls", "comm_bytes", "updates",
                "episode_return_mean", "eval_return_mean", "evaluations", "timed_out")


def derive(summary: dict[str, Any], launch_to_exit_s: float) -> dict[str, Any]:
    """The run-record fields from a summary (p2prl's summary.json or the SB3 worker's)."""
    rec = {k: summary.get(k) for k in SUMMARY_KEYS}
    reached = bool(summary.get("reached"))
    rec["reached"] = reached
    rec["launch_to_target_s"] = launch_to_exit_s if reached else None
    by_rank = summary.get("steps_by_rank") or []
    rec["last_rank_share"] = by_rank[-1] / sum(by_rank) if len(by_rank) > 1 and sum(by_rank) else None
    rss = summary.get("max_rss_mb")
    rec["max_rss_mb"] = max(rss) if rss else None  # the largest peer's peak
    sps = summary.get("sps")
    steps = summary.get("final_step", 0) - (summary.get("resumed_at_step") or 0)
    loop_s = summary.get("loop_s") or (steps / sps if sps else None)
    if reached and rec["first_step_to_target_s"] is None and loop_s is not None and summary.get("wall_s") is not None:
        startup_s = summary["wall_s"] - loop_s
        rec["first_step_to_target_s"] = max(0.0, summary["time_to_target_s"] - startup_s)
    # Communication profile (p2prl): comm_frac is comm seconds over the loop's seconds on rank 0.
    comm_s = summary.get("comm_s")
    if comm_s is None and summary.get("comm_frac") is not None and loop_s is not None:
        comm_s = summary["comm_frac"] * loop_s
    calls, updates, nbytes = summary.get("comm_calls"), summary.get("updates"), summary.get("comm_bytes")
    rec["comm_s"] = comm_s
    rec["comm_ms_per_call"] = 1000 * comm_s / calls if comm_s is not None and calls else None
    rec["comm_ms_per_update"] = 1000 * comm_s / updates if comm_s is not None and updates else None
    rec["comm_bytes_per_call"] = nbytes / calls if nbytes is not None and calls else None
    rec["calls_per_update"] = calls / updates if calls is not None and updates else None
    rec["bytes_per_update"] = nbytes / updates if nbytes is not None and updates else None
    times = summary.get("time")  # p2prl: every rank's breakdown of its loop; SB3: none
    rec["time_shares"] = shares(times[0]) if times else None
    rec["rest_frac"] = rec["time_shares"]["rest"] if times else None
    return rec


def watched(rows: Sequence[dict[str, Any]], target: Optional[float]) -> dict[str, Any]:
    """What a fixed-budget p2prl run's metrics rows say beyond its summary: its greedy evaluations
    ([step, mean, std] each; `eval_return_mean` the last one's mean) and, for a watched `target`, the
    first row whose training return window reached it (its step and run time)."""
    evals = [[r["step"], r["eval_return_mean"], r.get("eval_return_std")] for r in rows
             if r.get("eval_return_mean") is not None]
    out: dict[str, Any] = {"evaluations": evals, "eval_return_mean": evals[-1][1] if evals else None}
    if target is not None:
        hit = next((r for r in rows if r.get("episode_return_mean") is not None
                    and r["episode_return_mean"] >= target), None)
        out.update(reached=hit is not None, steps_to_target=hit and hit["step"], time_to_target_s=hit and hit["time_s"])
    return out


def grad_bytes(run_dir: Path) -> Optional[int]:
    """Bytes of one gradient all-reduce: the model's parameters in the run's newest checkpoint (the
    flat bucket adds a few scalar slots on top). None without a checkpoint."""
    ckpts = sorted((p for p in (run_dir / "checkpoints").glob("step_*.pt") if p.stem[5:].isdigit()),
                   key=lambda p: int(p.stem[5:]))
    if not ckpts:
        return None
    import torch
    model = torch.load(ckpts[-1], weights_only=True, map_location="cpu").get("model", {})
    return sum(t.numel() * t.element_size() for t in model.values() if torch.is_floating_point(t))


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """What a p2prl run stopped at the cap (no summary.json) last logged: its steps and speed."""
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    if not rows:
        return {}
    return {"final_step": rows[-1]["step"], "sps": rows[-1]["sps"], "comm_frac": rows[-1].get("comm_frac")}


def stat(values: Iterable[Optional[float]], missing: float = math.inf) -> Optional[dict[str, float]]:
    """Median, min and max; a None counts as `missing` (+inf: not reached). None for no values."""
    xs = [missing if v is None else float(v) for v in values]
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, system), in the order they first appear."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["system"]), []).append(r)
    rows = []
    for (task, system), rs in groups.items():
        row: dict[str, Any] = {"task": task, "system": system, "runs": len(rs),
                               "reached": sum(bool(r.get("reached")) for r in rs),
                               "failed": sum(r.get("error") is not None for r in rs),
                               "watched": any(r.get("watched") for r in rs)}
        for key in MEASURES:
            known = [r.get(key) for r in rs]
            # Time and steps to target: a miss is +inf. Other measures: a missing value is unknown.
            row[key] = stat(known) if key in TO_TARGET else stat(v for v in known if v is not None)
        rows.append(row)
    return rows


def scaling(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Global steps/s on 1 peer, on 2 peers that never average (`p2prl-2-apart`, what the machine allows 2
    processes) and on 2 peers, at fixed per-peer work (medians over seeds): efficiency = sps2 / (2 * sps1),
    ceiling = sps_apart / sps1 (the speed-up with no gradient exchange), of_ceiling = sps2 / sps_apart."""
    systems = {"1": "p2prl-1", "apart": "p2prl-2-apart", "2": "p2prl-2"}
    by = {k: [r for r in runs if r["system"] == name and r.get("sps")] for k, name in systems.items()}
    sps = {k: stat(r["sps"] for r in rs) for k, rs in by.items()}
    frac = {k: stat(r["comm_frac"] for r in rs if r.get("comm_frac") is not None) for k, rs in by.items()}

    def ratio(a: str, b: str) -> Optional[float]:
        return sps[a]["median"] / sps[b]["median"] if sps[a] and sps[b] else None

    speedup = ratio("2", "1")
    return {**{f"sps_{k}": v for k, v in sps.items()}, **{f"comm_frac_{k}": v for k, v in frac.items()},
            "speedup": speedup, "efficiency": speedup / 2 if speedup is not None else None,
            "ceiling": ratio("apart", "1"), "of_ceiling": ratio("2", "apart")}


def host() -> dict[str, Any]:
    """Where the numbers come from: a busy or small machine changes them."""
    import gymnasium
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gymnasium.__version__}
    for package in ("stable_baselines3", "mujoco", "envpool"):  # where installed
        if find_spec(package) is not None:
            versions[package] = importlib.import_module(package).__version__
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            **versions}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_json_atomic(path, doc)
