"""Count-weighted running mean/variance, merged across peers with the parallel-variance formula."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from p2prl.comm import Communicator


class Moments(NamedTuple):
    """Statistics of a set of vectors: count, mean (D,), and M2 (D,) = sum of squared deviations."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def moments_of(x: torch.Tensor) -> Moments:
    """Moments of x: (B, *shape), in float64."""
    d = 1
    for s in x.shape[1:]:
        d *= s
    x = x.reshape(x.shape[0], d).to(torch.float64)
    mean = x.mean(0) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64)
    return Moments(torch.tensor(float(x.shape[0]), dtype=torch.float64), mean, ((x - mean) ** 2).sum(0))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two sets (Chan et al.'s parallel algorithm)."""
    n = a.count + b.count
    if float(n) == 0.0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta ** 2 * (a.count * b.count / n)
    return Moments(n, mean, m2)


def global_moments(comm: Communicator, *local: Moments, rows: Optional[torch.Tensor] = None) -> list[Moments]:
    """Merge every peer's moments in rank order, for each argument, in one collective.

    The result is the same, bit for bit, on every peer. `rows`, a float64 (world_size, k) table in
    which each peer filled its own row, is summed in place in the same collective.
    """
    dims = [m.mean.numel() for m in local]
    width = sum(1 + 2 * d for d in dims)
    table = torch.zeros(comm.world_size, width + (0 if rows is None else rows.shape[1]), dtype=torch.float64)
    row = torch.cat([torch.cat([m.count.reshape(1), m.mean.reshape(-1), m.m2.reshape(-1)]) for m in local])
    table[comm.rank, :width] = row
    if rows is not None:
        table[:, width:] = rows
    comm.all_reduce_sum(table)  # rows are disjoint: a sum is an all-gather
    if rows is not None:
        rows.copy_(table[:, width:])
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


class RunningNormalizer:
    """Normalizes inputs with running statistics that every peer updates identically.

    Every peer must `update` with the same globally merged moments, so the statistics never diverge.
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8,
                 center: bool = True) -> None:
        d = 1
        for s in shape:
            d *= s
        self.shape, self.clip, self.eps, self.center = shape, clip, eps, center
        self.stats = Moments(torch.tensor(0.0, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                             torch.zeros(d, dtype=torch.float64))
        self._refresh()

    def _refresh(self) -> None:
        n = float(self.stats.count)
        var = self.stats.m2 / n if n > 0 else torch.ones_like(self.stats.m2)
        self.mean = self.stats.mean.to(torch.float32).reshape(self.shape)
        self.std = torch.sqrt(var + self.eps).to(torch.float32).reshape(self.shape)

    def update(self, batch: Moments) -> None:
        """Fold a batch's (already peer-merged, see `global_moments`) moments into the statistics."""
        self.stats = merge_moments(self.stats, batch)
        self._refresh()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.mean) / self.std if self.center else x / self.std
        return y.clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"count": self.stats.count, "mean": self.stats.mean, "m2": self.stats.m2}

    def load_state_dict(self, state: dict) -> None:
        self.stats = Moments(state["count"], state["mean"], state["m2"])
        self._refresh()
