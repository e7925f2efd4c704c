"""Local SGD, and DiLoCo's outer optimizer on top of it.

Every peer applies its own gradient with its own optimizer; the named terms and the finiteness flag
are shared once per iteration (`p2prl.sync.base._local_terms`; every update where a veto such as PPO's
KL stop needs them, a small all-reduce). Every `comm.average_every`
updates the peers average their parameters. With `comm.outer_lr != 1` or `comm.outer_momentum > 0`
the average goes through an outer optimizer instead (DiLoCo): the pseudo-gradient
delta = anchor - mean(params) (anchor: the parameters after the previous average) takes a Nesterov
momentum step, v <- mu v + delta, params <- anchor - outer_lr (delta + mu v), on every peer alike.
outer_lr=1 and outer_momentum=0 is plain parameter averaging.

With `comm.compress` the average travels as each peer's pseudo-gradient delta_i = anchor - params_i,
compressed (`p2prl.sync.compress`, error feedback per peer): every peer then sets its parameters from
the same anchor and the same averaged delta, so they are identical after every average, as without
compression. The anchor is kept for plain averaging too (params <- anchor - mean(delta)).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from p2prl.sync.base import Apply, Follow, Link, Strategy, _local_terms
from p2prl.sync.compress import make_compression


class LocalSGD(Strategy):
    differs = True
    local = True
    keys = ("average_every", "outer_lr", "outer_momentum", "compress")

    @classmethod
    def period(cls, settings: Mapping[str, Any]) -> int:
        return settings["average_every"]

    @classmethod
    def predict(cls, link: Link, n: int, nbytes: float, settings: Mapping[str, Any]) -> float:
        # with the terms shared every update (a veto; the bench times it so): without one, drop terms(n)
        return link.allreduce(nbytes, n) / settings["average_every"] + link.terms(n)

    def __init__(self, comm, cfg, bucket) -> None:
        super().__init__(comm, cfg, bucket)
        self.calls = 0  # identical on every peer
        self.outer = cfg.outer_lr != 1.0 or cfg.outer_momentum > 0
        param = bucket.flat_param.detach()
        self.compress = make_compression(cfg, bucket.params, 0, param) if cfg.compress != "none" else None
        self.anchor = param.clone() if self.outer or self.compress is not None else None
        self.momentum = torch.zeros_like(param) if self.outer else None

    def step(self, apply: Apply, follow: Follow, veto: Any) -> Optional[Any]:
        update = _local_terms(self, apply, veto)
        if self.counting:  # the last part of an update in parts counts it
            self.calls += 1
            if self.calls % self.cfg.average_every == 0:
                self.sync()
        return update

    @torch.no_grad()
    def sync(self) -> None:
        """Average the peers' parameters (through the outer optimizer, if any); a collective."""
        param = self.bucket.flat_param.data
        if self.compress is None:
            mean = self.comm.all_reduce_mean(param.clone())
            if not self.outer:
                param.copy_(mean)
                return
            delta = self.anchor - mean
        else:
            delta = self.anchor - param
            self.compress.mean(self.comm, delta)
        if self.outer:
            mu = self.cfg.outer_momentum
            self.momentum.mul_(mu).add_(delta)
            param.copy_(self.anchor - self.cfg.outer_lr * (delta + mu * self.momentum))
        else:
            param.copy_(self.anchor - delta)
        self.anchor.copy_(param)

    def state_dict(self) -> dict:
        s = {"calls": self.calls}
        if self.anchor is not None:
            s["anchor"] = self.anchor.clone()
        if self.outer:
            s["momentum"] = self.momentum.clone()
        if self.compress is not None:
            s["compress"] = self.compress.state_dict()
        return s

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        if self.anchor is not None and "anchor" in state:
            self.anchor.copy_(state["anchor"])
        if self.outer and "momentum" in state:
            self.momentum.copy_(state["momentum"])
        if self.compress is not None:
            self.compress.load_state_dict(state.get("compress", {}))

    def rank_state_dict(self) -> dict:
        return {} if self.compress is None else self.compress.rank_state_dict()

    def load_rank_state_dict(self, state: dict) -> None:
        if self.compress is not None:
            self.compress.load_rank_state_dict(state)
