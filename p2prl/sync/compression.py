"""What every compression of `comm.compress` shares: the layout of the tensor it averages, its place in
a sum, and its state.

A compression averages a flat tensor laid out as `Layout` says: the model's parameters one after
another (a gradient, or local SGD's pseudo-gradient), then `tail` values that must travel exact (the
named terms and the finiteness flag: they drive decisions every peer takes alike). It compresses only
the hop of the sum that crosses the network (`Communicator.all_reduce_sum_across`, `p2prl.comm.hop`):
never what a node's peers sum through shared memory, and in a hierarchical layout only the nodes'
leaders' sum. Its `sum(hop, x)` must leave in `x` the sum over the hop's members of what each sent, the
same bytes on every member, so the parameters stay identical on every peer.

Error feedback (int8, lowrank): each member keeps what its own message lost (the residual) and adds it
to its next one, so over updates nothing is lost but a bounded residual. The residual is this peer's
own state (`rank_state_dict`: each rank's checkpoint file); state every member holds alike (the
low-rank form's warm start) is `state_dict` (the shared checkpoint). A residual that turns non-finite
(a NaN gradient, which every peer skips alike) is dropped, not carried into later updates.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from p2prl.comm import Communicator
from p2prl.comm.hop import Hop
from p2prl.config import CommConfig
from p2prl.sync.base import Checkpointed


class Layout(NamedTuple):
    """A flat tensor's parts: the parameters' shapes in order, then `tail` values that travel exact."""

    shapes: tuple[torch.Size, ...]
    tail: int

    @classmethod
    def of(cls, params: list[torch.nn.Parameter], tail: int) -> "Layout":
        return cls(tuple(p.shape for p in params), tail)

    @property
    def params(self) -> int:
        """How many values the parameters take (the compressible part)."""
        return sum(math.prod(s) for s in self.shapes)

    def offsets(self) -> list[tuple[int, torch.Size]]:
        """(offset, shape) of every parameter in the flat tensor."""
        out, offset = [], 0
        for shape in self.shapes:
            out.append((offset, shape))
            offset += math.prod(shape)
        return out


class Compression(Checkpointed):
    """How the network hop of a sum travels (a subclass per `comm.compress` form).

    `mean(comm, flat)` averages `flat` (shaped as `layout`, on `like`'s device and dtype) over every
    peer in place: identical on every peer.
    """

    name = ""  # its comm.compress value: saved state is loaded only into the same form

    def __init__(self, layout: Layout, cfg: CommConfig, like: torch.Tensor) -> None:
        self.layout = layout
        self.n = layout.params

    def mean(self, comm: Communicator, flat: torch.Tensor) -> None:
        comm.all_reduce_sum_across(flat, self.sum)
        if comm.world_size > 1:
            flat.div_(comm.world_size)

    def sum(self, hop: Hop, x: torch.Tensor) -> None:
        """Replace `x` (this member's part of the sum) by the sum of every member's, compressed."""
        raise NotImplementedError


class ErrorFeedback(Compression):
    """A compression that keeps this member's residual: what its messages lost so far, added to the next."""

    def __init__(self, layout: Layout, cfg: CommConfig, like: torch.Tensor) -> None:
        super().__init__(layout, cfg, like)
        self.residual = torch.zeros(self.n, dtype=like.dtype, device=like.device)

    def keep_residual(self) -> None:
        """Drop a residual that turned non-finite: its update is skipped on every peer, and carrying
        NaN forward would poison every later one."""
        if not bool(torch.isfinite(self.residual.sum())):  # one reduction, no mask: a NaN or inf anywhere shows
            self.residual.zero_()

    def rank_state_dict(self) -> dict:
        return {"form": self.name, "residual": self.residual.clone()}

    def load_rank_state_dict(self, state: dict) -> None:
        if state.get("form") == self.name and state["residual"].shape == self.residual.shape:
            self.residual.copy_(state["residual"])
