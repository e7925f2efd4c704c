"""What every algorithm is to the runner: the `Algorithm` base class and the `Peer` it is built with.

An algorithm is built as `Cls(cfg, collector, peer)`: its `algo` config section, this peer's
`p2prl.collect.Collector` (the only way it steps envs) and its `Peer`. An iteration is two calls.
`sample` steps the envs through the collector (no collective: every peer samples on its own); `learn`
updates the shared state from what was sampled (collectives, the same sequence on every peer, all of
them through what `Peer` offers: the learner, merged statistics, table sums). The runner marks the
phases, takes the collector's episodes, and sums the return window between the two calls, in the
first collective of `learn` that can carry it.

The constructor is a collective too: it makes the shared state (network parameters, Q table) identical
on every peer by broadcasting rank 0's copy (the learner and `Peer.table_sums` do).

Checkpoints (`p2prl.checkpointer`, `p2prl.resume`) are taken between iterations and hold two kinds of
state, as tensors and plain Python values only (they are loaded with `torch.load(weights_only=True)`):
- shared state, identical on every peer, written once by rank 0: `state_dict()` / `load_state_dict()`
  (the learner's optimizer and counters are saved beside it by the runner);
- per-rank state, one file per rank: the collector's (envs, observations, episodes under way), saved by
  the runner, and the algorithm's own `rank_state_dict(replay)` / `load_rank_state_dict()`: its own
  numpy generators, carry-over such as n-step windows and, when `replay` is true
  (`checkpoint.replay`), its replay buffer. The collector is restored first: `collector.continued`
  then says whether the envs continue their episodes or start fresh ones. The runner saves the global
  torch, numpy and python RNG states itself.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from p2prl.collect import Collector
from p2prl.sync.learner import Learner
from p2prl.sync.peer import Peer

__all__ = ["ActFn", "Algorithm", "Collector", "Peer", "epsilon_greedy"]


class Algorithm:
    """The runner's view of an algorithm. Subclasses keep the `collector` they were built with and
    implement the five methods that raise here; `learner` is set by those that learn by gradient (the
    runner then saves its state and watches its non-finite skips, `train.max_skipped_updates`)."""

    collector: Collector
    learner: Optional[Learner] = None

    def sample(self, progress: float) -> None:
        """Step this peer's envs through the collector for one iteration; progress in [0, 1] drives
        schedules. No collective."""
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
        """This peer's own state besides the collector's (see the module docstring); none by default.
        The keys `step`, `rank`, `world_size`, `rng`, `collector` and `learner` are the runner's."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        """Restore what `rank_state_dict` saved (after the collector's state: see `collector.continued`)."""


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
