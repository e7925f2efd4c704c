"""The default strategy: average every gradient with one flat all-reduce per optimizer step.

With `comm.overlap` the gradient is averaged in the background while the next one is computed: each
step then starts this gradient's average and finishes and applies the previous one (one step stale);
every peer still applies the same averaged gradients in the same order. `comm.compress` chooses how a
blocking sum's network hop travels (`p2prl.sync.compress`: bf16, int8, lowrank); the named terms and
the finiteness flag always travel exact.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from p2prl.checks import ConfigError
from p2prl.sync.base import Apply, Follow, Link, Strategy
from p2prl.sync.compress import make_compression


class AllReduce(Strategy):
    tables = True  # one sum of the same tensor on every peer: exact tables stay identical
    keys = ("overlap", "compress")

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.compress != "none" and cfg.overlap:
            raise ConfigError("comm.compress", cfg.compress, f"compresses comm={cfg.strategy}'s blocking sums only "
                                                             "(no comm.overlap); allowed here: none")

    @classmethod
    def predict(cls, link: Link, n: int, nbytes: float, settings: Mapping[str, Any]) -> float:
        return link.allreduce(nbytes, n)

    def __init__(self, comm, cfg, bucket) -> None:
        super().__init__(comm, cfg, bucket)
        self.overlap = cfg.overlap
        # overlap: two send buffers, so one gradient is averaged while the next is computed.
        self._spares = [torch.zeros_like(bucket.flat) for _ in range(2)] if self.overlap else []
        self._pending = None
        self._calls = 0
        self._compress = make_compression(cfg, bucket.params, bucket.extras.numel(), bucket.flat)

    def step(self, apply: Apply, follow: Follow, veto: Any) -> Optional[Any]:
        flat = self.bucket.flat
        if not self.overlap:
            if self.span is not None and self._compress.name == "none":
                self.comm.all_reduce_mean(flat[self.span])  # the rest is zero on every peer
            else:
                self._compress.mean(self.comm, flat)
            return apply(flat, veto)
        self._calls += 1
        send = self._spares[self._calls % 2]  # the other one may still be in flight
        send.copy_(flat)
        previous = self.finish(apply, veto, discard=False)
        self._pending = self.comm.all_reduce_mean_async(send)
        return previous

    def finish(self, apply: Apply, veto: Any, discard: bool) -> Optional[Any]:
        if self._pending is None:
            return None
        flat, self._pending = self._pending.wait(), None
        return None if discard else apply(flat, veto)

    def state_dict(self) -> dict:
        return {"compress": self._compress.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._compress.load_state_dict(state.get("compress", {}))

    def rank_state_dict(self) -> dict:
        return self._compress.rank_state_dict()

    def load_rank_state_dict(self, state: dict) -> None:
        self._compress.load_rank_state_dict(state)
