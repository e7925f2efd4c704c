"""The loss of a whole node, for `python -m p2prl.bench --faults K`.

Two hosts (network namespaces on one switch, `p2prl.bench.netns`), one peer each, gloo between them,
started by launch/multinode.sh with elastic membership (NNODES=1:2, MAX_RESTARTS=3); host 0 holds the
rendezvous. At a random step after the two peers have written a checkpoint together, every process of
host 1 is killed at once, as when a machine dies. Host 0's peer restarts, resumes with the smaller world and finishes
the budget. Not compared bit for bit: a resume on another number of peers starts every peer's envs and
RNGs afresh. Needs root (`netns.available()`); skipped with the reason otherwise.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from p2prl.bench import netns, report
from p2prl.bench.faults import FaultError, JobLog, wait_until
from p2prl.bench.runs import child_env
from p2prl.checkpoint import list_steps, load, shared_path

if TYPE_CHECKING:
    from p2prl.bench.faultbench import Setup

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "multinode.sh"
CHECKPOINTS = 8  # the budget, in checkpoint intervals; the node is lost after the second together


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.exists() else []
    for line in reversed(rows):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def _together(run_dir: Path, every: int) -> Optional[int]:
    """The step of a checkpoint at step >= 2 * every written by both peers, if there is one."""
    steps = [s for s in list_steps(run_dir / "checkpoints") if s >= 2 * every]
    saved = load(shared_path(run_dir / "checkpoints", steps[-1]), mmap=True, warn=False) if steps else None
    return steps[-1] if saved is not None and saved["world_size"] == 2 else None


def run(s: "Setup", seed: int, out: Path, wait_s: float) -> dict[str, Any]:
    why = netns.available()
    if why is not None:
        return {"skipped": why}
    run_dir = out / "runs" / s.task / "node_loss"
    logs = [out / "logs" / f"{s.task}_node_loss_host{i}.log" for i in range(2)]
    budget = CHECKPOINTS * s.every
    overrides = [*s.overrides, f"train.total_steps={budget}", f"seed={seed}", f"hydra.run.dir={run_dir.resolve()}"]
    env = {**child_env(), "NNODES": "1:2", "NPROC_PER_NODE": "1", "PORT": "29500", "MAX_RESTARTS": "3",
           "RDZV_CONF": "join_timeout=120,last_call_timeout=5", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    res: dict[str, Any] = {"run_dir": str(run_dir), "logs": [str(p) for p in logs], "budget": budget, "world_before": 2,
                           "error": None, "returncode": None}
    with netns.Star(2) as star:
        env.update(HEAD_ADDR=star.hosts[0].addr, RUN_ID=f"p2prl-faults-{star.tag}")
        jobs = []
        for h, path in zip(star.hosts, logs):
            with open(path, "w") as f:
                jobs.append(star.popen(h.index, ["bash", str(SCRIPT), *overrides], env={**env, "IFNAME": h.dev},
                                       stdout=f, stderr=subprocess.STDOUT))
        host0 = JobLog(logs[0])

        def ended(hosts: tuple[int, ...]) -> Optional[str]:
            host0.poll()
            gone = [i for i in hosts if jobs[i].poll() is not None]
            return f"host {gone[0]}'s torchrun ended (exit code {jobs[gone[0]].returncode})" if gone else None
        try:
            first = wait_until(lambda: _together(run_dir, s.every), "a checkpoint of both peers", wait_s, lambda: ended((0, 1)))
            at = first + random.Random(seed).randrange(0, s.every, s.iteration)  # a random step until the next one
            wait_until(lambda: _last_step(run_dir) >= at, f"step {at}", wait_s, lambda: ended((0, 1)))
            before, reached = len(host0.resumes), _last_step(run_dir)
            star.kill_host(1)
            t_fault = time.monotonic()
            wait_until(lambda: len(host0.resumes) > before, "host 0 to resume", wait_s, lambda: ended((0,)))
            reached_log, resumed = host0.resumes[before]
            reached = max(reached, reached_log)  # rank 0 may have lived on host 1
            res.update(reached=reached, resumed=resumed, steps_lost=reached - resumed)
            wait_until(lambda: host0.step >= reached, f"host 0 to get back to step {reached}", wait_s, lambda: ended((0,)))
            res["seconds_lost"] = time.monotonic() - t_fault
            res["returncode"] = jobs[0].wait(timeout=wait_s)
        except FaultError as e:
            res["error"] = str(e)
        except subprocess.TimeoutExpired:
            res["error"] = f"host 0 still running {wait_s:.0f} s after getting back"
    summary = report.read_json(run_dir / "summary.json") or {}
    res.update(world_after=summary.get("world_size"), final_step=summary.get("final_step"))
    res["survived"] = (res["error"] is None and res["returncode"] == 0 and res["world_after"] == 1
                       and (res["final_step"] or 0) >= budget)
    return res


def describe(r: dict[str, Any]) -> str:
    """One line for the table's foot."""
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    head = (f"2 network namespaces x 1 peer, NNODES=1:2, host 1 (not the rendezvous host) killed whole: "
            f"{'survived' if r['survived'] else 'FAILED'}, world {r['world_before']} -> {r['world_after']}, "
            f"final step {r['final_step'] or 0:,} of {r['budget']:,}")
    if r.get("steps_lost") is not None:
        head += f"; steps lost {r['steps_lost']:,}"
    if r.get("seconds_lost") is not None:
        head += f", seconds lost {r['seconds_lost']:.1f}"
    return head + (f"; ERROR: {r['error']}" if r["error"] else "") + " (not compared bit for bit: the world changed)"
