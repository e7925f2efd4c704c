"""A peer as an algorithm sees it (`p2prl.algos.base`): its place in the run and the ways it shares
with the other peers, all of them in this package, so that no algorithm holds the communicator."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

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
                terms: Sequence[str], gates: Optional[Mapping[str, str]] = None) -> Learner:
        """The learner that averages this model's gradients over the peers (see p2prl.sync.learner);
        it broadcasts rank 0's parameters first. `gates`: optimizer groups that step only where a term
        is not 0."""
        return Learner(params, optimizer, self._comm, max_grad_norm, terms, sync=self.sync, clock=self.clock,
                       gates=gates)

    def moments(self, *local: Moments) -> list[Moments]:
        """Every peer's moments merged, for each argument, in one collective (bit-identical everywhere)."""
        return global_moments(self._comm, *local)

    def table_sums(self, shared: torch.Tensor, width: int) -> TableSums:
        """`shared` made rank 0's on every peer, and a buffer of `width` float64 values to sum over peers."""
        return TableSums(self._comm, shared, width)
