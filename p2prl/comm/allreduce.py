"""The default strategy: average every gradient with one flat all-reduce per optimizer step.

Each parameter's `.grad` is a view into one preallocated flat buffer, so backward writes straight
into the bucket: no per-step flatten/unflatten copies and exactly one collective per step, whatever
the number of parameter tensors. A few extra slots at the end carry per-step scalars (KL, losses)
that must be averaged too, for free.
"""
from __future__ import annotations

from typing import Iterable

import torch

from p2prl.comm.base import Communicator


class GradientAllReduce:
    def __init__(self, comm: Communicator, params: Iterable[torch.nn.Parameter], n_extras: int = 0) -> None:
        self.comm = comm
        self.params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        assert len(dtypes) == 1, f"one flat bucket needs one parameter dtype, got {dtypes}"
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + n_extras, dtype=dtypes.pop(), device=self.params[0].device)
        self.grads = self.flat[:n]
        self.extras = self.flat[n:]
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_grad(self) -> None:
        # Never optimizer.zero_grad(): set_to_none would detach .grad from the bucket.
        self.flat.zero_()

    def sync(self) -> torch.Tensor:
        """Average gradients and extras over all peers, in place; returns the averaged extras."""
        self.comm.all_reduce_mean(self.flat)
        return self.extras

    def broadcast_parameters(self, src: int = 0) -> None:
        """Copy `src`'s parameters to every peer (once at start: identical models by construction)."""
        with torch.no_grad():
            flat = torch.cat([p.reshape(-1) for p in self.params])
            self.comm.broadcast(flat, src)
            offset = 0
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
