"""The process-group Communicator: collectives over torch.distributed (gloo on CPU, NCCL on GPU).

Peers that all share one node and each own their cores sum small tensors through shared memory
(`p2prl.comm.shm`) instead of gloo; `p2prl.comm.connect.open_comm` decides.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from p2prl.comm.base import Across, Communicator
from p2prl.comm.hop import Hop
from p2prl.comm.shm import SharedMemorySum, SumFailed
from p2prl.comm.store import Heartbeat

log = logging.getLogger(__name__)


class PeerFailure(RuntimeError):
    """A collective failed: a peer died, froze past comm.timeout_s, or the network broke."""


def _start_sum(tensor: torch.Tensor):
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)


class ProcessGroupComm(Communicator):
    """Collectives over the default torch.distributed process group.

    `shared` (set by open_comm when every peer may use it): sums that fit go through shared memory.
    `spin`: wait for gloo collectives by polling, for a peer that owns its cores.
    """

    def __init__(self, backend: str, device: torch.device, timeout_s: float, spin: bool = False) -> None:
        super().__init__()
        self.spin = spin and backend == "gloo"
        self.shared: Optional[SharedMemorySum] = None
        self._hop: Optional[Hop] = None
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = backend
        self.device = device
        self.timeout_s = timeout_s
        self.heartbeat = Heartbeat(self.rank, self.world_size, lambda: self.phase)

    def close(self) -> None:
        self.heartbeat.stop()

    def _phase_changed(self) -> None:
        if hasattr(self, "heartbeat"):
            self.heartbeat.poke()

    def failure(self, e: BaseException) -> PeerFailure:
        """Name the peer(s) that stopped responding, and the phase each was in, from their heartbeats."""
        text = str(e).strip()
        detail = text.splitlines()[0] if text else type(e).__name__
        if isinstance(e, SumFailed) and e.mismatch:
            return PeerFailure(f"peers out of step during {self.phase}: {detail}")
        stalled = self.heartbeat.stalled()
        if stalled is None and self.world_size == 2:
            stalled = {1 - self.rank: "unknown"}
        if stalled:
            who = ", ".join(f"rank {r} (in {phase})" for r, phase in sorted(stalled.items()))
            what = f"peer {who} stopped responding: frozen or dead"
        else:
            what = "a peer stopped responding (its heartbeat continues: network trouble?)"
        return PeerFailure(f"{what}; this peer gave up during {self.phase} after at most "
                           f"comm.timeout_s={self.timeout_s:g} s: {detail}")

    def _run(self, start, tensor: torch.Tensor) -> None:
        # NCCL reduces device tensors only; small CPU-side statistics make the round trip.
        on_device = tensor if tensor.device == self.device else tensor.to(self.device)
        self._wait(self._start(start, on_device))
        if on_device is not tensor:
            tensor.copy_(on_device)

    def _start(self, start, tensor: torch.Tensor):
        try:
            return start(tensor)
        except RuntimeError as e:  # gloo raises on timeout or a dead peer
            raise self.failure(e) from e

    def _wait(self, work) -> None:
        """Wait for a collective; with `spin`, by polling and yielding the core rather than sleeping.

        A sleeping peer is woken through several threads (caller, gloo worker, socket loop), and each
        wake-up of an idle core can take milliseconds, more than the collective itself. Spinning is
        only for a peer that owns its core (pinned): it then takes no time from another peer.
        """
        try:
            if self.spin:
                deadline = time.monotonic() + self.timeout_s
                while not work.is_completed() and time.monotonic() < deadline:
                    os.sched_yield()
            work.wait()
        except RuntimeError as e:
            raise self.failure(e) from e

    def _in_memory(self, tensor: torch.Tensor) -> bool:
        return self.shared is not None and self.shared.takes(tensor)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self._in_memory(tensor):
            self._shared(lambda: self.shared.sum(tensor, self.timeout_s))
        else:
            self._run(_start_sum, tensor)

    @property
    def hop(self) -> Hop:
        """Every peer, as the network hop of a flat sum (`all_reduce_sum_across`)."""
        if self._hop is None:
            self._hop = Hop(self.rank, self.world_size, None, self._run)
        return self._hop

    def _sum_across(self, tensor: torch.Tensor, across: Across) -> Optional[int]:
        if self._in_memory(tensor):  # one node, through shared memory: no link to cross, the sum stays exact
            self._all_reduce_sum(tensor)
            return None
        return self._on_hop(self.hop, across, tensor)

    def _all_reduce_mean(self, tensor: torch.Tensor) -> None:
        if self._in_memory(tensor):  # each peer scales its part as it publishes it: one pass less
            self._shared(lambda: self.shared.sum(tensor, self.timeout_s, scale=1.0 / self.world_size))
        else:
            super()._all_reduce_mean(tensor)

    def _shared(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except SumFailed as e:  # a peer froze past the timeout, its process exited, or calls differ
            raise self.failure(e) from e

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self._run(lambda t: dist.broadcast(t, src=src, async_op=True), tensor)

    def _start_all_reduce_sum(self, tensor: torch.Tensor):
        assert tensor.device == self.device, "background all-reduces take tensors already on the device"
        if self._in_memory(tensor) and self.shared.fits(tensor):
            k = self._shared(lambda: self.shared.publish(tensor, self.timeout_s))
            return lambda: self._shared(lambda: self.shared.finish(k))
        if self._in_memory(tensor):  # larger than a slot: summed in pieces now (still faster than gloo)
            self._all_reduce_sum(tensor)
            return lambda: None
        work = self._start(_start_sum, tensor)
        return lambda: self._wait(work)

    def _p2p(self, ops: list) -> None:
        """Start point-to-point operations together, then wait for all of them."""
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise self.failure(e) from e
        for work in works:  # a gloo send's or receive's is_completed() stays False until wait(): no polling
            try:
                work.wait()
            except RuntimeError as e:
                raise self.failure(e) from e

    def _send_all(self, tensor: torch.Tensor, dsts: list[int]) -> None:
        for dst in dsts:  # one after another, as a single server's link would carry them
            self._p2p([dist.P2POp(dist.isend, tensor, dst)])

    def _recv_all(self, tensors: list[torch.Tensor], srcs: list[int]) -> None:
        self._p2p([dist.P2POp(dist.irecv, t, src) for t, src in zip(tensors, srcs)])

    def _exchange(self, mine: torch.Tensor, theirs: torch.Tensor, peer: int) -> None:
        # The receive is posted first: with the send first, gloo moved a large pair of tensors one
        # direction after the other (6.7 MB each way over a 100 Mbit/s link: 1.12 s, against 0.60 s
        # receive first, the time of one direction).
        self._p2p([dist.P2POp(dist.irecv, theirs, peer), dist.P2POp(dist.isend, mine, peer)])

    def _all_gather_object(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise self.failure(e) from e
        return out
