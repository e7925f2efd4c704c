"""A model's gradients and parameters as one flat tensor each, shared by every sync strategy.

Each parameter's `.grad` is a view into one preallocated flat buffer, so backward writes straight
into the bucket: no per-step flatten/unflatten copies and exactly one collective per step, whatever
the number of parameter tensors. A few extra slots at the end carry per-step scalars (KL, losses, a
finiteness flag) that must be averaged too, for free.
"""
from __future__ import annotations

from typing import Iterable

import torch

from p2prl.comm import Communicator


class GradientBucket:
    """The flat gradient bucket of a model, and the model's parameters as one flat tensor.

    `flat_param` is a single Parameter whose storage the model's parameters are views of, and whose
    `.grad` is the gradient part of the bucket: an optimizer over [flat_param] updates the whole model
    with a handful of tensor ops instead of a handful per layer.
    """

    def __init__(self, comm: Communicator, params: Iterable[torch.nn.Parameter], n_extras: int = 0) -> None:
        self.comm = comm
        self.params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        assert len(dtypes) == 1, f"one flat bucket needs one parameter dtype, got {dtypes}"
        dtype, device = dtypes.pop(), self.params[0].device
        n = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(n + n_extras, dtype=dtype, device=device)
        self.grads = self.flat[:n]
        self.extras = self.flat[n:]
        with torch.no_grad():
            self.flat_param = torch.nn.Parameter(torch.cat([p.reshape(-1) for p in self.params]))
        self.flat_param.grad = self.grads
        offset = 0
        for p in self.params:
            k = p.numel()
            p.data = self.flat_param.data[offset:offset + k].view_as(p)
            p.grad = self.grads[offset:offset + k].view_as(p)
            offset += k

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
            self.comm.broadcast(self.flat_param.data, src)
