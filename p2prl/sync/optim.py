"""Adam and RMSprop for the learner's one flat parameter, in named segments with learning rates of their own.

The learner's optimizer only ever sees one flat tensor, so its update is a handful of in-place ops on
preallocated buffers. The arithmetic is torch.optim's (Adam: bias-corrected, eps added after the
square root; RMSprop: no momentum, not centered), checked against it in tests. Two reasons not to use
torch.optim here: building any torch.optim optimizer imports torch._dynamo (about a second of start-up
on every peer), and its per-step bookkeeping costs more than the arithmetic for small models.

Parameter groups are consecutive segments of the flat parameter (SAC's [actor | critics | log_alpha]),
each with its own learning rate and step count, as torch.optim's groups or separate optimizers would
have. `step(skip=...)` leaves the named segments alone, moments and bias correction included (TD3's
actor on the updates that do not train it): exactly as if their own optimizer had not been stepped.
Segments that step alike (same learning rate, same step count) run as one span, so one group costs
what an ungrouped optimizer costs.
"""
from __future__ import annotations

import math
from typing import Collection, Optional, Sequence

import torch

Group = tuple[str, int, float]  # (name, number of elements, learning rate), in the flat parameter's order


class FlatOptimizer:
    """Base: one parameter in `groups` (default: one group "all"); `param_groups[i]["lr"]` settable
    like torch.optim's; state_dict round-trip."""

    def __init__(self, param: torch.Tensor, lr: float, groups: Optional[Sequence[Group]] = None) -> None:
        self.param = param
        groups = groups if groups is not None else [("all", param.numel(), lr)]
        assert sum(n for _, n, _ in groups) == param.numel(), "the groups must cover the flat parameter exactly"
        self.param_groups: list[dict] = []
        start = 0
        for name, n, group_lr in groups:
            self.param_groups.append({"name": name, "lr": float(group_lr), "start": start, "stop": start + n,
                                      "step": 0})
            start += n
        self._buf = torch.empty_like(param)

    @property
    def step_count(self) -> int:
        """The first group's steps (every group's, unless some were skipped)."""
        return self.param_groups[0]["step"]

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update(self, span: slice, lr: float, step: int) -> None:
        """One step of the elements in `span`, the `step`-th of their group(s)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, skip: Collection[str] = ()) -> None:
        """Step every group but those named in `skip`."""
        spans: list[list] = []  # [start, stop, lr, step]: adjacent groups that step alike, merged
        for g in self.param_groups:
            if g["name"] in skip:
                continue
            g["step"] += 1
            last = spans[-1] if spans else None
            if last is not None and last[1] == g["start"] and last[2] == g["lr"] and last[3] == g["step"]:
                last[1] = g["stop"]
            else:
                spans.append([g["start"], g["stop"], g["lr"], g["step"]])
        for start, stop, lr, step in spans:
            self._update(slice(start, stop), lr, step)

    def state_dict(self) -> dict:
        # "step" and "lr": the first group's, as checkpoints written before groups existed hold them.
        return {"step": self.step_count, "lr": self.param_groups[0]["lr"],
                "steps": [g["step"] for g in self.param_groups], "lrs": [g["lr"] for g in self.param_groups],
                **{k: v.clone() for k, v in self._state().items()}}

    def load_state_dict(self, state: dict) -> None:
        n = len(self.param_groups)
        steps = state.get("steps", [int(state["step"])] * n)
        lrs = state.get("lrs", [float(state["lr"])] * n)
        assert len(steps) == n, f"a state of {len(steps)} parameter groups for an optimizer of {n}"
        for g, step, lr in zip(self.param_groups, steps, lrs):
            g["step"], g["lr"] = int(step), float(lr)
        for k, v in self._state().items():
            v.copy_(state[k])


class FlatAdam(FlatOptimizer):
    """`fused`: torch's fused Adam kernel (`torch.optim.Adam(fused=True)`'s), one pass over a span
    instead of seven: about 3x faster on the Nature CNN's 1.7M parameters. It rounds differently (fused
    multiply-adds), so models whose runs reproduce bit for bit across p2prl versions (MLPs) keep the
    op-by-op arithmetic."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, groups: Optional[Sequence[Group]] = None, fused: bool = False) -> None:
        super().__init__(param, lr, groups)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self._fused_step = torch.zeros((), device=param.device) if fused else None  # the kernel reads it

    def _state(self) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def _update(self, span: slice, lr: float, step: int) -> None:
        grad, exp_avg, exp_avg_sq = self.param.grad[span], self.exp_avg[span], self.exp_avg_sq[span]
        if self._fused_step is not None:  # a span of the flat parameter is a contiguous view: updated in place
            self._fused_step.fill_(step)
            torch._fused_adam_([self.param[span]], [grad], [exp_avg], [exp_avg_sq], [], [self._fused_step],
                               lr=lr, beta1=self.beta1, beta2=self.beta2, weight_decay=0.0, eps=self.eps,
                               amsgrad=False, maximize=False)
            return
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = lr / (1 - self.beta1 ** step)
        denom = torch.sqrt(exp_avg_sq, out=self._buf[span])
        denom.div_(math.sqrt(1 - self.beta2 ** step)).add_(self.eps)
        self.param[span].addcdiv_(exp_avg, denom, value=-step_size)


class FlatRMSprop(FlatOptimizer):
    def __init__(self, param: torch.Tensor, lr: float, alpha: float = 0.99, eps: float = 1e-8,
                 groups: Optional[Sequence[Group]] = None) -> None:
        super().__init__(param, lr, groups)
        self.alpha, self.eps = alpha, eps
        self.square_avg = torch.zeros_like(param)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"square_avg": self.square_avg}

    def _update(self, span: slice, lr: float, step: int) -> None:
        grad, square_avg = self.param.grad[span], self.square_avg[span]
        square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
        avg = torch.sqrt(square_avg, out=self._buf[span]).add_(self.eps)
        self.param[span].addcdiv_(grad, avg, value=-lr)


class FlatSGD(FlatOptimizer):
    """Plain SGD, p <- p - lr * g (what the strategies' equivalences are stated for)."""

    def _state(self) -> dict[str, torch.Tensor]:
        return {}

    def _update(self, span: slice, lr: float, step: int) -> None:
        self.param[span].add_(self.param.grad[span], alpha=-lr)
