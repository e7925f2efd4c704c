"""How a sum's network hop travels (`comm.compress`): as it is, or compressed; the table of the forms.

| form | the hop's message per member | collectives | error feedback |
|---|---|---|---|
| none | the tensor (float32) | 1 | - |
| bf16 | the parameters' part as bfloat16 (half the bytes), the exact tail apart | 2 | no |
| int8 | 8-bit codes and a scale per 1024 values (`p2prl.sync.int8`) | 1 all-gather | yes |
| lowrank | rank-r factors of each large matrix (PowerSGD, `p2prl.sync.lowrank`) | 2 | yes |

Each form is a class (`p2prl.sync.compression.Compression`) whose `mean(comm, flat)` averages `flat`
over the peers in place: the allreduce strategy's gradient bucket ([gradient | named terms |
finiteness flag]) or local SGD's pseudo-gradient. Every form leaves the same bytes on every peer, keeps
the tail (terms, flag) exact, and compresses only what crosses the network: a node's shared-memory sum
stays exact, and in a hierarchical layout only the nodes' leaders' sum is compressed.
"""
from __future__ import annotations

import torch

from p2prl.comm import Communicator
from p2prl.comm.hop import Hop
from p2prl.config import CommConfig
from p2prl.sync.compression import Compression, Layout
from p2prl.sync.int8 import Int8
from p2prl.sync.lowrank import LowRank


class Uncompressed(Compression):
    """The tensor travels as it is: one all-reduce mean (through shared memory where it may)."""

    name = "none"

    def mean(self, comm: Communicator, flat: torch.Tensor) -> None:
        comm.all_reduce_mean(flat)


class BFloat16(Compression):
    """The parameters' part travels as bfloat16 (half the bytes) and is summed in it: every member adds
    the same rounded values in the same order. The exact tail is summed apart, in its own dtype."""

    name = "bf16"

    def __init__(self, layout: Layout, cfg: CommConfig, like: torch.Tensor) -> None:
        super().__init__(layout, cfg, like)
        self._half = torch.zeros(self.n, dtype=torch.bfloat16, device=like.device)

    @torch.no_grad()
    def sum(self, hop: Hop, x: torch.Tensor) -> None:
        self._half.copy_(x[:self.n])
        hop.all_reduce_sum(self._half)
        x[:self.n] = self._half
        if self.layout.tail:
            hop.all_reduce_sum(x[self.n:])


COMPRESSIONS: dict[str, type[Compression]] = {c.name: c for c in (Uncompressed, BFloat16, Int8, LowRank)}


def make_compression(cfg: CommConfig, params: list[torch.nn.Parameter], tail: int, like: torch.Tensor) -> Compression:
    """The form `comm.compress` names, for a flat tensor of `params`' values then `tail` exact ones."""
    return COMPRESSIONS[cfg.compress](Layout.of(params, tail), cfg, like)
