"""Side-by-side benchmark runs: `python -m p2prl.bench [options]` (see `--help`).

Time and steps to the target return, and steps/s, for p2prl on 1 and 2 peers and SB3 (the options and
their defaults: `p2prl.bench.options`). Every run is a fresh process, timed from launch to exit.

Fixed-budget tasks (breakout-ppo, breakout-dqn: from pixels; halfcheetah-ppo; pendulum-sac, halfcheetah-sac,
hopper-sac, halfcheetah-td3) run a step budget instead and report the return reached at its end, steps/s (also
over SB3's) and peak memory per peer; the SAC and TD3 tasks also their greedy evaluations (10 episodes at fixed
steps and at the end, p2prl's `train.eval_every_steps`) and when the training return first reached the target.
bench.png shows their steps/s and return. On them `p2prl-1-global` is 1 peer at SB3's settings
(p2prl.bench.plans.GLOBAL_BATCH).

`--scaling [TASK ...]` instead measures global steps/s at fixed per-peer work (LunarLander PPO,
HalfCheetah PPO or SAC, Breakout PPO or DQN): N steps on 1 peer and 2N on 2 peers; efficiency = sps2 / (2 * sps1).
`--stepping [ENV ...]` times env steps/s per core by `env.vectorization` (p2prl.bench.stepping).
`--startup [REPEATS]` times start-up and shut-down: imports, torchrun alone, 1 and 2 peers (p2prl.bench.startup).
`--faults K` injects K faults into one run and compares it with the same run uninterrupted (p2prl.bench.faultbench).
`--network RATE [RATE ...]` times every strategy's sync between shaped hosts (p2prl.bench.network);
with `--train TASK ...` it trains between them instead (p2prl.bench.linktrain).
`--report PAGE.md BENCH_DIR ...` runs nothing: it writes the results page from earlier bench dirs (p2prl.bench.results).

Writes OUT/bench.json (settings, host, every run, aggregates; rewritten after each run), OUT/bench.png
(or scaling.png), the runs under OUT/runs/<task>/<system>/seed<N>/ and their output under OUT/logs/.
The columns are defined in `p2prl.bench.report` (records) and `p2prl.bench.tables` (tables).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from p2prl.bench import procs, report, startup, stepping, tables
from p2prl.bench.options import parse_args
from p2prl.bench.plans import (PORT, TASKS, Job, free_port, p2prl_cmd, plan, plan_presets, plan_scaling,
                               plan_strategies, plan_stragglers)
from p2prl.plot import bar_chart, bar_panels, read_metrics
from p2prl.timing import shares_line

log = logging.getLogger("p2prl.bench")


SB3_GRACE_S = 60.0  # an SB3 worker stops itself at the deadline; this long more to exit, then it is killed
TERM_GRACE_S = 20.0  # after SIGTERM, torchrun's peers save and exit; then SIGKILL


def child_env() -> dict[str, str]:
    """The children import this same p2prl, draw no progress bars, and start one OpenMP thread each."""
    env = dict(os.environ, P2PRL_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    return env


def execute(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, float, bool]:
    """Run `cmd` in its own session (so a stop reaches torchrun's peers too), its output to `log_path`;
    (exit code, seconds from launch to exit, stopped at `timeout`). SIGTERM first so peers save."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            return proc.wait(timeout=timeout), time.perf_counter() - start, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, time.perf_counter() - start, True
        except BaseException:  # Ctrl-C: torchrun's peers run in sessions of their own; leave none behind
            procs.kill_tree(proc.pid)
            proc.wait()
            raise


def run_job(job: Job, max_seconds: float) -> dict[str, Any]:
    """Launch one run and turn its summary into a run record."""
    job.run_dir.mkdir(parents=True)
    cmd = [c.replace(PORT, str(free_port())) if c.startswith("--rdzv-endpoint=") else c for c in job.cmd]
    is_sb3 = job.system == "sb3"
    if is_sb3:
        cmd += ["--deadline", str(time.time() + max_seconds)]
    rc, seconds, killed = execute(cmd, job.log, max_seconds + SB3_GRACE_S if is_sb3 else max_seconds)
    summary = report.read_json(job.run_dir / ("result.json" if is_sb3 else "summary.json"))
    error = None
    if summary is None or rc != 0:
        if not killed:
            tail = job.log.read_text(errors="replace").strip().splitlines()[-5:]
            error = f"exit code {rc}: " + " | ".join(tail)
        summary = summary or (report.last_metrics(job.run_dir) if not is_sb3 else {})
    # A fixed-budget run's rows say where it first reached its target, whatever stopped it (the cap, a crash).
    if summary and not is_sb3 and (job.run_dir / "metrics.jsonl").is_file():
        summary.update(report.watched(read_metrics(job.run_dir), job.watch))
    rec = {"task": job.task, "system": job.system, "seed": job.seed, **report.derive(summary, seconds),
           "launch_to_exit_s": seconds, "returncode": rc, "error": error, "run_dir": str(job.run_dir),
           "log": str(job.log), "cmd": list(job.cmd)}
    rec["timed_out"] = bool(killed or summary.get("timed_out"))
    if job.watch is not None:  # the run went on past the target: its exit says nothing of when
        rec.update(watched=True, launch_to_target_s=None)
    rec["grad_bytes"] = None if is_sb3 else report.grad_bytes(job.run_dir)
    return rec


def _describe(r: dict[str, Any], has_target: bool) -> str:
    if r["error"]:
        return f"FAILED ({r['error'][:200]}), log {r['log']}"
    how = f"reached at step {r['steps_to_target']}" if r["reached"] else \
        f"{'not reached, ' if has_target else ''}step {r['final_step']}"
    where = f"; rank 0's loop: {shares_line(r['time_shares'])}" if r.get("time_shares") else ""
    return f"{how}, {r['launch_to_exit_s']:.1f} s launch to exit" + (", stopped at the cap" if r["timed_out"] else "") \
        + where


def emit(text: str) -> None:
    """The CLI's console output (the tables), on stdout; progress goes to the log on stderr."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


MODEL_SIZES = {"CartPole MLP, 37 KB": 37_000, "Nature CNN, 6.7 MB": 6.7e6}


def cost_model(out: Path, max_seconds: float) -> int:
    """`--cost-model`: time the collectives on 2 peers here, fit, predict, plot."""
    import json

    from p2prl.bench import cost
    measured = out / "collectives.json"
    cmd = [c.replace(PORT, str(free_port())) for c in p2prl_cmd(2, [])]
    cmd = cmd[:cmd.index("p2prl.train")] + ["p2prl.bench.collectives", str(measured)]
    rc, _, _ = execute(cmd, out / "collectives.log", max_seconds)
    if rc != 0:
        log.error("timing the collectives failed (exit code %d): see %s", rc, out / "collectives.log")
        return 1
    m = cost.model(json.loads(measured.read_text()))
    m["predictions"] = {label: cost.predictions(m, size) for label, size in MODEL_SIZES.items()}
    m["peers"] = cost.PEERS
    report.write_json(out / "cost.json", m)
    png = cost.plot(m, MODEL_SIZES, out / "cost.png")
    fitted = (f"alpha {1e6 * m['alpha_s']:.1f} us, beta {1e9 * m['beta_s_per_byte']:.3f} ns/byte; shared memory: "
              f"alpha {1e6 * m['alpha_shm_s']:.1f} us, beta {1e9 * m['beta_shm_s_per_byte']:.3f} ns/byte")
    check = tables.table(("bytes", "all-reduce ms (fitted)", "send/recv ms", "model ms"), [
        (str(r["bytes"]), f"{1000 * r['allreduce_s']:.3f}", "-" if r["exchange_s"] is None else f"{1000 * r['exchange_s']:.3f}",
         f"{1000 * r['model_s']:.3f}") for r in m["measured_vs_model"]])
    text = "\n\n".join([f"2 peers, measured (medians) and modelled:\n{check}",
                          *(cost.table(m, size, label) for label, size in MODEL_SIZES.items())])
    emit(f"fitted on this machine: {fitted}\n\n{text}\n\nwrote {out / 'cost.json'} and {png}")
    return 0


def main(argv: Optional[list[str]] = None, prog: str = "python -m p2prl.bench") -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv, prog)
    if a.report is not None:
        from p2prl.bench import results
        return results.main(a.report, a.bench_dirs, emit)
    out = a.out or Path("bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    # A SIGTERM stops the bench as Ctrl-C does: the run under way (torchrun's peers run in sessions of
    # their own) is killed with it, not left training; what finished is in `out` already.
    with procs.sigterm_as_interrupt():
        try:
            return _run(a, out, prog)
        except KeyboardInterrupt:
            log.error("p2prl.bench: interrupted; the runs finished so far are in %s", out)
            return 130


def _run(a: argparse.Namespace, out: Path, prog: str) -> int:
    if (out / "runs").exists():  # p2prl would resume from the old runs' checkpoints
        log.error("p2prl.bench: %s already holds runs; choose a fresh --out", out)
        return 2
    if a.faults is not None:
        from p2prl.bench import faultbench
        return faultbench.main(a, out, prog, emit)
    out.mkdir(parents=True, exist_ok=True)
    if a.cost_model:
        return cost_model(out, a.max_seconds)
    if a.network is not None and a.train is not None:
        from p2prl.bench import linktrain
        return linktrain.run(a, out, child_env(), emit)
    if a.network is not None:
        from p2prl.bench import network
        return network.run(a, out, child_env(), emit)
    if a.startup is not None:
        prepare = lambda cmd: [c.replace(PORT, str(free_port())) for c in cmd]  # noqa: E731
        m = startup.measure(execute, p2prl_cmd, out, a.startup, prepare)
        report.write_json(out / "startup.json", {"host": report.host(), **m})
        emit(f"{startup.format_startup(m)}\n\nwrote {out / 'startup.json'}")
        return 0
    if a.stepping is not None:
        m = stepping.measure(a.stepping, a.stepping_num_envs, a.stepping_seconds, a.stepping_cores)
        report.write_json(out / "stepping.json", {"host": report.host(), **m})
        emit(f"{stepping.format_stepping(m)}\n\nwrote {out / 'stepping.json'}")
        return 0
    scaling = a.scaling is not None
    jobs = plan_scaling(a, out) if scaling else plan_strategies(a, out) if a.strategies else \
        plan_stragglers(a, out) if a.stragglers else plan_presets(a, out) if a.presets is not None else plan(a, out)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "preset_list"}
    doc: dict[str, Any] = {"created": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv,
                           "settings": settings, "host": report.host(), "runs": []}
    if a.presets is not None:
        doc["presets"] = {q.name: {"target": q.target, "budget": q.budget, "cut": q.cut} for q in a.preset_list}
    for i, job in enumerate(jobs, 1):
        log.info("[%d/%d] %s %s seed %d ...", i, len(jobs), job.task, job.system, job.seed)
        doc["runs"].append(run_job(job, a.max_seconds))
        has_target = not scaling and (a.stragglers or (doc["presets"][job.task]["target"] is not None
                                                        if a.presets is not None else TASKS[job.task].target is not None))
        log.info("[%d/%d] %s", i, len(jobs), _describe(doc["runs"][-1], has_target))
        doc["aggregates"] = report.aggregate(doc["runs"])
        report.write_json(out / "bench.json", doc)  # after every run: a stopped bench keeps what it measured
    if scaling:
        doc["scaling"] = {name: report.scaling([r for r in doc["runs"] if r["task"] == f"{name}-fixed-work"])
                          for name in a.scaling}
        text = "\n\n".join(f"{name}, fixed work per peer:\n{tables.format_scaling(s)}"
                            for name, s in doc["scaling"].items())
        png = bar_chart(doc["aggregates"], "sps", "global steps/s", out / "scaling.png", annotate=False)
    elif a.presets is not None:
        text = tables.format_presets(doc["aggregates"], doc["presets"])
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    elif a.stragglers:
        text = tables.format_stragglers(doc["aggregates"])
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    elif a.strategies:
        text = tables.format_strategies(doc["aggregates"], os.cpu_count())
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    else:
        budgeted = {n for n in a.tasks if TASKS[n].watch or (TASKS[n].target is None and a.target is None)}
        text = "\n\n".join(filter(None, [
            tables.format_results([r for r in doc["aggregates"] if r["task"] not in budgeted]) if set(a.tasks) - budgeted else "",
            tables.format_budget([r for r in doc["aggregates"] if r["task"] in budgeted]) if budgeted else ""]))
        # A fixed-budget task has no target: its panels are its speed and the return it reached.
        panels = {n: [("sps", "global steps/s", False), ("episode_return_mean", "return at the end", False)]
                  if n in budgeted else [("launch_to_target_s", "seconds to target, launch to exit", True)]
                  for n in dict.fromkeys(r["task"] for r in doc["aggregates"])}
        png = bar_panels(doc["aggregates"], panels, out / "bench.png")
    report.write_json(out / "bench.json", doc)
    emit(f"{text}\n\nwrote {out / 'bench.json'} and {png}")
    return 1 if any(r["error"] for r in doc["runs"]) else 0
