"""The default strategy: average every gradient with one flat all-reduce per optimizer step.

With `comm.overlap` the gradient is averaged in the background while the next one is computed: each
step then starts this gradient's average and finishes and applies the previous one (one step stale);
every peer still applies the same averaged gradients in the same order. With `comm.compress=bf16` the
sum travels as bfloat16 (half the bytes; every peer gets the same rounded sum).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from p2prl.sync.base import Apply, Follow, Strategy


class AllReduce(Strategy):
    def __init__(self, comm, cfg, bucket) -> None:
        super().__init__(comm, cfg, bucket)
        self.overlap = cfg.overlap
        # overlap: two send buffers, so one gradient is averaged while the next is computed.
        self._spares = [torch.zeros_like(bucket.flat) for _ in range(2)] if self.overlap else []
        self._pending = None
        self._calls = 0
        self._half = torch.zeros_like(bucket.flat, dtype=torch.bfloat16) if cfg.compress == "bf16" else None

    def _average(self, flat: torch.Tensor) -> None:
        if self._half is None:
            self.comm.all_reduce_mean(flat)
            return
        self._half.copy_(flat)
        self.comm.all_reduce_sum(self._half)
        flat.copy_(self._half).div_(self.comm.world_size)

    def step(self, apply: Apply, follow: Follow, veto: Any) -> Optional[Any]:
        flat = self.bucket.flat
        if not self.overlap:
            self._average(flat)
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
