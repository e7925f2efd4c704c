"""Sums over several nodes: the peers of a node sum among themselves, one leader per node sums across
nodes, and the node's peers share the leader's result.

On a CPU node whose peers each own their cores the node's sum goes through one shared-memory segment
per node (`p2prl.comm.shm`); otherwise through the node's own process group (gloo on CPU, NCCL inside
a GPU node): reduce to the leader, the leaders' all-reduce, broadcast from the leader. Either way every
peer of every node ends with the same bytes: each node's sum is computed once (by its leader, in rank
order), the leaders' all-reduce leaves the same result on every leader, and the node's peers copy it.
Only the leaders' traffic crosses the network: one message per node instead of one per peer, and
the only hop a compressed sum (`all_reduce_sum_across`) compresses: the node's sums stay exact.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from p2prl.comm.base import Across
from p2prl.comm.hop import Hop
from p2prl.comm.process_group import ProcessGroupComm
from p2prl.comm.shm import SharedMemorySum

log = logging.getLogger(__name__)


class Layout(NamedTuple):
    """Which ranks share a node: `nodes[i]` are node i's ranks (ascending), nodes ordered by first rank."""

    nodes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, node_keys: list) -> "Layout":
        """From every rank's node key (torchrun's GROUP_RANK, or a host name), indexed by rank."""
        by_node: dict = {}
        for rank, key in enumerate(node_keys):
            by_node.setdefault(key, []).append(rank)
        return cls(tuple(sorted(tuple(r) for r in by_node.values())))

    def node_of(self, rank: int) -> tuple[int, ...]:
        return next(n for n in self.nodes if rank in n)

    @property
    def leaders(self) -> list[int]:
        return [n[0] for n in self.nodes]

    @property
    def worth_it(self) -> bool:
        """Hierarchical sums pay off with more than one node and more than one peer on some node."""
        return len(self.nodes) > 1 and max(map(len, self.nodes)) > 1


class Groups(NamedTuple):
    node: object  # this node's process group
    leaders: object  # the leaders' process group (a non-member's handle on other ranks)


def make_groups(layout: Layout, rank: int) -> Groups:
    """The process groups a layout needs (a collective: every rank creates every group, in order)."""
    node = None
    for ranks in layout.nodes:
        group = dist.new_group(list(ranks))
        if rank in ranks:
            node = group
    return Groups(node, dist.new_group(layout.leaders))


class HierarchicalComm(ProcessGroupComm):
    """A ProcessGroupComm whose sums go node, then leaders, then node (see the module docstring)."""

    def __init__(self, backend: str, device: torch.device, timeout_s: float, layout: Layout, groups: Groups) -> None:
        super().__init__(backend, device, timeout_s)
        self.layout, self.groups = layout, groups
        self.node = layout.node_of(self.rank)
        self.leader = self.node[0]
        self.node_shared: Optional[SharedMemorySum] = None  # set by open_comm when the node's peers may use it

    def _across(self, tensor: torch.Tensor) -> None:
        """The leaders' all-reduce of their nodes' sums (only leaders call it)."""
        if len(self.layout.nodes) > 1:
            self._run(lambda t: dist.all_reduce(t, group=self.groups.leaders, async_op=True), tensor)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._node_then(tensor, self._across)

    @property
    def hop(self) -> Hop:
        """The nodes' leaders, as the network hop of a sum (on a leader)."""
        if self._hop is None:
            leaders = self.layout.leaders
            self._hop = Hop(leaders.index(self.leader), len(leaders), self.groups.leaders, self._run)
        return self._hop

    def _sum_across(self, tensor: torch.Tensor, across: Across) -> Optional[int]:
        sent: list[int] = []  # only a leader's sum crosses the network
        self._node_then(tensor, lambda t: sent.append(self._on_hop(self.hop, across, t)))
        return sent[0] if sent else None

    def _node_then(self, tensor: torch.Tensor, across: Callable[[torch.Tensor], None]) -> None:
        """The node's sum into its leader, `across(node sum)` on the leader, the result to the node's peers."""
        if len(self.node) == 1:
            across(tensor)
        elif self.node_shared is not None and self.node_shared.fits(tensor):
            across = across if self.rank == self.leader else (lambda t: None)
            self._shared(lambda: self.node_shared.finish(self.node_shared.publish(tensor, self.timeout_s), across))
        else:
            group, leader = self.groups.node, self.leader
            self._run(lambda t: dist.reduce(t, dst=leader, group=group, async_op=True), tensor)
            if self.rank == leader:
                across(tensor)
            self._run(lambda t: dist.broadcast(t, src=leader, group=group, async_op=True), tensor)

    def _start_all_reduce_sum(self, tensor: torch.Tensor):
        # No background sums across nodes: comm.overlap then waits where it would have overlapped.
        self._all_reduce_sum(tensor)
        return lambda: None
