"""The Communicator interface: the only way the rest of p2prl talks to other peers.

Subclasses provide four primitives; everything else (several tensors in one sum, means, agreement,
timing) is built on them here, so a world of one (`LocalComm`) and a process group
(`ProcessGroupComm`) behave the same upstream.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch

from p2prl.comm.hop import Hop

Across = Callable[[Hop, torch.Tensor], None]  # a compression's sum over a hop (p2prl.comm.hop)


class Communicator(ABC):
    """Collectives among the peers of one run.

    Every method is a collective: all peers must call it, in the same order, or they hang.
    `seconds` accumulates wall time spent inside collectives (for `comm_frac`), `calls` and `bytes`
    count them; `phase` names what the peer is doing (sampling, update, checkpoint) so a timeout can
    say where it happened.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0
        self._phase = "startup"
        self._riders: list[torch.Tensor] = []

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value != self._phase:
            self._phase = value
            self._phase_changed()

    def _phase_changed(self) -> None:
        """Hook: publish the new phase (the process group's heartbeat does)."""

    # -- primitives ------------------------------------------------------------------------------
    @abstractmethod
    def _all_reduce_sum(self, tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def _broadcast(self, tensor: torch.Tensor, src: int) -> None: ...

    @abstractmethod
    def _all_gather_object(self, obj: Any) -> list: ...

    def close(self) -> None:
        """Release the transport (a no-op for a world of one)."""

    # -- the interface ---------------------------------------------------------------------------
    def all_reduce_sum(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Sum each tensor over all peers, in place, in ONE collective; returns the first.

        The tensors must share dtype and device. Tensors queued with `sum_with_next` that match the
        first one's dtype and device are summed in the same collective.
        """
        group = [*tensors, *self._take_riders(tensors[0])]
        start = time.perf_counter()
        if len(group) == 1:
            self._all_reduce_sum(group[0])
        else:
            first = group[0]
            assert all(t.dtype == first.dtype and t.device == first.device for t in group), \
                "one sum takes tensors of one dtype and device"
            flat = torch.cat([t.reshape(-1) for t in group])
            self._all_reduce_sum(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
        self._account(start, sum(t.numel() * t.element_size() for t in group))
        return tensors[0]

    def all_reduce_sum_across(self, tensor: torch.Tensor, across: Across) -> torch.Tensor:
        """Sum `tensor` over all peers, in place, where `across(hop, part)` carries the part of the sum
        that crosses the network (`p2prl.comm.hop`: all peers in a flat layout, the nodes' leaders with
        their nodes' sums in a hierarchical one; what shared memory sums stays exact). Every peer gets
        the same bytes; returns `tensor`. Tensors queued with `sum_with_next` wait for the next plain sum:
        they must stay exact."""
        start = time.perf_counter()
        sent = self._sum_across(tensor, across)
        self._account(start, tensor.numel() * tensor.element_size() if sent is None else sent)
        return tensor

    def _sum_across(self, tensor: torch.Tensor, across: Across) -> Optional[int]:
        """The sum of `all_reduce_sum_across`; the bytes this peer handed to the hop's collectives, None
        where no hop ran here (a world of one, shared memory, a node's other peers): those count as
        the tensor's."""
        self._all_reduce_sum(tensor)
        return None

    @staticmethod
    def _on_hop(hop: Hop, across: Across, tensor: torch.Tensor) -> int:
        """Run `across` on `hop`; the bytes it handed to the hop's collectives."""
        before = hop.bytes
        across(hop, tensor)
        return hop.bytes - before

    def sum_with_next(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all peers, in place, within the next `all_reduce_sum` of the same dtype
        and device (saving a collective), or at `settle()` at the latest. Every peer must queue the
        same tensors at the same point: then every peer sums them in the same collective."""
        self._riders.append(tensor)

    def settle(self) -> None:
        """Sum what `sum_with_next` queued and no collective has taken yet (one sum per dtype)."""
        while self._riders:
            self.all_reduce_sum(self._riders.pop(0))

    def _take_riders(self, like: torch.Tensor) -> list[torch.Tensor]:
        if not self._riders:
            return []
        taken = [t for t in self._riders if t.dtype == like.dtype and t.device == like.device]
        self._riders = [t for t in self._riders if not any(t is x for x in taken)]
        return taken

    def all_reduce_mean_async(self, tensor: torch.Tensor) -> "PendingReduce":
        """Start averaging `tensor` in the background; `wait()` on the result finishes it in place.

        Only the wait counts as time inside collectives: the point of starting early is that the
        caller computes meanwhile. One pending collective at a time, and every peer in the same order.
        """
        return PendingReduce(self, tensor, self._start_all_reduce_sum(tensor))

    def _start_all_reduce_sum(self, tensor: torch.Tensor) -> Callable[[], None]:
        """Start a sum in the background and return its waiter (default: do it now)."""
        self._all_reduce_sum(tensor)
        return lambda: None

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over all peers, in place; returns it (bit-identical on every peer). The
        transport may scale before it sums (shared memory: sum of x / n) or after (gloo: (sum of x) / n):
        exact alike for 2, 4, 8 peers; with other counts the last bit can differ between transports,
        never between peers."""
        if self.world_size == 1 or self._riders:  # riders are summed, not averaged: in one sum
            self.all_reduce_sum(tensor)
            if self.world_size > 1:
                tensor.div_(self.world_size)
            return tensor
        start = time.perf_counter()
        self._all_reduce_mean(tensor)
        self._account(start, tensor.numel() * tensor.element_size())
        return tensor

    def _all_reduce_mean(self, tensor: torch.Tensor) -> None:
        """Average in place: the sum, divided (a transport may do both in one pass)."""
        self._all_reduce_sum(tensor)
        tensor.div_(self.world_size)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` on every peer with `src`'s copy, in place; returns it."""
        start = time.perf_counter()
        self._broadcast(tensor, src)
        self._account(start, tensor.numel() * tensor.element_size())
        return tensor

    def all_gather_object(self, obj: Any) -> list:
        """Every peer's `obj`, indexed by rank (small picklable objects only: config, paths)."""
        start = time.perf_counter()
        out = self._all_gather_object(obj)
        self._account(start, 0)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.all_gather_object(obj)[src]

    # -- point to point (the parameter server, gossip) ----------------------------------------------
    def send_all(self, tensor: torch.Tensor, dsts: list[int]) -> None:
        """Send `tensor` to each of `dsts`, one after another (the other side calls `recv_all`)."""
        start = time.perf_counter()
        self._send_all(tensor, dsts)
        self._account(start, tensor.numel() * tensor.element_size() * len(dsts))

    def recv_all(self, tensors: list[torch.Tensor], srcs: list[int]) -> None:
        """Receive `tensors[i]` from `srcs[i]`, in place."""
        start = time.perf_counter()
        self._recv_all(tensors, srcs)
        self._account(start, sum(t.numel() * t.element_size() for t in tensors))

    def exchange(self, mine: torch.Tensor, theirs: torch.Tensor, peer: int) -> None:
        """Send `mine` to `peer` and receive its tensor into `theirs`, both at once."""
        start = time.perf_counter()
        self._exchange(mine, theirs, peer)
        self._account(start, 2 * mine.numel() * mine.element_size())

    def _send_all(self, tensor: torch.Tensor, dsts: list[int]) -> None:
        raise NotImplementedError("a world of one has no one to send to")

    def _recv_all(self, tensors: list[torch.Tensor], srcs: list[int]) -> None:
        raise NotImplementedError("a world of one has no one to receive from")

    def _exchange(self, mine: torch.Tensor, theirs: torch.Tensor, peer: int) -> None:
        raise NotImplementedError("a world of one has no one to exchange with")

    def agree(self, flag: bool) -> bool:
        """True on every peer if `flag` is true on any peer (for stop/skip decisions)."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return bool(self.all_reduce_sum(t).item() > 0)

    def _account(self, start: float, nbytes: int) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.bytes += nbytes


class PendingReduce:
    """An all-reduce mean started by `Communicator.all_reduce_mean_async`."""

    def __init__(self, comm: Communicator, tensor: torch.Tensor, waiter: Callable[[], None]) -> None:
        self.comm, self.tensor, self.waiter = comm, tensor, waiter

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        self.waiter()
        self.comm._account(start, self.tensor.numel() * self.tensor.element_size())
        if self.comm.world_size > 1:
            self.tensor.div_(self.comm.world_size)
        return self.tensor
