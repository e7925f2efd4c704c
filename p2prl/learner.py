"""zero_grad -> backward -> sync -> clip -> step, with the sync owned by the comm strategy."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from p2prl.comm import Communicator, GradientAllReduce
from p2prl.optim import FlatOptimizer


class Learner:
    """Applies the peers' averaged gradient to a model, identically on every peer.

    `backward` leaves the averaged gradient in place and returns the averaged extras, so the caller
    can take collective decisions (KL early stop) before `apply`. A non-finite averaged gradient is
    the same on every peer (one NaN anywhere poisons the sum), so every peer skips that update alike;
    a non-finite loss rides along in the bucket as a NaN flag, so it skips the update even where its
    gradient happens to be finite. `skipped_in_a_row` (identical on every peer) lets the runner stop
    a run that only produces NaNs.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter],
                 make_optimizer: Callable[[torch.nn.Parameter], FlatOptimizer],
                 comm: Communicator, max_grad_norm: Optional[float], n_extras: int = 0) -> None:
        self.max_grad_norm = max_grad_norm
        self.n_extras = n_extras
        self.bucket = GradientAllReduce(comm, params, n_extras + 1)  # + the loss's finiteness flag
        # The optimizer sees one flat parameter (the model's parameters are views of it).
        self.optimizer = make_optimizer(self.bucket.flat_param)
        self.updates = 0
        self.skipped = 0
        self.skipped_in_a_row = 0
        self.comm = comm
        self.overlap = comm.overlap
        # comm.overlap: two send buffers, so one gradient is averaged while the next is computed.
        self._spares = [torch.zeros_like(self.bucket.flat) for _ in range(2)] if self.overlap else []
        self._pending = None
        self.last_applied = False

    def broadcast_parameters(self) -> None:
        self.bucket.broadcast_parameters()

    def _local_backward(self, loss: torch.Tensor, extras: Sequence[torch.Tensor]) -> None:
        self.bucket.zero_grad()
        loss.backward()
        for i, x in enumerate(extras):
            self.bucket.extras[i] = x.detach()
        self.bucket.extras[self.n_extras] = loss.detach() * 0  # 0 if finite, NaN for NaN or inf

    def backward(self, loss: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Backward `loss`, then average gradients and `extras` (scalars) over the peers."""
        self._local_backward(loss, extras)
        return self.bucket.sync()[:self.n_extras]

    def apply(self) -> bool:
        """Clip and step with the averaged gradient; False (and nothing changed) if it is non-finite."""
        return self._apply_flat(self.bucket.flat)

    def backward_overlapped(self, loss: torch.Tensor, extras: Sequence[torch.Tensor] = ()):
        """comm.overlap: start averaging this step's gradient, then finish and apply the previous one.

        Each gradient is thus computed one step before the update it joins (one step stale), and the
        all-reduce runs while the next minibatch's backward does. Every peer still applies the same
        averaged gradients in the same order, so parameters stay bit-identical. Returns the applied
        step's averaged extras (None on the first call); `last_applied` says whether it was finite.
        """
        self._local_backward(loss, extras)
        send = self._spares[self.updates_attempted % 2]
        send.copy_(self.bucket.flat)
        previous = self.finish()
        self._pending = self.comm.all_reduce_mean_async(send)
        return previous

    def finish(self, apply: bool = True):
        """Wait for the averaged gradient in flight (comm.overlap) and apply it unless told not to."""
        if self._pending is None:
            return None
        flat, self._pending = self._pending.wait(), None
        self.last_applied = self._apply_flat(flat) if apply else False
        return flat[self.bucket.grads.numel():][:self.n_extras].clone()

    @property
    def updates_attempted(self) -> int:
        return self.updates + self.skipped + (self._pending is not None)

    def _apply_flat(self, flat: torch.Tensor) -> bool:
        if not bool(torch.isfinite(flat).all()):
            self.skipped += 1
            self.skipped_in_a_row += 1
            return False
        self.skipped_in_a_row = 0
        grads = flat[:self.bucket.grads.numel()]
        if self.max_grad_norm is not None:
            norm = float(grads.norm())
            if norm > self.max_grad_norm:
                grads.mul_(self.max_grad_norm / (norm + 1e-6))
        param = self.bucket.flat_param
        param.grad = grads  # the averaged gradient may live in an overlap send buffer
        self.optimizer.step()
        param.grad = self.bucket.grads
        self.updates += 1
        return True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
