"""Algorithms, built by `algo.name` (see `p2prl.runner.build_algorithm`).

Every algorithm implements the `Algorithm` protocol below. Its constructor is a collective: it makes
the shared state (network parameters, Q table) identical on every peer by broadcasting rank 0's copy.

Checkpoints (see `p2prl.resume`) are taken between iterations and hold two kinds of state, both as
tensors and plain Python values only (they are loaded with `torch.load(weights_only=True)`):
- shared state, identical on every peer, written once by rank 0: `state_dict()` / `load_state_dict()`;
- per-rank state, different on every peer, one file per rank: the optional `rank_state_dict(replay)`
  / `load_rank_state_dict()`. The runner saves the global torch/numpy/python RNG states itself; the
  algorithm adds what else it owns: its envs (`p2prl.envs.vec_env_state`), sampler carry-over
  (next observation, episode accumulators), its own `np.random.Generator`s (`bit_generator.state`
  is a plain dict), and its replay buffer when `replay` is true (`checkpoint.replay`).
An algorithm without the optional methods still checkpoints and resumes its shared state; its
per-rank state then restarts from the seeds. One that learns by gradient exposes its `Learner` as
`learner`, whose non-finite skip counters the runner watches (`train.max_skipped_updates`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol

import torch

from p2prl.metrics import Episode


class IterationResult(NamedTuple):
    """What one iteration of an algorithm did on this peer."""

    steps: int  # local env steps (num_envs x vector steps)
    episodes: list[Episode]  # episodes that finished during the iteration
    logs: dict  # scalars for metrics.jsonl (already averaged over peers where it matters)
    # The return window's episode table, already summed over peers when the algorithm carried it in a
    # collective of its own (see `Algorithm.iteration`); None: the runner sums it separately.
    episode_table: Optional[torch.Tensor] = None


# Builds this peer's row of the return window's episode table from the iteration's episodes.
EpisodeTable = Callable[[list[Episode]], torch.Tensor]


class Algorithm(Protocol):
    num_envs: int  # envs per peer: one vector step = num_envs local env steps

    def iteration(self, progress: float, episode_table: Optional[EpisodeTable] = None) -> IterationResult:
        """Sample and learn for one iteration (a collective); progress in [0, 1] drives schedules.

        An algorithm that sums small statistics over peers after sampling anyway may sum the return
        window's table in the same collective: call `episode_table(episodes)` and return the summed
        table in the result. Otherwise it ignores the argument (one collective more per iteration).
        """

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be bit-identical on every peer (checked every comm.check_every)."""

    def state_dict(self) -> dict:
        """Rank 0's checkpoint contents: tensors and plain values only (loaded with weights_only).

        Keys `step`, `iteration`, `time_s`, `world_size`, `config`, `config_hash` and `return_window`
        are the runner's. A tabular algorithm stores its table under `q_table`.
        """

    def load_state_dict(self, state: dict) -> None:
        """Restore the shared state on every peer (from rank 0's file; extra keys are the runner's)."""

    # Optional (the runner uses them when present):
    # def rank_state_dict(self, replay: bool) -> dict: this peer's own state (see the module docstring)
    # def load_rank_state_dict(self, state: dict) -> None
    # learner: p2prl.learner.Learner


def sampler_state(algo) -> dict:
    """Per-rank carry-over of a numpy sampler (DQN, Q-learning): its envs, last observation, reset
    flags, episode accumulators and exploration RNG, as tensors and plain values."""
    from p2prl.envs import vec_env_state
    return {"env": vec_env_state(algo.envs), "obs": torch.from_numpy(algo.obs.copy()),
            "next_valid": torch.from_numpy(algo.next_valid.copy()), "episodes": algo.episodes.state_dict(),
            "rng": algo.rng.bit_generator.state}


def load_sampler_state(algo, s: dict) -> None:
    """Restore what `sampler_state` saved."""
    from p2prl.envs import load_vec_env_state
    load_vec_env_state(algo.envs, s["env"])
    algo.obs = s["obs"].numpy().copy()
    algo.next_valid = s["next_valid"].numpy().copy()
    algo.episodes.load_state_dict(s["episodes"])
    algo.rng.bit_generator.state = s["rng"]
