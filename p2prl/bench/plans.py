"""What `p2prl.bench` runs: the plans (the jobs of a bench, interleaved by seed) of its modes: time to
target (`plan`, of the tasks in `p2prl.bench.tasks`), strategies, stragglers, scaling and presets. Pure
functions of the options; `p2prl.bench.runs` launches the jobs."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from p2prl.bench.tasks import ATARI_BUDGETS, TASKS, budget_overrides, goal, sb3_goal, split_overrides
from p2prl.sync import table


def system_overrides(name: str, system: str, a: argparse.Namespace) -> list[str]:
    """The p2prl overrides of `system` on task `name` besides its goal: SB3's settings for p2prl-1-global,
    and `--learning-starts` for DQN (which replaces the one of SB3's settings)."""
    extra = list(GLOBAL_BATCH[name]) if system == "p2prl-1-global" else []
    if a.learning_starts is not None and TASKS[name].algo == "dqn":
        extra = [o for o in extra if not o.startswith("algo.learning_starts=")]
        extra.append(f"algo.learning_starts={a.learning_starts}")
    return extra


EXTRAS = {"box2d": "Box2D", "atari": "ale_py", "mujoco": "mujoco"}  # extra -> the module it installs
SYSTEMS = ("p2prl-1", "p2prl-2", "p2prl-1-global", "sb3")
# "p2prl-1-global": one peer given the whole global batch that the preset splits over 2 peers, which is
# SB3's settings for these tasks (the same samples per update, the same updates per sample): the per-core
# comparison with SB3. Tasks without an entry skip it (their presets are not SB3's settings).
GLOBAL_BATCH = {"breakout-ppo": ("algo.num_envs=8",),  # 8 envs x 128 steps, minibatches of 256
                "halfcheetah-ppo": ("algo.num_steps=512",),  # 1 env x 512 steps, minibatches of 64
                # a target copy every 1,000 steps; learning from the zoo's 100k steps (the preset: CleanRL's 80k)
                "breakout-dqn": ("algo.target_update_interval=250", "algo.learning_starts=100000")}
STRATEGIES = tuple(table.STRATEGIES)  # --strategies compares them all
# --scaling: global steps/s at fixed per-peer work, per task: its overrides, 1-peer steps, and global
# step counts given per peer (multiplied by the number of peers). DQN learns from its 2,000th step per
# peer on here, so that both runs act alone and update for the same share of each peer's steps.
SCALING = {"lunarlander-ppo": (("algo=ppo", "env=lunarlander", "train.target_return=null"), 100_000, {}),
           "halfcheetah-ppo": (("algo=ppo", "env=halfcheetah", "train.target_return=null"), 20_000, {}),
           "breakout-ppo": (("algo=ppo", "env=breakout"), 20_000, {}),
           "breakout-dqn": (("algo=dqn", "env=breakout"), 20_000, {"algo.learning_starts": 2000}),
           # SAC is update-bound: one all-reduce per update, two updates of 128 per vector step on each peer.
           "halfcheetah-sac": (("algo=sac", "env=halfcheetah", "train.target_return=null"), 10_000,
                               {"algo.learning_starts": 1000})}
SCALING_DEFAULT = ("lunarlander-ppo", "halfcheetah-ppo", "halfcheetah-sac")  # --scaling without a task
PORT = "<port>"  # in a planned torchrun command: replaced by a free port at launch
# env preset -> the extra its env needs (presets of other envs need none)
ENV_EXTRAS = {"lunarlander": "box2d", "lunarlandercontinuous": "box2d", "halfcheetah": "mujoco", "hopper": "mujoco", "walker2d": "mujoco",
              "breakout": "atari", "pong": "atari"}
# --presets: a longer budget (Atari's 10M, days here) is cut to a fixed one; FrozenLake 8x8's 4M tabular
# steps take minutes and run whole
PRESET_MAX_STEPS = 5_000_000


@dataclass(frozen=True)
class Job:
    task: str
    system: str
    seed: int
    cmd: tuple[str, ...]
    run_dir: Path
    log: Path
    watch: Optional[float] = None  # a fixed-budget run's target, noted where first reached (p2prl: from its rows)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p2prl_cmd(peers: int, overrides: list[str]) -> list[str]:
    """`python -m p2prl.train`, or torchrun with a loopback rendezvous for several peers (its port,
    PORT in the command, is chosen at launch: a port free when the bench starts may not be later)."""
    if peers == 1:
        return [sys.executable, "-m", "p2prl.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={peers}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{PORT}", "-m", "p2prl.train", *overrides]


def _job(out: Path, task: str, system: str, seed: int, cmd: list[str], watch: Optional[float] = None) -> Job:
    run_dir = out / "runs" / task / system / f"seed{seed}"
    if system != "sb3":
        cmd = [*cmd, f"seed={seed}", f"hydra.run.dir={run_dir.resolve()}"]
    return Job(task, system, seed, tuple(cmd), run_dir, out / "logs" / f"{task}_{system}_seed{seed}.log", watch)


def plan(a: argparse.Namespace, out: Path) -> list[Job]:
    """Every (task, system) for seed 0, then for seed 1, ...: interleaved."""
    jobs = []
    for seed in a.seeds:
        for name in a.tasks:
            t = TASKS[name]
            target = t.target if a.target is None else a.target
            budget = (a.budget or t.budget) if target is None or t.watch else None
            for system in a.systems:
                if system == "sb3":
                    steps = budget or a.sb3_steps
                    starts = a.learning_starts if t.algo == "dqn" else None
                    cmd = [sys.executable, "-m", "p2prl.bench.sb3", "--algo", t.algo, "--env", t.gym_id,
                           "--seed", str(seed), *sb3_goal(t, a),
                           "--out", str(out / "runs" / name / system / f"seed{seed}" / "result.json"),
                           *(["--steps", str(steps)] if steps else []),
                           *(["--learning-starts", str(starts)] if starts is not None else [])]
                elif system == "p2prl-1-global" and name not in GLOBAL_BATCH:
                    continue
                else:
                    peers = int(system.split("-")[1])
                    cmd = p2prl_cmd(peers, [f"algo={t.algo}", f"env={t.env}", *goal(t, a), *split_overrides(t, peers),
                                            *system_overrides(name, system, a), *a.override])
                jobs.append(_job(out, name, system, seed, cmd, target if t.watch else None))
    return jobs


def plan_strategies(a: argparse.Namespace, out: Path) -> list[Job]:
    """Every task x strategy x number of peers, seed 0 of all before seed 1, ..."""
    jobs = []
    for seed in a.seeds:
        for name in a.tasks:
            t = TASKS[name]
            for strategy in STRATEGIES:
                for peers in a.peers:
                    cmd = p2prl_cmd(peers, [f"algo={t.algo}", f"env={t.env}", *goal(t, a), f"comm={strategy}",
                                            *a.override])
                    jobs.append(_job(out, name, f"{strategy} x{peers}".replace(" ", "_"), seed, cmd))
    return jobs


def plan_stragglers(a: argparse.Namespace, out: Path) -> list[Job]:
    """A slowed rank 1 (p2prl.bench.straggler) on 2 peers, without and with preemption, seed by seed."""
    from p2prl.bench.straggler import ENV_ID
    target = 475 if a.target is None else a.target
    base = ["algo=ppo", "env=cartpole", f"env.id={ENV_ID}", f"train.target_return={target}", *a.override]
    return [_job(out, "cartpole-ppo-slow-rank1", system, seed, p2prl_cmd(2, [*base, *extra]))
            for seed in a.seeds for system, extra in (("wait_for_all", []),
                                                      ("straggler_frac_0.5", ["comm.straggler_frac=0.5"]))]


def per_peer_work(args: tuple[str, ...], per_peer: dict[str, int]) -> dict[str, int]:
    """The settings counted in global steps that make a peer's work besides stepping and learning: the
    task's own `per_peer` ones, plus how often it logs and checkpoints (rank 0 writes a checkpoint with
    fsync, and the other peers wait for it), as composed for the task."""
    from p2prl.precheck import compose
    cfg = compose(*args)
    every = {"train.log_every_steps": cfg.train.log_every_steps, "checkpoint.every_steps": cfg.checkpoint.every_steps}
    return {**{k: v for k, v in every.items() if v}, **per_peer}


# The scaling plan's third system: 2 peers that never average (local SGD whose average never comes), as
# many processes and the same work as 2 peers, no gradient exchange: what the machine allows 2 peers.
APART = ("comm=local_sgd", "comm.average_every=1000000000")


def plan_scaling(a: argparse.Namespace, out: Path) -> list[Job]:
    """Per task, 1 peer with N global steps, 2 peers with 2N that never average (`APART`: the machine's
    ceiling) and 2 peers with 2N, every other setting counted in global steps doubled too
    (`per_peer_work`): the same work per peer. Back to back per seed, seeds in turn."""
    jobs = []
    work = {name: per_peer_work(*SCALING[name][::2]) for name in a.scaling}
    for seed in a.seeds:
        for name in a.scaling:
            args, steps, _ = SCALING[name]
            steps = a.scaling_steps or steps
            for n, system, extra in ((1, "p2prl-1", ()), (2, "p2prl-2-apart", APART), (2, "p2prl-2", ())):
                scaled = [f"{key}={n * value}" for key, value in work[name].items()]
                jobs.append(_job(out, f"{name}-fixed-work", system, seed,
                                 p2prl_cmd(n, [*args, *scaled, f"train.total_steps={n * steps}", *extra,
                                               *a.override])))
    return jobs


@dataclass(frozen=True)
class Preset:
    name: str  # conf/tuned/<algo>_<env>.yaml's stem
    algo: str
    env: str
    target: Optional[float]  # the env's default target return (None: the budget's end is the result)
    budget: int  # global steps: the preset's own, or the fixed budget it was cut to
    cut: bool  # the preset's own budget was longer than PRESET_MAX_STEPS


def presets(names: Optional[list[str]] = None, budget: Optional[int] = None) -> list[Preset]:
    """The tuned presets (all of conf/tuned, or `names`), each with its target and budget as composed."""
    from p2prl.config import conf_dir
    from p2prl.precheck import compose
    found = sorted(p.stem for p in (conf_dir() / "tuned").glob("*.yaml"))
    out = []
    for name in names or found:
        algo, env = name.split("_", 1)
        cfg = compose(f"algo={algo}", f"env={env}")
        own = cfg.train.total_steps
        cut = own > PRESET_MAX_STEPS
        fixed = budget or ATARI_BUDGETS.get(algo, ATARI_BUDGETS["ppo"])
        out.append(Preset(name, algo, env, cfg.train.target_return, fixed if cut else own, cut))
    return out


def plan_presets(a: argparse.Namespace, out: Path) -> list[Job]:
    """Every preset on 2 peers at its own settings, seed 0 of all before seed 1, ...; a budget cut
    short keeps the schedules of the whole one (`budget_overrides`)."""
    jobs = []
    for seed in a.seeds:
        for p in a.preset_list:
            cut = ["train.target_return=null", f"train.total_steps={p.budget}", *budget_overrides(p.algo, p.budget)] \
                if p.cut else []
            cmd = p2prl_cmd(2, [f"algo={p.algo}", f"env={p.env}", *cut, *a.override])
            jobs.append(_job(out, p.name, "p2prl-2", seed, cmd))
    return jobs
