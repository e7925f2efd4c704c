"""Gossip: every peer applies its own gradient, then averages its parameters with one partner.

Partners follow a schedule every peer computes alike from the update count t, on the graph
`comm.graph` names. `ring`: the pairs alternate between the ring's even edges (0-1, 2-3, ...) and its
odd edges (1-2, 3-4, ..., N-1 - 0); with an odd N one peer sits out each step. `hypercube` (N a power
of two): partner = rank XOR 2^(t mod log2 N), so after log2 N steps every peer has mixed with every
other. A pair's two peers
compute (a + b) / 2 and (b + a) / 2, the same bytes, so a pairwise average keeps the mean of all
parameters (to rounding). Parameters are no longer identical: `consensus_distance`, the root mean
square distance of the peers' parameters from their mean, says how far apart they are.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from p2prl.checks import ConfigError, choice
from p2prl.sync.base import Apply, Follow, Link, Strategy, _local_terms

GRAPHS = ("ring", "hypercube")  # comm.graph


def partner(rank: int, world_size: int, t: int, graph: str) -> Optional[int]:
    """Rank `rank`'s partner at update t on `graph` (ring | hypercube), or None (it sits out)."""
    if world_size == 1:
        return None
    if graph == "hypercube":
        bits = world_size.bit_length() - 1
        assert 1 << bits == world_size, "hypercube gossip needs a power of two peers"
        return rank ^ (1 << (t % bits))
    if t % 2 == 0:
        other = rank + 1 if rank % 2 == 0 else rank - 1
        return other if other < world_size else None
    if world_size % 2 == 1 and rank == 0:
        return None
    other = rank + 1 if rank % 2 == 1 else rank - 1
    if world_size % 2 == 1 and other == world_size:
        return None
    return other % world_size


class Gossip(Strategy):
    differs = True
    local = True
    keys = ("graph",)

    @classmethod
    def period(cls, settings: Mapping[str, Any]) -> int:
        return 2  # a ring's even and odd pairs

    @classmethod
    def check(cls, cfg) -> None:
        choice("comm.graph", cfg.graph, GRAPHS)

    @classmethod
    def check_world(cls, cfg, world_size: int) -> None:
        if cfg.graph == "hypercube" and world_size & (world_size - 1):
            raise ConfigError("comm.graph", cfg.graph, f"needs a power of two peers, here {world_size}; allowed: ring")

    @classmethod
    def predict(cls, link: Link, n: int, nbytes: float, settings: Mapping[str, Any]) -> float:
        if link.colocated == 1 or n <= link.colocated:  # one exchange with the partner, and the terms' sum
            return link.send(nbytes) + link.terms(n)
        # A ring over nodes of several peers pairs node-mates every other update; in the updates between,
        # each node's link carries two pairs' exchanges (one with either neighbouring node).
        latency = link.send(0)
        return 0.5 * (latency + 2 * (link.send(nbytes) - latency)) + 0.5 * link.send_local(nbytes) + link.terms(n)

    def __init__(self, comm, cfg, bucket) -> None:
        super().__init__(comm, cfg, bucket)
        self.calls = 0  # identical on every peer
        self._theirs = torch.zeros_like(bucket.flat_param.detach())

    def step(self, apply: Apply, follow: Follow, veto: Any) -> Optional[Any]:
        update = _local_terms(self, apply, veto)
        self.mix(self.calls)
        self.calls += 1
        return update

    @torch.no_grad()
    def mix(self, t: int) -> None:
        other = partner(self.comm.rank, self.comm.world_size, t, self.cfg.graph)
        if other is None:
            return
        mine = self.bucket.flat_param.data
        self.comm.exchange(mine, self._theirs, other)
        mine.add_(self._theirs).div_(2)

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
