"""Side-by-side benchmark runs: `python -m p2prl.bench [options]` (see `--help`).

Time and steps to the target return, and steps/s, for p2prl on 1 peer (`python -m p2prl.train`) and on
2 peers (torchrun with a loopback rendezvous) and, when Stable-Baselines3 is installed
(`pip install -e ".[bench]"`), for SB3 with rl-baselines3-zoo's hyperparameters (`p2prl.bench.sb3`).
Every run is a fresh process, timed from launch to exit. Runs are interleaved (seed 0 of every task
and system, then seed 1, ...) so that noise from the machine hits every system alike.

Fixed-budget tasks (breakout-ppo, breakout-dqn: from pixels; halfcheetah-ppo) run a step budget instead and
report the return reached at its end, steps/s and peak memory per peer.

`--scaling [TASK ...]` instead measures global steps/s at fixed per-peer work (LunarLander PPO,
HalfCheetah PPO, Breakout PPO or DQN): N steps on 1 peer and 2N on 2 peers; efficiency = sps2 / (2 * sps1).
`--stepping [ENV ...]` times env steps/s per core by `env.vectorization` (p2prl.bench.stepping).
`--startup [REPEATS]` times start-up and shut-down: imports, torchrun alone, 1 and 2 peers (p2prl.bench.startup).

Writes OUT/bench.json (settings, host, every run, aggregates; rewritten after each run), OUT/bench.png
(or scaling.png), the runs under OUT/runs/<task>/<system>/seed<N>/ and their output under OUT/logs/.
The columns are defined in `p2prl.bench.report`.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from p2prl.bench import report, startup, stepping
from p2prl.bench.plans import (ENV_EXTRAS, EXTRAS, PORT, SCALING, SCALING_DEFAULT, STRATEGIES, SYSTEMS, TASKS, Job,
                               free_port, p2prl_cmd, plan, plan_presets, plan_scaling, plan_strategies, plan_stragglers,
                               presets)
from p2prl.plot import bar_chart

log = logging.getLogger("p2prl.bench")


SB3_GRACE_S = 60.0  # an SB3 worker stops itself at the deadline; this long more to exit, then it is killed
TERM_GRACE_S = 20.0  # after SIGTERM, torchrun's peers save and exit; then SIGKILL


def parse_args(argv: Optional[list[str]] = None, prog: str = "python -m p2prl.bench") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"examples:\n  {prog} --tasks cartpole-ppo --seeds 0 1 --out bench/quick\n"
                                       f"  {prog} --scaling lunarlander-ppo")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["cartpole-ppo", "cartpole-dqn"],
                   metavar="TASK", help=f"of {', '.join(TASKS)} (default: %(default)s)")
    p.add_argument("--lunarlander", action="store_true", help="add lunarlander-ppo and lunarlander-dqn")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   metavar="SYSTEM", help="of %(choices)s (default: all; sb3 where stable-baselines3 is installed)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default: %(default)s)")
    p.add_argument("--target", type=float, default=None,
                   help="target return for every task and system (default: 475 on CartPole, 200 on LunarLander)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock cap per run from launch (default: 300, with --presets 3600); a run still going "
                        "then has not reached the target")
    p.add_argument("--sb3-steps", type=int, default=None,
                   help="SB3 step budget (default: the zoo's n_timesteps for PPO, 300k for DQN)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override for every p2prl run (repeatable), e.g. -o train.total_steps=50000")
    p.add_argument("--budget", type=int, default=None,
                   help="global steps of the fixed-budget tasks (default: breakout-ppo 100k, breakout-dqn 150k, "
                        "halfcheetah-ppo 1M)")
    p.add_argument("--scaling", nargs="*", choices=sorted(SCALING), default=None, metavar="TASK",
                   help="run the 1 vs 2 peer scaling measurement instead, on these tasks (of "
                        f"{', '.join(SCALING)}; none named: {' and '.join(SCALING_DEFAULT)})")
    p.add_argument("--stepping", nargs="*", choices=stepping.ENVS, default=None, metavar="ENV",
                   help="time env steps/s per core with env.vectorization=sync, async, envpool instead, on "
                        f"these env presets (none named: {', '.join(stepping.ENVS)})")
    p.add_argument("--stepping-num-envs", nargs="+", type=int, default=list(stepping.NUM_ENVS),
                   help="with --stepping: envs per vector env (default: %(default)s)")
    p.add_argument("--stepping-seconds", type=float, default=2.0,
                   help="with --stepping: per measurement (default: %(default)s)")
    p.add_argument("--stepping-cores", type=int, default=1,
                   help="with --stepping: cores to pin to (default: %(default)s)")
    p.add_argument("--presets", nargs="*", default=None, metavar="PRESET",
                   help="run tuned presets (conf/tuned/<algo>_<env>) on 2 peers at their own settings instead, "
                        "to their env's target or their budget (none named: every preset whose extra is installed; "
                        "budgets over 2M steps, Atari's, cut to --budget or the bench's own)")
    p.add_argument("--startup", type=int, nargs="?", const=5, default=None, metavar="REPEATS",
                   help="time start-up and shut-down instead (interpreter, imports, torchrun alone, p2prl on 1 and "
                        "2 peers), each REPEATS times (default: 5)")
    p.add_argument("--strategies", action="store_true",
                   help=f"compare the sync strategies ({', '.join(STRATEGIES)}) on the tasks, on --peers peers")
    p.add_argument("--peers", nargs="+", type=int, default=[2, 4], help="with --strategies (default: %(default)s)")
    p.add_argument("--stragglers", action="store_true",
                   help="CartPole PPO on 2 peers, rank 1's env slowed on purpose, without and with "
                        "comm.straggler_frac=0.5: time to target and the slow peer's share of the samples")
    p.add_argument("--cost-model", action="store_true",
                   help="time collectives on 2 peers, fit the alpha-beta model, predict up to 256 peers")
    p.add_argument("--scaling-steps", type=int, default=None,
                   help="global steps of the 1-peer scaling run (default: 100k on LunarLander, 20k on HalfCheetah "
                        "and Breakout)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default: bench/<timestamp>)")
    a = p.parse_args(argv)
    positive = {"--stepping-num-envs": a.stepping_num_envs, "--stepping-cores": [a.stepping_cores],
                "--stepping-seconds": [a.stepping_seconds], "--startup": [] if a.startup is None else [a.startup]}
    for flag, values in positive.items():
        for v in values:
            if v <= 0:
                p.error(f"{flag}={v}: must be positive")
    if any(s < 0 for s in a.seeds):
        p.error(f"--seeds={min(a.seeds)}: must be >= 0")
    if a.max_seconds is None:
        a.max_seconds = 3600.0 if a.presets is not None else 300.0
    if a.presets is not None:
        from p2prl.config import conf_dir
        known = sorted(q.stem for q in (conf_dir() / "tuned").glob("*.yaml"))
        unknown = [n for n in a.presets if n not in known]
        if unknown:
            p.error(f"--presets {unknown[0]}: no such preset; allowed: {', '.join(known)}")
        names = a.presets or known
        usable = [n for n in names if (e := ENV_EXTRAS.get(n.split("_", 1)[1])) is None
                  or importlib.util.find_spec(EXTRAS[e]) is not None]
        for n in sorted(set(names) - set(usable)):
            if a.presets:
                p.error(f'{n} needs the {ENV_EXTRAS[n.split("_", 1)[1]]} extra: pip install -e ".[{ENV_EXTRAS[n.split("_", 1)[1]]}]"')
            log.warning("skipping %s: its env needs the %s extra", n, ENV_EXTRAS[n.split("_", 1)[1]])
        a.preset_list = presets(usable, a.budget)
    if a.lunarlander:
        a.tasks = list(dict.fromkeys([*a.tasks, "lunarlander-ppo", "lunarlander-dqn"]))
    if a.scaling is not None and not a.scaling:
        a.scaling = list(SCALING_DEFAULT)
    if a.stepping is not None and not a.stepping:
        a.stepping = list(stepping.ENVS)
    other_mode = a.stepping is not None or a.startup is not None or a.presets is not None
    for name in (a.scaling if a.scaling is not None else [] if other_mode else a.tasks):
        extra = TASKS[name].extra
        if extra and importlib.util.find_spec(EXTRAS[extra]) is None:
            p.error(f'{name} needs the {extra} extra: pip install -e ".[{extra}]"')
    runs_sb3 = a.scaling is None and a.stepping is None and a.startup is None and a.presets is None
    if "sb3" in a.systems and runs_sb3 and importlib.util.find_spec("stable_baselines3") is None:
        log.warning('stable-baselines3 is not installed (pip install -e ".[bench]"): skipping sb3')
        a.systems = [s for s in a.systems if s != "sb3"]
    return a


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
    rec = {"task": job.task, "system": job.system, "seed": job.seed, **report.derive(summary, seconds),
           "launch_to_exit_s": seconds, "returncode": rc, "error": error, "run_dir": str(job.run_dir),
           "log": str(job.log), "cmd": list(job.cmd)}
    rec["timed_out"] = bool(killed or summary.get("timed_out"))
    rec["grad_bytes"] = None if is_sb3 else report.grad_bytes(job.run_dir)
    return rec


def _describe(r: dict[str, Any], has_target: bool) -> str:
    if r["error"]:
        return f"FAILED ({r['error'][:200]}), log {r['log']}"
    how = f"reached at step {r['steps_to_target']}" if r["reached"] else \
        f"{'not reached, ' if has_target else ''}step {r['final_step']}"
    return f"{how}, {r['launch_to_exit_s']:.1f} s launch to exit" + (", stopped at the cap" if r["timed_out"] else "")


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
    check = report.table(("bytes", "all-reduce ms (fitted)", "send/recv ms", "model ms"), [
        (str(r["bytes"]), f"{1000 * r['allreduce_s']:.3f}", "-" if r["exchange_s"] is None else f"{1000 * r['exchange_s']:.3f}",
         f"{1000 * r['model_s']:.3f}") for r in m["measured_vs_model"]])
    tables = "\n\n".join([f"2 peers, measured (medians) and modelled:\n{check}",
                            *(cost.table(m, size, label) for label, size in MODEL_SIZES.items())])
    emit(f"fitted on this machine: {fitted}\n\n{tables}\n\nwrote {out / 'cost.json'} and {png}")
    return 0


def main(argv: Optional[list[str]] = None, prog: str = "python -m p2prl.bench") -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv, prog)
    out = a.out or Path("bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if (out / "runs").exists():  # p2prl would resume from the old runs' checkpoints
        log.error("p2prl.bench: %s already holds runs; choose a fresh --out", out)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if a.cost_model:
        return cost_model(out, a.max_seconds)
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
        text = "\n\n".join(f"{name}, fixed work per peer:\n{report.format_scaling(s)}"
                            for name, s in doc["scaling"].items())
        png = bar_chart(doc["aggregates"], "sps", "global steps/s", out / "scaling.png", annotate=False)
    elif a.presets is not None:
        text = report.format_presets(doc["aggregates"], doc["presets"])
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    elif a.stragglers:
        text = report.format_stragglers(doc["aggregates"])
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    elif a.strategies:
        text = report.format_strategies(doc["aggregates"], os.cpu_count())
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    else:
        budgeted = {n for n in a.tasks if TASKS[n].target is None and a.target is None}
        text = "\n\n".join(filter(None, [
            report.format_results([r for r in doc["aggregates"] if r["task"] not in budgeted]) if set(a.tasks) - budgeted else "",
            report.format_budget([r for r in doc["aggregates"] if r["task"] in budgeted]) if budgeted else ""]))
        png = bar_chart(doc["aggregates"], "launch_to_target_s", "seconds to target, launch to exit", out / "bench.png")
    report.write_json(out / "bench.json", doc)
    emit(f"{text}\n\nwrote {out / 'bench.json'} and {png}")
    return 1 if any(r["error"] for r in doc["runs"]) else 0
