"""Greedy evaluation during training (`train.eval_every_steps`), as SB3's EvalCallback does.

At the first iteration boundary past every multiple of `train.eval_every_steps` global steps, the
peers play `train.eval_episodes` greedy episodes on envs of their own, apart from training's. The
episodes are split over the peers rather than left to rank 0, so no peer idles in a collective while
another plays them all: episode i, seeded EVAL_SEED + i as `python -m p2prl.evaluate` seeds its
episodes, is rank (i mod N)'s, and one sum gathers the returns. So the result depends neither on the
number of peers nor on which played what, and `evaluate --checkpoint best --episodes E` replays the
evaluation that kept best.pt. The policy is the shared one: where the peers' parameters differ
(local_sgd, gossip) their mean, as the checkpoints hold (p2prl.resume). Every peer takes the same
collectives (that mean, then the sum) at the same global steps, so none waits for one that another
skipped. The peers wait for each other only at that sum, for at most `comm.timeout_s`: evaluations of
long episodes (Atari games) on few peers may need a larger `comm.timeout_s`.

An evaluation draws nothing from training's random streams (its policy is built with the torch RNG
forked, its episodes are seeded), so a run trains the same with or without it. The evaluation's rows
(`eval_return_mean`, `eval_return_std`) go into metrics.jsonl and TensorBoard; rank 0 also writes
checkpoints/best.pt whenever the mean beats every earlier evaluation of the run (of an interrupted
attempt too, when the run resumes): the shared checkpoint of that step plus `eval` (its step, return
mean and std, episodes, first seed and every episode's return).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from p2prl import checkpoint
from p2prl.comm import Communicator
from p2prl.config import RunConfig
from p2prl.envs import make_single_env
from p2prl.policy import BEST, EVAL_SEED, Policy, run_episodes
from p2prl.checkpointer import Checkpointer
from p2prl.resume import Progress

log = logging.getLogger(__name__)


def best_return(path) -> Optional[float]:
    """The evaluation return best.pt was kept for (None: no readable best.pt)."""
    state = checkpoint.load(path, mmap=True, warn=False)
    return None if state is None or "eval" not in state else float(state["eval"]["return_mean"])


class PeriodicEval:
    """Built on every peer (the eval env is each peer's own); off when `train.eval_every_steps` is
    null or 0. `resumed`: the run continues an earlier attempt, whose best.pt stays the one to beat."""

    def __init__(self, cfg: RunConfig, comm: Communicator, saver: Checkpointer, resumed: bool) -> None:
        self.cfg, self.comm, self.saver = cfg, comm, saver
        self.every, self.episodes = cfg.train.eval_every_steps or None, cfg.train.eval_episodes
        self.env = make_single_env(cfg.env) if self.every else None
        self.path = saver.folder / BEST
        known = best_return(self.path) if self.every and resumed and comm.rank == 0 else None
        # A fresh start finds no best.pt: an earlier run's moved to previous/ with its checkpoints (p2prl.rundir).
        self.best = -math.inf if known is None else known

    def due(self, start_step: int, step: int) -> bool:
        """Whether the iteration from `start_step` to `step` crossed a multiple of eval_every_steps (the
        same on every peer: both counters are global)."""
        return self.every is not None and step // self.every > start_step // self.every

    def __call__(self, p: Progress) -> dict[str, float]:
        """Evaluate the shared policy (a collective); the metrics row's eval keys."""
        comm = self.comm
        state = self.saver.shared_state(p)
        with torch.random.fork_rng(devices=[]):  # a new model's initialisation must not move training's stream
            policy = Policy(self.cfg, state, self.env.observation_space, self.env.action_space, device=comm.device)
        returns = torch.zeros(self.episodes, dtype=torch.float64)
        for i in range(comm.rank, self.episodes, comm.world_size):
            returns[i] = run_episodes(self.env, policy, 1, EVAL_SEED + i)[0]
        comm.all_reduce_sum(returns)  # each episode is one peer's: the sum gathers them
        mean, std = float(returns.mean()), float(returns.std(correction=0))
        if comm.rank == 0 and mean > self.best:
            self.best = mean
            info = {"step": p.step, "return_mean": mean, "return_std": std, "episodes": self.episodes,
                    "seed": EVAL_SEED, "returns": returns.tolist()}
            checkpoint.save_atomic({**state, "eval": info}, self.path)
            log.info("evaluation at step %d: new best mean return %.2f (%s)", p.step, mean, self.path)
        return {"eval_return_mean": mean, "eval_return_std": std}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
