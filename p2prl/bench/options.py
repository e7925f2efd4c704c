"""The command line of `python -m p2prl.bench`: its options, their defaults, and the refusals of options
that cannot run here (an unknown preset, an extra that is not installed) before any run starts.

Time and steps to the target return, and steps/s, for p2prl on 1 peer (`python -m p2prl.train`) and on
2 peers (torchrun with a loopback rendezvous) and, when Stable-Baselines3 is installed
(`pip install -e ".[bench]"`), for SB3 with rl-baselines3-zoo's hyperparameters (`p2prl.bench.sb3`).
Every run is a fresh process, timed from launch to exit. Runs are interleaved (seed 0 of every task
and system, then seed 1, ...) so that noise from the machine hits every system alike.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import Optional

from p2prl.bench import stepping
from p2prl.bench.plans import (ENV_EXTRAS, EXTRAS, GLOBAL_BATCH, SCALING, SCALING_DEFAULT, STRATEGIES, SYSTEMS,
                               TASKS, presets)

log = logging.getLogger("p2prl.bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every other p2prl refusal; --help has the usage
        self.exit(2, f"{self.prog}: error: {message}\n")


# Global steps/s below any fixed-budget run measured on a 2-core machine (SB3's SAC: 40 on a slow stretch):
# their default cap, so that the cap never decides their result.
SLOWEST_SPS = 20


def default_cap(a: argparse.Namespace) -> float:
    """The default --max-seconds outside --presets and --faults: 300 s, or longer where the tasks trained
    (the default mode's --tasks, or --network's --train) include a fixed-budget one, whose result is the
    return at the end of its budget (--budget or its own) and which a cap would cut short. A task run to
    a target (its own or --target, as `plans.plan` decides) keeps 300 s."""
    other = (a.cost_model, a.network is not None, a.startup is not None, a.stepping is not None,
             a.scaling is not None, a.strategies, a.stragglers)
    names = a.train if a.network is not None and a.train else [] if any(other) else a.tasks
    fixed = [a.budget or TASKS[n].budget for n in names
             if (TASKS[n].target if a.target is None else a.target) is None or TASKS[n].watch]
    return max([300.0, *(b / SLOWEST_SPS for b in fixed)])


def parse_args(argv: Optional[list[str]] = None, prog: str = "python -m p2prl.bench") -> argparse.Namespace:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"examples:\n  {prog} --tasks cartpole-ppo --seeds 0 1 --out bench/quick\n"
                                       f"  {prog} --scaling lunarlander-ppo\n"
                                       f"  {prog} --faults 5 --tasks cartpole-dqn\n"
                                       f"  {prog} --report docs/results.md bench/presets bench/sac")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None, metavar="TASK",
                   help=f"of {', '.join(TASKS)} (default: cartpole-ppo cartpole-dqn; with --faults: cartpole-ppo)")
    p.add_argument("--lunarlander", action="store_true", help="add lunarlander-ppo and lunarlander-dqn")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   metavar="SYSTEM", help="of %(choices)s (default: all; sb3 where stable-baselines3 is installed; "
                                          "p2prl-1-global: 1 peer given the global batch, SB3's settings, on "
                                          f"{', '.join(GLOBAL_BATCH)} only)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="(default: %(default)s; --faults runs the first, which also draws the faults)")
    p.add_argument("--target", type=float, default=None,
                   help="target return for every task and system (default: 475 on CartPole, 200 on LunarLander)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock cap per run from launch (default: 300, with --presets or --faults 3600, with a "
                        f"fixed-budget task its budget / {SLOWEST_SPS} s if longer); a run still going then has not "
                        "reached the target")
    p.add_argument("--sb3-steps", type=int, default=None,
                   help="SB3 step budget of tasks run to a target (default: the zoo's n_timesteps for PPO, 300k for DQN)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override for every p2prl run (repeatable), e.g. -o train.total_steps=50000")
    p.add_argument("--budget", type=int, default=None,
                   help="global steps of the fixed-budget tasks (default: breakout-ppo 100k, breakout-dqn 150k, "
                        "halfcheetah-ppo 1M, pendulum-sac 20k, halfcheetah-sac and halfcheetah-td3 100k, hopper-sac 150k)")
    p.add_argument("--learning-starts", type=int, default=None,
                   help="DQN tasks: env steps before learning, for p2prl (algo.learning_starts) and SB3 alike "
                        "(default: each one's own: the preset's, the zoo's)")
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
                        "budgets over 5M steps, Atari's, cut to --budget or the bench's own)")
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
    p.add_argument("--faults", type=int, default=None, metavar="K",
                   help="inject K faults (kill -9 of a peer, SIGSTOP of a peer, kill -9 in a checkpoint write) into one "
                        "2-peer run under torchrun --max-restarts=K, run the same config uninterrupted, compare the "
                        "final parameters bit for bit, and lose a whole node of a 2-host elastic run (network "
                        "namespaces, root only); prints faults by kind, restarts, steps and seconds lost per fault")
    p.add_argument("--network", nargs="+", default=None, metavar="RATE",
                   help="time every strategy's sync between hosts (network namespaces on one bridge) whose links "
                        "are shaped to each RATE (tc's units: 10mbit, 1gbit; or unshaped) instead, and fit the "
                        "alpha-beta model to it (p2prl.bench.network; needs root, ip, tc and unshare)")
    p.add_argument("--hosts", nargs="+", type=int, default=[2], help="with --network (default: %(default)s)")
    p.add_argument("--peers-per-host", nargs="+", type=int, default=[1], help="with --network (default: %(default)s)")
    p.add_argument("--max-peers", type=int, default=None,
                   help="with --network: skip the layouts of more peers (e.g. --hosts 2 4 --peers-per-host 1 2 "
                        "--max-peers 4: 2x1, 2x2, 4x1)")
    p.add_argument("--bucket-bytes", nargs="+", type=int, default=[37_000, 1_000_000, 6_700_000],
                   help="with --network: gradient buckets to sync (default: %(default)s)")
    p.add_argument("--point-seconds", type=float, default=10.0,
                   help="with --network: time per strategy and bucket, after one warm-up (default: %(default)s)")
    p.add_argument("--average-every", type=int, default=4,
                   help="with --network: local_sgd's updates between averages (default: %(default)s)")
    p.add_argument("--train", nargs="+", choices=sorted(TASKS), default=None, metavar="TASK",
                   help="with --network: train TASK (of %(choices)s) between the shaped hosts instead, once per rate, "
                        "--variants entry and --seeds seed (p2prl.bench.linktrain); --budget, --target, -o and "
                        "--max-seconds apply")
    p.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                   help="with --train: STRATEGY or STRATEGY+COMPRESS, e.g. allreduce local_sgd+int8 "
                        "(default: every strategy, and allreduce and local_sgd with int8 and lowrank)")
    p.add_argument("--scaling-steps", type=int, default=None,
                   help="global steps of the 1-peer scaling run (default: 100k on LunarLander, 20k on HalfCheetah "
                        "(PPO) and Breakout, 10k on HalfCheetah (SAC))")
    p.add_argument("--out", type=Path, default=None, help="output dir (default: bench/<timestamp>)")
    p.add_argument("--report", type=Path, default=None, metavar="PAGE.md",
                   help="run nothing: write the results page PAGE.md (and PNGs in PAGE/) from the BENCH_DIRs that "
                        "earlier benches wrote (p2prl.bench.results; a run in several dirs: the last named wins)")
    p.add_argument("bench_dirs", nargs="*", type=Path, metavar="BENCH_DIR", help="with --report: bench --out dirs")
    a = p.parse_args(argv)
    if a.learning_starts is not None and a.learning_starts < 0:
        p.error(f"--learning-starts={a.learning_starts}: must be >= 0")
    positive = {"--stepping-num-envs": a.stepping_num_envs, "--stepping-cores": [a.stepping_cores],
                "--stepping-seconds": [a.stepping_seconds], "--startup": [] if a.startup is None else [a.startup]}
    for flag, values in positive.items():
        for v in values:
            if v <= 0:
                p.error(f"{flag}={v}: must be positive")
    if a.report is not None:
        from p2prl.bench.results import check_dirs
        check_dirs(a.report, a.bench_dirs, p.error)
    elif a.bench_dirs:
        p.error(f"BENCH_DIR {a.bench_dirs[0]}: read only with --report PAGE.md")
    if a.faults is not None and a.faults <= 0:
        p.error(f"--faults={a.faults}: must be a positive number of faults")
    if a.tasks is None:
        a.tasks = ["cartpole-ppo"] if a.faults is not None else ["cartpole-ppo", "cartpole-dqn"]
    if any(s < 0 for s in a.seeds):
        p.error(f"--seeds={min(a.seeds)}: must be >= 0")
    if a.train is not None and a.network is None:
        p.error("--train: needs --network RATE [RATE ...]")
    if a.network is not None:
        from p2prl.bench.network import check_options  # torch and the namespaces' tools: only for --network
        check_options(a, p.error)
    if a.max_seconds is None:
        a.max_seconds = 3600.0 if a.presets is not None or a.faults is not None else default_cap(a)
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
    runs_sb3 = a.scaling is None and a.stepping is None and a.startup is None and a.presets is None and a.faults is None
    if "sb3" in a.systems and runs_sb3 and importlib.util.find_spec("stable_baselines3") is None:
        log.warning('stable-baselines3 is not installed (pip install -e ".[bench]"): skipping sb3')
        a.systems = [s for s in a.systems if s != "sb3"]
    return a
