"""The tasks of `p2prl.bench` (the default mode's), and how each system runs one: p2prl's overrides
(`goal`, `split_overrides`) and the SB3 worker's options (`sb3_goal`). Pure functions of the options."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Task:
    algo: str
    env: str      # p2prl's env preset
    gym_id: str   # the same env for SB3
    target: Optional[float]  # None: a fixed step budget, the return reached at its end is the result
    budget: Optional[int] = None  # global steps of a fixed-budget task (--budget overrides)
    extra: str = ""  # the extra it needs
    # A fixed-budget task with a target: every system runs the whole budget; the target's first
    # crossing (training return window) is noted, not stopped at.
    watch: bool = False
    eval_every: Optional[int] = None  # global steps between greedy evaluations (10 episodes), also at the end
    # (global batch, updates per global env step) every system runs at: on n peers of 1 env each,
    # batch/n per peer and n x updates per vector step (SB3: 1 env, the zoo's own).
    split: Optional[tuple[int, int]] = None

    @property
    def fixed(self) -> bool:
        """Whether it runs a fixed budget (its target, if any, only watched)."""
        return self.target is None or self.watch


ATARI_BUDGETS = {"ppo": 100_000, "dqn": 150_000}  # global steps of a pixels run here (DQN's first 80k only act)
TASKS = {
    "cartpole-ppo": Task("ppo", "cartpole", "CartPole-v1", 475),
    "cartpole-dqn": Task("dqn", "cartpole", "CartPole-v1", 475),
    "lunarlander-ppo": Task("ppo", "lunarlander", "LunarLander-v3", 200, extra="box2d"),
    "lunarlander-dqn": Task("dqn", "lunarlander", "LunarLander-v3", 200, extra="box2d"),
    # From pixels; DQN's first 80k steps (learning_starts) only act, so its budget goes beyond them.
    "breakout-ppo": Task("ppo", "breakout", "BreakoutNoFrameskip-v4", None, ATARI_BUDGETS["ppo"], "atari"),
    "breakout-dqn": Task("dqn", "breakout", "BreakoutNoFrameskip-v4", None, ATARI_BUDGETS["dqn"], "atari"),
    # MuJoCo: the zoo's budget; the mean return at its end is the result.
    "halfcheetah-ppo": Task("ppo", "halfcheetah", "HalfCheetah-v5", None, 1_000_000, "mujoco"),
    # SAC at the zoo's global batch (256) and one update per env step on every system: greedy return at
    # the budget, steps/s, and when the training return first reached the target. p2prl runs its preset's
    # other settings (Hopper's: CleanRL's learning rates and 5k warm-up steps), SB3 the zoo's.
    "pendulum-sac": Task("sac", "pendulum", "Pendulum-v1", -200, 20_000, watch=True, eval_every=2_000,
                         split=(256, 1)),
    "halfcheetah-sac": Task("sac", "halfcheetah", "HalfCheetah-v5", 2_500, 100_000, "mujoco", watch=True,
                            eval_every=10_000, split=(256, 1)),
    "hopper-sac": Task("sac", "hopper", "Hopper-v5", 1_500, 150_000, "mujoco", watch=True, eval_every=15_000,
                       split=(256, 1)),
    "halfcheetah-td3": Task("td3", "halfcheetah", "HalfCheetah-v5", 2_500, 100_000, "mujoco", watch=True,
                            eval_every=10_000, split=(256, 1)),
}
HORIZON = 10_000_000  # the Atari presets' (and the zoo's) budget, over which their schedules run


def budget_overrides(algo: str, budget: int) -> list[str]:
    """A fixed budget cut from a 10M-step run: the schedules as the SB3 side pins them to the horizon
    (p2prl.bench.sb3.model_kwargs): PPO's learning rate nearly constant over the first budget steps,
    DQN's exploration decaying over min(1, 0.1 x 10M / budget) of the budget. SAC's and TD3's MuJoCo
    settings have no schedule."""
    if algo == "ppo":
        return ["algo.anneal_lr=false"]
    if algo == "dqn":
        return [f"algo.exploration_fraction={min(1.0, 0.1 * HORIZON / budget)}"]
    return []


def goal(t: Task, a: argparse.Namespace) -> list[str]:
    """The p2prl overrides that say when a run of task `t` ends: its target, or its fixed budget (then
    rows every 1% of it, for the watched target's crossing, and its greedy evaluations)."""
    target = t.target if a.target is None else a.target
    if target is not None and not t.watch:
        return [f"train.target_return={target}"]
    budget = a.budget or t.budget
    every = [f"train.eval_every_steps={t.eval_every}", "train.eval_episodes=10"] if t.eval_every else []
    rows = [f"train.log_every_steps={max(1, budget // 100)}"] if t.watch else []
    return ["train.target_return=null", f"train.total_steps={budget}", *budget_overrides(t.algo, budget), *rows,
            *every]


def split_overrides(t: Task, peers: int) -> list[str]:
    """Task `t`'s global batch and update-to-data ratio on `peers` peers of one env each."""
    if t.split is None:
        return []
    batch, ratio = t.split
    return ["algo.num_envs=1", "algo.train_freq=1", f"algo.batch_size={batch // peers}",
            f"algo.gradient_steps={ratio * peers}"]


def sb3_goal(t: Task, a: argparse.Namespace) -> list[str]:
    """The SB3 worker's options for task `t`: its target (stopping or watched) and its evaluations."""
    target = t.target if a.target is None else a.target
    out = [] if target is None else ["--watch" if t.watch else "--target", str(target)]
    return out + (["--eval-every", str(t.eval_every)] if t.eval_every else [])
