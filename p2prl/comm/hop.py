"""The hop of a sum whose bytes cross the network: the collectives a compression may use on it.

`Communicator.all_reduce_sum_across(tensor, across)` sums over every peer and hands the part of the sum
that crosses links to `across(hop, part)`: all peers in a flat layout, the nodes' leaders (each with
its node's exact sum) in a hierarchical one. What a peer's node sums through shared memory never reaches
a hop: those bytes cross no link. `across` must leave in `part` the sum over the hop's members of what
each contributed (compressed as it likes) and the same bytes on every member: the hop's collectives
give every member the same result, so decoding it alike in member order does.

torch.distributed stays here: a compression in `p2prl.sync` sees only `rank`, `size`, `all_reduce_sum`
and `all_gather`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


class Hop:
    """The members of one sum's network hop, in member order (ascending global rank).

    `rank`: this peer's position among them; `size`: how many; `bytes`: what this peer has handed to
    the hop's collectives so far (for the communicator's accounting).
    """

    def __init__(self, rank: int, size: int, group: Any, run: Callable[[Callable, torch.Tensor], None]) -> None:
        self.rank, self.size, self.group = rank, size, group
        self._run = run  # the communicator's: device round trip, failures named with the peer and phase
        self.bytes = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the hop's members, in place (the same bytes on every member); returns it."""
        self.bytes += tensor.numel() * tensor.element_size()
        if self.size > 1:
            self._run(lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True), tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every member's `tensor` (same shape and dtype on every member): (size, *tensor.shape), row i
        member i's."""
        self.bytes += tensor.numel() * tensor.element_size()
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        if self.size == 1:
            out[0].copy_(tensor)
            return out
        rows = list(out.unbind(0))
        self._run(lambda t: dist.all_gather(rows, t, group=self.group, async_op=True), tensor)
        return out


class LocalHop(Hop):
    """A hop of one member (for tests and a world of one): sums and gathers leave the tensor as it is."""

    def __init__(self) -> None:
        super().__init__(0, 1, None, lambda start, t: None)
