"""`python -m p2prl.bench --network RATE [RATE ...] --train TASK [TASK ...]`: real training runs between
hosts joined by shaped links, one per rate, task, variant and seed.

Each run gets a star of its own (`p2prl.bench.netns.Star`: --hosts network-namespace hosts on one bridge,
each link shaped to RATE by tbf both ways, as `--network` alone builds them) and starts
`launch/multinode.sh` on every host (--peers-per-host peers each, unpinned: the hosts share this
machine's cores) with the task's preset, its target or budget (`p2prl.bench.plans.goal`), the variant's
`comm=` and `comm.compress=`, `seed=`, every `-o` override and a run dir under OUT/runs/. A variant is
a strategy of `comm=`, or strategy+compress (`allreduce+int8`, `local_sgd+lowrank`). A run still going
at --max-seconds is stopped (SIGTERM: its peers save and exit) and counts as not reached.

From each run's summary.json (or its last metrics row, for a stopped run): reached, global steps and
seconds to the target (from the run's start, `time_to_target_s`), the return at the end, comm_frac
(rank 0's share of the loop inside collectives), bytes handed to collectives per update (`comm_bytes /
updates`) and steps/s. Writes OUT/train.json (after every run), OUT/train.md (the table) and
OUT/train.png (return against wall time, one panel per task and rate, one line per variant and seed).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from p2prl.bench import netns, report
from p2prl.bench.network import MULTINODE, UNSHAPED, burst_bytes
from p2prl.bench.plans import TASKS, goal
from p2prl.bench.tables import markdown_table
from p2prl.sync.compress import COMPRESSIONS
from p2prl.sync.table import STRATEGIES

log = logging.getLogger("p2prl.bench")
# Every strategy, and those that compress their sums (comm.compress among their keys) with int8 and lowrank;
# read from the strategy table, where alone a strategy's name is spelled.
VARIANTS = tuple(v for name, strategy in STRATEGIES.items()
                 for v in (name, *(f"{name}+{c}" for c in ("int8", "lowrank") if "compress" in strategy.keys)))
STOP_GRACE_S = 30.0  # after SIGTERM the peers save and exit; then the star's close kills what is left


def check_variant(v: str) -> str:
    """A --variants entry, STRATEGY or STRATEGY+COMPRESS, checked (ValueError: what is allowed)."""
    strategy, _, compress = v.partition("+")
    if strategy not in STRATEGIES or (compress and compress not in COMPRESSIONS):
        raise ValueError(f"{v}: allowed: a strategy ({', '.join(STRATEGIES)}), optionally "
                                         f"+{'|'.join(c for c in COMPRESSIONS if c != 'none')}")
    return v


def overrides(task: str, variant: str, seed: int, run_dir: Path, a: argparse.Namespace) -> list[str]:
    """The Hydra overrides of one run."""
    t = TASKS[task]
    strategy, _, compress = variant.partition("+")
    return [f"algo={t.algo}", f"env={t.env}", *goal(t, a), f"comm={strategy}", f"comm.compress={compress or 'none'}",
            "train.pin_cores=false", *a.override, f"seed={seed}", f"hydra.run.dir={run_dir.resolve()}"]


def plan(a: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Every run: seed by seed, then task, rate and variant (so that a stopped bench has whole grids)."""
    return [{"rate": rate, "task": task, "variant": v, "seed": seed,
             "run_dir": out / "runs" / rate / task / v.replace("+", "-") / f"seed{seed}"}
            for seed in a.seeds for task in a.train for rate in a.network for v in a.variants]


def run_one(job: dict[str, Any], a: argparse.Namespace, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """One training run on its own star; its record."""
    run_dir, hosts, per_host = job["run_dir"], a.hosts[0], a.peers_per_host[0]
    run_dir.mkdir(parents=True)
    argv = ["bash", str(MULTINODE), *overrides(job["task"], job["variant"], job["seed"], run_dir, a)]
    shaped = {} if job["rate"] == UNSHAPED else {"rate": job["rate"], "burst": burst_bytes(netns.rate_bits(job["rate"]))}
    start = time.perf_counter()
    with netns.Star(hosts, **shaped) as star:
        launched = []
        for h in star.hosts:
            host_env = {**env, "NNODES": str(hosts), "HEAD_ADDR": star.hosts[0].addr, "IFNAME": h.dev,
                        "NODE_RANK": str(h.index), "NPROC_PER_NODE": str(per_host), "RUN_ID": f"train-{star.tag}",
                        "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
            with open(run_dir / f"host{h.index}.log", "w") as f:
                launched.append(star.popen(h.index, argv, env=host_env, stdout=f, stderr=subprocess.STDOUT))
        stopped = not _wait_all(launched, start + a.max_seconds)
        if stopped:
            for p in launched:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGTERM)  # torchrun's peers save and exit
                    except ProcessLookupError:
                        pass
            _wait_all(launched, time.perf_counter() + STOP_GRACE_S)  # the star's close kills what is left
        codes = [p.returncode for p in launched]
    seconds = time.perf_counter() - start
    summary = report.read_json(run_dir / "summary.json")
    error = None if stopped or (summary is not None and not any(codes)) else \
        f"exit codes {codes}: see {run_dir}/host*.log"
    rec = {k: job[k] for k in ("rate", "task", "variant", "seed")}
    rec.update(report.derive(summary or report.last_metrics(run_dir), seconds), hosts=hosts, per_host=per_host,
               launch_to_exit_s=seconds, stopped=stopped, error=error, run_dir=str(run_dir),
               return_end=(summary or {}).get("episode_return_mean", _last_return(run_dir)))
    return rec


def _wait_all(running: list[subprocess.Popen], deadline: float) -> bool:
    """Wait for every process until `deadline` (perf_counter); whether all of them exited."""
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            return False
    return True


def _last_return(run_dir: Path):
    rows = report.read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    returns = [r["episode_return_mean"] for r in rows if r.get("episode_return_mean") is not None]
    return returns[-1] if returns else None


def run(a: argparse.Namespace, out: Path, env: dict[str, str], emit: Callable[[str], None]) -> int:
    jobs = plan(a, out)
    doc: dict[str, Any] = {"argv": sys.argv, "host": report.host(), "runs": []}
    try:  # the bench's main() turns a SIGTERM into KeyboardInterrupt, as Ctrl-C
        for i, job in enumerate(jobs, 1):
            log.info("[%d/%d] %s %s %s seed %d ...", i, len(jobs), job["rate"], job["task"], job["variant"], job["seed"])
            rec = run_one(job, a, out, env)
            doc["runs"].append(rec)
            log.info("[%d/%d] %s", i, len(jobs), _outcome(rec))
            report.write_json(out / "train.json", doc)  # after every run: a stopped bench keeps what it measured
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the star's exit has removed what it made
        log.error("interrupted; the runs done so far are in %s", out / "train.json")
        return 130
    text = markdown(doc["runs"])
    (out / "train.md").write_text(text + "\n")
    png = plot(doc["runs"], out / "train.png")
    emit(f"{text}\n\nwrote {out / 'train.json'}, {out / 'train.md'} and {png}")
    return 1 if any(r["error"] for r in doc["runs"]) else 0


def _outcome(r: dict[str, Any]) -> str:
    if r["error"]:
        return "FAILED: " + r["error"]
    if r["reached"]:
        return f"reached at step {r['steps_to_target']}, {r['time_to_target_s']:.0f} s"
    return f"step {r['final_step']}, return {r['return_end']}" + (" (stopped)" if r["stopped"] else "")


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(runs: list[dict[str, Any]]) -> str:
    """One row per run: rate, task, variant, seed, the outcome and the communication profile."""
    rows = [(r["task"], r["rate"], f"{r['hosts']}x{r['per_host']}", r["variant"], str(r["seed"]),
             "FAILED" if r["error"] else "yes" if r["reached"] else "no" + (" (stopped)" if r["stopped"] else ""),
             _f(r["steps_to_target"], ","), _f(r["time_to_target_s"], ".0f"), _f(r["final_step"], ","),
             _f(r["return_end"], ".1f"), _f(r["wall_s"], ".0f"), _f(r["comm_frac"], ".3f"),
             _f(None if r["bytes_per_update"] is None else r["bytes_per_update"] / 1024, ",.1f"), _f(r["sps"], ",.0f"))
            for r in runs]
    return markdown_table(("task", "rate", "hosts x peers", "variant", "seed", "reached", "steps to target",
                         "s to target", "final step", "return at end", "wall s", "comm_frac", "KiB/update", "steps/s"),
                        rows)


def plot(runs: list[dict[str, Any]], out: Path) -> Path:
    """Return against seconds since the run's start: a panel per (task, rate, layout), a line per variant and seed."""
    from p2prl.plot import _figure, _save, curve
    def panel(r: dict[str, Any]) -> tuple:
        return r["task"], r["rate"], r["hosts"], r["per_host"]
    panels = list(dict.fromkeys(panel(r) for r in runs))
    fig, axes = _figure(ncols=max(len(panels), 1), width=5.0, height=4.0)
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for ax, key in zip(axes, panels):
        task, rate, hosts, per_host = key
        for r in runs:
            if panel(r) != key or not (Path(r["run_dir"]) / "metrics.jsonl").is_file():
                continue
            x, y = curve(Path(r["run_dir"]), "time_s")
            ax.plot(x, y, color=f"C{variants.index(r['variant'])}", linestyle="-" if r["seed"] == min(
                q["seed"] for q in runs) else ":", label=f"{r['variant']} (seed {r['seed']})")
        target = TASKS[task].target
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{task}, {hosts} hosts x {per_host} peer(s), {rate}", fontsize="medium")
        ax.set_xlabel("seconds since start")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("mean return, last 20 episodes")
    return _save(fig, out)
