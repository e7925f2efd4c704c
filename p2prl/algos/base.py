"""What every algorithm is to the runner: the `Algorithm` base class and what it is built with.

An iteration is two calls. `sample` steps this peer's envs (no collective: every peer samples on its
own); `learn` updates the shared state from what was sampled (collectives, the same sequence on every
peer). The runner sums the return window's episodes between the two, in the first collective of
`learn` that can carry them (`Communicator.sum_with_next`).

The constructor is a collective too: it makes the shared state (network parameters, Q table) identical
on every peer by broadcasting rank 0's copy.

Checkpoints (`p2prl.resume`) are taken between iterations and hold two kinds of state, as tensors and
plain Python values only (they are loaded with `torch.load(weights_only=True)`):
- shared state, identical on every peer, written once by rank 0: `state_dict()` / `load_state_dict()`
  (the learner's optimizer and counters are saved beside it by the runner);
- per-rank state, one file per rank: `rank_state_dict(replay)` / `load_rank_state_dict()`: the
  algorithm's envs (`p2prl.envstate.vec_env_state`), sampler carry-over, its own numpy generators and, when
  `replay` is true (`checkpoint.replay`), its replay buffer. The runner saves the global torch, numpy
  and python RNG states itself. Without them the per-rank state restarts from the seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch

from p2prl.comm import Communicator
from p2prl.config import CommConfig
from p2prl.metrics import Episode
from p2prl.preemption import Preemption
from p2prl.seeding import peer_rng
from p2prl.sync.learner import Learner
from p2prl.sync.optim import FlatOptimizer


class Sample(NamedTuple):
    """What `Algorithm.sample` did on this peer."""

    steps: int  # local env steps (num_envs x vector steps)
    episodes: list[Episode]  # episodes that finished meanwhile


@dataclass(frozen=True)
class Peer:
    """What an algorithm is built with besides its config and envs: this peer's place in the run."""

    comm: Communicator
    seed: int  # the run's seed
    sync: CommConfig  # how the learner shares its updates (comm.strategy and its settings)
    preempt: Optional[Preemption] = None  # comm.straggler_frac: when to cut a rollout short

    def rng(self, purpose: str) -> np.random.Generator:
        """This peer's own numpy stream for `purpose` (see p2prl.seeding)."""
        return peer_rng(self.seed, self.comm.rank, purpose)

    def learner(self, params: Sequence[torch.nn.Parameter],
                optimizer: Callable[[torch.nn.Parameter], FlatOptimizer], max_grad_norm: Optional[float],
                terms: Sequence[str]) -> Learner:
        """The learner that averages this model's gradients over the peers (see p2prl.sync.learner)."""
        return Learner(params, optimizer, self.comm, max_grad_norm, terms, sync=self.sync)


class Algorithm:
    """The runner's view of an algorithm. Subclasses set `num_envs` and `envs` (what they were built
    with; the runner closes them at the end) and implement the five methods that raise here; `learner`
    is set by those that learn by gradient (the runner then saves its state and watches its non-finite
    skips, `train.max_skipped_updates`)."""

    num_envs: int  # envs per peer: one vector step = num_envs local env steps
    envs: "gym.vector.VectorEnv"
    learner: Optional[Learner] = None

    def sample(self, progress: float) -> Sample:
        """Step this peer's envs for one iteration; progress in [0, 1] drives schedules. No collective."""
        raise NotImplementedError

    def learn(self, progress: float) -> dict[str, float]:
        """Update the shared state from the sample (a collective); scalars for metrics.jsonl."""
        raise NotImplementedError

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be bit-identical on every peer (checked every comm.check_every)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Shared state for rank 0's checkpoint: tensors and plain values. The keys `step`, `iteration`,
        `time_s`, `world_size`, `config`, `config_hash`, `return_window` and `learner` are the runner's;
        a tabular algorithm stores its table under `q_table`."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def rank_state_dict(self, replay: bool) -> dict:
        """This peer's own state (see the module docstring); none by default."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        """Restore what `rank_state_dict` saved."""


def sampler_state(envs, obs: np.ndarray, next_valid: np.ndarray, episodes, rng: np.random.Generator) -> dict:
    """Per-rank carry-over of a numpy sampler (DQN, Q-learning): its envs, last observation, reset
    flags, episode accumulators and exploration generator, as tensors and plain values."""
    from p2prl.envstate import vec_env_state
    return {"env": vec_env_state(envs), "obs": torch.from_numpy(obs.copy()),
            "next_valid": torch.from_numpy(next_valid.copy()), "episodes": episodes.state_dict(),
            "explore_rng": rng.bit_generator.state}


def load_sampler_state(envs, episodes, rng: np.random.Generator, s: dict) -> tuple[np.ndarray, np.ndarray]:
    """Restore what `sampler_state` saved into envs, episodes and rng; returns (obs, next_valid)."""
    from p2prl.envstate import load_vec_env_state
    load_vec_env_state(envs, s["env"])
    episodes.load_state_dict(s["episodes"])
    rng.bit_generator.state = s["explore_rng"]
    return s["obs"].numpy().copy(), s["next_valid"].numpy().copy()


# What a checkpoint's policy is to p2prl.policy: a batch of observations (B, *obs_shape) ->
# actions (B, *action_shape); `deterministic` False samples (with the generator) as the algorithm
# explores, True takes its greedy action.
ActFn = Callable[[np.ndarray, bool, np.random.Generator], np.ndarray]


def epsilon_greedy(values: np.ndarray, deterministic: bool, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Actions (B,) from action values (B, A): the argmax (ties to the lowest index); unless
    `deterministic`, a uniformly random action instead with probability `epsilon`."""
    greedy = values.argmax(1)
    if deterministic:
        return greedy
    explore = rng.random(len(greedy)) < epsilon
    return np.where(explore, rng.integers(0, values.shape[1], len(greedy)), greedy)
