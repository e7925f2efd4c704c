"""`python -m p2prl.bench --faults K`: K faults in one training run, against the same run uninterrupted.

Per task, three runs of one config (2 peers on this machine, gloo and shared-memory sums, a fixed step
budget and no target, so both runs end at the same step; `train.resume=auto`, `comm.timeout_s=10`,
`checkpoint.every_steps` of about 1,024 steps, a progress line every iteration; DQN also checkpoints
its replay buffers, without which a resumed run cannot match):
1. under `torchrun --max-restarts=K`, with K faults of random kinds (`p2prl.bench.faults`) at random
   steps, seeded by the first of --seeds;
2. the same config, uninterrupted: the final shared checkpoints' model tensors are compared bit for
   bit, where the env's state is restored exactly on resume (`p2prl.envstate.restorable`: not Box2D
   physics, an emulator or worker processes, whose envs start fresh episodes: "not compared");
3. the loss of a whole node (`p2prl.bench.nodeloss`), reported apart.
Writes OUT/faults.json (every fault, the runs, the comparison) and prints the table.
"""
from __future__ import annotations

import logging
import random
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional


from p2prl.bench import nodeloss, report, tables
from p2prl.bench.faults import KINDS, FaultError, Injector, JobLog, plan
from p2prl.bench.plans import PORT, TASKS, free_port, p2prl_cmd
from p2prl.bench.runs import child_env, execute
from p2prl.checkpoint import load, shared_path

log = logging.getLogger("p2prl.bench")
PEERS = 2
EVERY_STEPS = 1024  # the default checkpoint interval, rounded up to whole iterations
WAIT_S = 180.0  # the longest wait for any one thing (a restart, the next checkpoint write, ...)


@dataclass(frozen=True)
class Setup:
    task: str
    overrides: tuple[str, ...]  # of every run of the task
    every: int  # checkpoint.every_steps
    iteration: int  # global steps of one iteration
    budget: int  # train.total_steps
    not_compared: Optional[str]  # why the final parameters are not compared (None: they are)


def setup(task: str, k: int, extra: list[str]) -> Setup:
    """The task's fault-run config; raises ConfigError for bad overrides or a budget too short for K."""
    from p2prl.checks import ConfigError
    from p2prl.envs import make_vec_env
    from p2prl.envstate import restorable
    from p2prl.precheck import compose
    t = TASKS[task]
    base = [f"algo={t.algo}", f"env={t.env}", "train.target_return=null", "train.log_every_steps=1",
            "comm.timeout_s=10", "train.resume=auto", *(["checkpoint.replay=true"] if t.algo in ("dqn", "sac", "td3") else [])]
    cfg = compose(*base, *extra)
    per_peer = getattr(cfg.algo, "num_steps", None) or getattr(cfg.algo, "train_freq", None) or 1
    iteration = PEERS * cfg.algo.num_envs * per_peer
    given = {o.split("=", 1)[0] for o in extra}
    every = cfg.checkpoint.every_steps if "checkpoint.every_steps" in given else -(-EVERY_STEPS // iteration) * iteration
    if not every:
        raise ConfigError("checkpoint.every_steps", every, "the fault run needs periodic checkpoints: a positive integer")
    budget = cfg.train.total_steps if "train.total_steps" in given else 2 * every * (k + 2)
    if budget // (k + 2) < 2 * every:
        raise ConfigError("train.total_steps", budget, f"too few steps for {k} faults at least {every} steps "
                                                       f"apart; allowed: >= {2 * every * (k + 2)}")
    envs, _ = make_vec_env(cfg.env, 1, seed=0)
    try:
        why = None if restorable(envs) else f"{cfg.env.id}'s state is not restored exactly on resume"
    finally:
        envs.close()
    return Setup(task, (*base, f"checkpoint.every_steps={every}", f"train.total_steps={budget}", *extra),
                 every, iteration, budget, why)


def final_model(run_dir: Path) -> Optional[dict]:
    summary = report.read_json(run_dir / "summary.json")
    saved = load(shared_path(run_dir / "checkpoints", summary["final_step"])) if summary else None
    return None if saved is None else saved["model"]


def compare(a: Optional[dict], b: Optional[dict]) -> dict[str, Any]:
    """Bit-for-bit comparison of two model state dicts."""
    if a is None or b is None:
        return {"identical": False, "why": "a final checkpoint is missing"}
    if sorted(a) != sorted(b):
        return {"identical": False, "why": "different tensors"}
    differing = [k for k in a if not (a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
    max_diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in differing
                    if a[k].shape == b[k].shape), default=0.0)
    return {"identical": not differing, "tensors": len(a), "differing": differing, "max_abs_diff": max_diff}


def fault_run(s: Setup, k: int, seed: int, out: Path, max_seconds: float) -> dict[str, Any]:
    """Run 1: the job under torchrun with the faults injected; what happened to each."""
    run_dir, log_path = out / "runs" / s.task / "faults", out / "logs" / f"{s.task}_faults.log"
    cmd = [c.replace(PORT, str(free_port())) for c in p2prl_cmd(PEERS, [*s.overrides, f"seed={seed}",
                                                                       f"hydra.run.dir={run_dir.resolve()}"])]
    cmd.insert(cmd.index("--nnodes=1"), f"--max-restarts={k}")
    rng = random.Random(seed)
    faults = plan(k, s.budget, s.every, s.iteration, rng)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True)
    error, rc = None, None
    with open(log_path, "w") as f:
        job = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    injector = Injector(job, JobLog(log_path), run_dir, PEERS, rng, WAIT_S)
    try:
        for i, fault in enumerate(faults, 1):
            injector.inject(fault)
            log.info("[fault %d/%d] %s of rank %d at step %d: resumed from step %d, back in %.1f s", i, k,
                     KINDS[fault.kind], fault.rank, fault.reached, fault.resumed, fault.seconds_lost)
        rc = job.wait(timeout=max_seconds)
    except FaultError as e:
        error = str(e)
    except subprocess.TimeoutExpired:
        error = f"still running {max_seconds:.0f} s after the last fault"
    finally:
        injector.close()
    injector.log.poll()
    summary = report.read_json(run_dir / "summary.json") or {}
    return {"run_dir": str(run_dir), "log": str(log_path), "cmd": cmd, "returncode": job.returncode if rc is None else rc,
            "error": error, "restarts": max(injector.restarts, len(injector.log.resumes)), "final_step": summary.get("final_step"),
            "faults": [{**asdict(f), "steps_lost": f.steps_lost} for f in faults]}


def run_task(s: Setup, k: int, seed: int, out: Path, max_seconds: float) -> dict[str, Any]:
    log.info("%s: %d faults in one run of %d steps ...", s.task, k, s.budget)
    res = {"task": s.task, "k": k, "seed": seed, "budget": s.budget, "every_steps": s.every,
           "iteration_steps": s.iteration, "overrides": list(s.overrides), "faulty": fault_run(s, k, seed, out, max_seconds)}
    log.info("%s: the same config uninterrupted ...", s.task)
    ref_dir = out / "runs" / s.task / "uninterrupted"
    cmd = [c.replace(PORT, str(free_port())) for c in p2prl_cmd(PEERS, [*s.overrides, f"seed={seed}",
                                                                       f"hydra.run.dir={ref_dir.resolve()}"])]
    rc, seconds, _ = execute(cmd, out / "logs" / f"{s.task}_uninterrupted.log", max_seconds)
    res["uninterrupted"] = {"run_dir": str(ref_dir), "returncode": rc, "seconds": seconds}
    res["final_parameters"] = ({"compared": False, "why": s.not_compared} if s.not_compared else
                               {"compared": True, **compare(final_model(Path(res["faulty"]["run_dir"])), final_model(ref_dir))})
    log.info("%s: the loss of a node ...", s.task)
    res["node_loss"] = nodeloss.run(s, seed, out, WAIT_S)
    return res


def survived(r: dict[str, Any]) -> bool:
    f = r["faulty"]
    return (f["error"] is None and f["returncode"] == 0 and f["final_step"] is not None and f["final_step"] >= r["budget"]
            and all(x["seconds_lost"] is not None for x in f["faults"]))


def _median_max(values: list) -> str:
    v = [x for x in values if x is not None]
    return "-" if not v else f"{statistics.median(v):,.1f} / {max(v):,.1f}" if isinstance(v[0], float) else \
        f"{statistics.median(v):,.0f} / {max(v):,}"


def describe_parameters(p: dict[str, Any]) -> str:
    if not p["compared"]:
        return f"not compared: {p['why']}"
    if p["identical"]:
        return f"bit-identical ({p['tensors']} tensors)"
    if p.get("why"):
        return f"DIFFER: {p['why']}"
    return f"DIFFER: {len(p['differing'])} of {p['tensors']} tensors, max |diff| {p['max_abs_diff']:.3g}"


def format_task(r: dict[str, Any]) -> str:
    f, bound = r["faulty"], r["every_steps"] + r["iteration_steps"]
    rows = []
    for kind in [*KINDS, None]:
        mine = [x for x in f["faults"] if kind is None or x["kind"] == kind]
        ok = [x for x in mine if x["seconds_lost"] is not None]
        rows.append((KINDS[kind] if kind else "all", str(len(mine)), str(len(ok)),
                     _median_max([x["steps_lost"] for x in ok]), _median_max([x["seconds_lost"] for x in ok])))
    lost = [x["steps_lost"] for x in f["faults"] if x["steps_lost"] is not None]
    same = describe_parameters(r["final_parameters"])
    lines = [f"{r['task']}: {r['k']} faults in one run of {PEERS} peers (torchrun --max-restarts={r['k']}; "
             f"{r['budget']:,} steps, checkpoint.every_steps={r['every_steps']}, one iteration {r['iteration_steps']} steps, "
             "comm.timeout_s=10)",
             tables.table(("fault", "injected", "survived", "steps lost median / max", "seconds lost median / max"), rows),
             f"restarts observed: {f['restarts']}; torchrun exit code {f['returncode']}; final step "
             f"{f['final_step'] or 0:,} of {r['budget']:,}" + (f"; ERROR: {f['error']}" if f["error"] else ""),
             f"steps lost per fault at most checkpoint.every_steps + one iteration ({bound:,}): "
             f"{'yes' if lost and max(lost) <= bound else 'NO'}",
             f"final parameters vs the same config uninterrupted: {same}",
             f"node loss: {nodeloss.describe(r['node_loss'])}"]
    return "\n".join(lines)


def passed(r: dict[str, Any]) -> bool:
    """Every fault survived, the steps-lost bound held, the parameters matched (where compared), the
    node loss survived (where it ran)."""
    lost = [x["steps_lost"] for x in r["faulty"]["faults"]]
    p, n = r["final_parameters"], r["node_loss"]
    return (survived(r) and max(lost) <= r["every_steps"] + r["iteration_steps"] and (not p["compared"] or p["identical"])
            and ("skipped" in n or n["survived"]))


def main(a: Any, out: Path, prog: str, emit: Callable[[str], None]) -> int:
    """The `--faults K` mode on a.tasks; 0 when every task passed, 1 otherwise, 2 for a bad override."""
    from p2prl.checks import ConfigError
    try:
        setups = [setup(task, a.faults, a.override) for task in a.tasks]
    except ConfigError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"created": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv,
                           "host": report.host(), "tasks": []}

    try:  # the bench's main() turns a SIGTERM into KeyboardInterrupt, as Ctrl-C
        for s in setups:
            doc["tasks"].append(run_task(s, a.faults, a.seeds[0], out, a.max_seconds))
            report.write_json(out / "faults.json", doc)  # after every task: a stopped bench keeps what it measured
    except KeyboardInterrupt:
        log.error("interrupted; the tasks done so far are in %s", out / "faults.json")
        return 130
    text = "\n\n".join(format_task(r) for r in doc["tasks"])
    emit(f"{text}\n\nwrote {out / 'faults.json'}")
    return 0 if all(passed(r) for r in doc["tasks"]) else 1
