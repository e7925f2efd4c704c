"""What algorithms share with the other peers besides gradients: statistics merged over all peers
(normalizers, advantages) and exact table sums (tabular Q-learning). Algorithms reach them through
their `Peer` (`peer.moments`, `peer.table_sums`), never through the communicator, so each collective
they make is one of these or the learner's; every peer must call them at the same points.
"""
from __future__ import annotations

import numpy as np
import torch

from p2prl.comm import Communicator
from p2prl.normalize import Moments, merge_moments


def global_moments(comm: Communicator, *local: Moments) -> list[Moments]:
    """Merge every peer's moments in rank order, for each argument, in one collective.

    The result is the same, bit for bit, on every peer.
    """
    dims = [m.mean.numel() for m in local]
    width = sum(1 + 2 * d for d in dims)
    table = torch.zeros(comm.world_size, width, dtype=torch.float64)
    table[comm.rank] = torch.cat([torch.cat([m.count.reshape(1), m.mean.reshape(-1), m.m2.reshape(-1)])
                                  for m in local])
    comm.all_reduce_sum(table)  # rows are disjoint: a sum is an all-gather
    out = []
    offset = 0
    for d in dims:
        block = table[:, offset:offset + 1 + 2 * d]
        offset += 1 + 2 * d
        merged = Moments(block[0, 0], block[0, 1:1 + d], block[0, 1 + d:])
        for r in range(1, comm.world_size):
            merged = merge_moments(merged, Moments(block[r, 0], block[r, 1:1 + d], block[r, 1 + d:]))
        out.append(merged)
    return out


class TableSums:
    """A float64 table identical on every peer, and a buffer of `width` float64 values summed over
    the peers in one collective per `sum()`.

    `shared` (a tensor, possibly a view of a numpy table) is overwritten with rank 0's copy when this is
    built, so every peer starts from the same table. Sums of float64 counts and of the same deltas in
    the same order are bit-identical on every peer, so tables updated from them stay identical.
    """

    def __init__(self, comm: Communicator, shared: torch.Tensor, width: int) -> None:
        self.comm = comm
        comm.broadcast(shared, src=0)
        self.tensor = torch.zeros(width, dtype=torch.float64)
        self.buffer: np.ndarray = self.tensor.numpy()  # a view: filling it fills what is summed

    def sum(self) -> np.ndarray:
        """Sum `buffer` over all peers, in place; returns it."""
        self.comm.all_reduce_sum(self.tensor)
        return self.buffer
