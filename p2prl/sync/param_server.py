"""The central parameter server, kept as the baseline p2prl is measured against.

Rank 0 is the server and also samples like every peer. Synchronously, each update: every other peer
sends its gradient (and terms) to rank 0; rank 0 averages them in rank order, checks, clips and steps
its optimizer, then sends the new parameters (with the averaged terms and its verdict) to every peer
in turn. The server's link carries 2 (N - 1) messages of the model's size per update, and every peer
waits for it: the bottleneck (and single point of failure) that the all-reduce avoids.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from p2prl.sync.base import Apply, Follow, Link, Strategy

SERVER = 0


class ParamServer(Strategy):
    central = True
    @classmethod
    def predict(cls, link: Link, n: int, nbytes: float, settings: Mapping[str, Any]) -> float:
        # Every gradient in, every parameter copy out, one by one: 2 (N - 1) messages, of which those of
        # the server's node-mates do not cross its link.
        latency = link.send(0)
        return 2 * (n - 1) * latency + 2 * (n - min(link.colocated, n)) * (link.send(nbytes) - latency)

    def __init__(self, comm, cfg, bucket) -> None:
        super().__init__(comm, cfg, bucket)
        n_params, n_extras = bucket.flat_param.numel(), bucket.extras.numel()
        # What the server sends back: [parameters | averaged terms and flag | applied, vetoed].
        self._reply = torch.zeros(n_params + n_extras + 2, dtype=bucket.flat.dtype, device=bucket.flat.device)
        self._inbox = [torch.zeros_like(bucket.flat) for _ in range(comm.world_size - 1)] \
            if comm.rank == SERVER else []

    def step(self, apply: Apply, follow: Follow, veto: Any) -> Optional[Any]:
        comm, flat = self.comm, self.bucket.flat
        if comm.world_size == 1:
            return apply(flat, veto)
        n_params = self.bucket.flat_param.numel()
        extras = slice(n_params, n_params + self.bucket.extras.numel())
        if comm.rank == SERVER:
            comm.recv_all(self._inbox, list(range(1, comm.world_size)))
            for other in self._inbox:  # rank order: 0, 1, ..., N - 1
                flat.add_(other)
            flat.div_(comm.world_size)
            update = apply(flat, veto)
            r = self._reply
            r[:n_params] = self.bucket.flat_param.detach()
            r[extras] = flat[n_params:]
            r[-2], r[-1] = float(update.applied), float(update.vetoed)
            comm.send_all(r, list(range(1, comm.world_size)))
            return update
        comm.send_all(flat, [SERVER])
        comm.recv_all([self._reply], [SERVER])
        with torch.no_grad():
            self.bucket.flat_param.copy_(self._reply[:n_params])
        return follow(self._reply[extras], bool(self._reply[-2]), bool(self._reply[-1]))
