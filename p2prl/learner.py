"""zero_grad -> backward -> sync -> clip -> step, with the sync owned by the comm strategy."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from p2prl.comm import Communicator, GradientAllReduce


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
                 make_optimizer: Callable[[list], torch.optim.Optimizer],
                 comm: Communicator, max_grad_norm: Optional[float], n_extras: int = 0) -> None:
        self.max_grad_norm = max_grad_norm
        self.n_extras = n_extras
        self.bucket = GradientAllReduce(comm, params, n_extras + 1)  # + the loss's finiteness flag
        # The optimizer sees one flat parameter (the model's parameters are views of it).
        self.optimizer = make_optimizer([self.bucket.flat_param])
        self.updates = 0
        self.skipped = 0
        self.skipped_in_a_row = 0

    def broadcast_parameters(self) -> None:
        self.bucket.broadcast_parameters()

    def backward(self, loss: torch.Tensor, extras: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Backward `loss`, then average gradients and `extras` (scalars) over the peers."""
        self.bucket.zero_grad()
        loss.backward()
        for i, x in enumerate(extras):
            self.bucket.extras[i] = x.detach()
        self.bucket.extras[self.n_extras] = loss.detach() * 0  # 0 if finite, NaN for NaN or inf
        return self.bucket.sync()[:self.n_extras]

    def apply(self) -> bool:
        """Clip and step with the averaged gradient; False (and nothing changed) if it is non-finite."""
        if not bool(torch.isfinite(self.bucket.flat).all()):
            self.skipped += 1
            self.skipped_in_a_row += 1
            return False
        self.skipped_in_a_row = 0
        if self.max_grad_norm is not None:
            grads = self.bucket.grads
            norm = float(grads.norm())
            if norm > self.max_grad_norm:
                grads.mul_(self.max_grad_norm / (norm + 1e-6))
        self.optimizer.step()
        self.updates += 1
        return True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
