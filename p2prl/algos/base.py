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

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from p2prl.collect import Collector
from p2prl.comm import Communicator
from p2prl.config import CommConfig
from p2prl.normalize import Moments
from p2prl.seeding import peer_rng
from p2prl.sync.learner import Learner
from p2prl.sync.optim import FlatOptimizer
from p2prl.sync.stats import TableSums, global_moments
from p2prl.timing import Stopwatch


class Peer:
    """This peer's place in the run, as an algorithm sees it: rank, world size, device, its random
    streams, its stopwatch, and the ways it shares with the other peers. It gives no communicator:
    every collective an algorithm makes is the learner's, `moments` or `table_sums`."""

    def __init__(self, comm: Communicator, seed: int, sync: CommConfig, clock: Optional[Stopwatch] = None) -> None:
        self._comm, self.seed, self.sync = comm, seed, sync  # sync: comm.strategy and its settings
        self.clock = clock if clock is not None else Stopwatch(comm)  # `with peer.clock("inference"): ...`

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def device(self) -> torch.device:
        return self._comm.device

    def rng(self, purpose: str) -> np.random.Generator:
        """This peer's own numpy stream for `purpose` (see p2prl.seeding)."""
        return peer_rng(self.seed, self.rank, purpose)

    def learner(self, params: Sequence[torch.nn.Parameter],
                optimizer: Callable[[torch.nn.Parameter], FlatOptimizer], max_grad_norm: Optional[float],
                terms: Sequence[str]) -> Learner:
        """The learner that averages this model's gradients over the peers (see p2prl.sync.learner);
        it broadcasts rank 0's parameters first."""
        return Learner(params, optimizer, self._comm, max_grad_norm, terms, sync=self.sync, clock=self.clock)

    def moments(self, *local: Moments) -> list[Moments]:
        """Every peer's moments merged, for each argument, in one collective (bit-identical everywhere)."""
        return global_moments(self._comm, *local)

    def table_sums(self, shared: torch.Tensor, width: int) -> TableSums:
        """`shared` made rank 0's on every peer, and a buffer of `width` float64 values to sum over peers."""
        return TableSums(self._comm, shared, width)


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
