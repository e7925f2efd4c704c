"""Peer start-up and tear-down from torchrun's environment; the process-group Communicator.

torchrun sets RANK (global identity), LOCAL_RANK (which GPU on this node) and WORLD_SIZE. Without
them, `open_comm` returns a world of one, and the rest of p2prl runs the same code path.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from p2prl.comm.base import Communicator
from p2prl.comm.local import LocalComm
from p2prl.comm.shm import SharedMemorySum, SumFailed, open_shared_sum, supported
from p2prl.comm.store import Heartbeat, attempt_store, gather_before_start
from p2prl.config import CommConfig, ConfigError

log = logging.getLogger(__name__)


class PeerFailure(RuntimeError):
    """A collective failed: a peer died, froze past comm.timeout_s, or the network broke."""


def _start_sum(tensor: torch.Tensor):
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)


class ProcessGroupComm(Communicator):
    """Collectives over the default torch.distributed process group (gloo on CPU, NCCL on GPU).

    With `shared`, sums that fit go through shared memory instead (peers on one node, each pinned).
    """

    def __init__(self, backend: str, device: torch.device, timeout_s: float, spin: bool = False) -> None:
        super().__init__()
        self.spin = spin and backend == "gloo"
        self.shared: Optional[SharedMemorySum] = None  # set by open_comm when every peer may use it
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

    def _failure(self, e: BaseException) -> PeerFailure:
        """Name the peer(s) that stopped responding, and the phase each was in, from their heartbeats."""
        text = str(e).strip()
        detail = text.splitlines()[0] if text else type(e).__name__
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
            raise self._failure(e) from e

    def _wait(self, work) -> None:
        """Wait for a collective; with `spin`, by polling and yielding the core rather than sleeping.

        A sleeping peer is woken through several threads (caller, gloo worker, socket loop), and each
        wake-up of an idle core can take milliseconds, more than the collective itself. Spinning is
        only for a peer that owns its core (pinned): it then takes no time from another peer.
        """
        try:
            if self.spin:
                while not work.is_completed():
                    os.sched_yield()
            work.wait()
        except RuntimeError as e:
            raise self._failure(e) from e

    def _in_memory(self, tensor: torch.Tensor) -> bool:
        return self.shared is not None and self.shared.fits(tensor)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self._in_memory(tensor):
            self._shared(lambda: self.shared.sum(tensor, self.timeout_s))
        else:
            self._run(_start_sum, tensor)

    def _shared(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except SumFailed as e:  # a peer froze past the timeout, or its process exited
            raise self._failure(e) from e

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self._run(lambda t: dist.broadcast(t, src=src, async_op=True), tensor)

    def _start_all_reduce_sum(self, tensor: torch.Tensor):
        assert tensor.device == self.device, "background all-reduces take tensors already on the device"
        if self._in_memory(tensor):
            k = self._shared(lambda: self.shared.publish(tensor, self.timeout_s))
            return lambda: self._shared(lambda: self.shared.finish(k))
        work = self._start(_start_sum, tensor)
        return lambda: self._wait(work)

    def _all_gather_object(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise self._failure(e) from e
        return out


def torchrun_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def pin_cores(threads: int) -> Optional[list[int]]:
    """Pin this peer to its own `threads` cores of the ones it may use, if there are enough for every
    peer on this node; returns them (None: not pinned).

    Each peer then owns its cores: its gloo threads wake up next to the thread that waits for them,
    and never on a core where another peer computes (where a wake-up can wait for a scheduler tick).
    """
    if "LOCAL_RANK" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return None  # not started by torchrun: where the other local peers run is unknown
    local_rank, local_peers = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    mine = allowed[local_rank * threads:(local_rank + 1) * threads]
    if local_peers * threads > len(allowed) or len(mine) < threads:
        return None
    os.sched_setaffinity(0, mine)
    return mine


def resolve_backend(backend: str) -> str:
    """`auto` means NCCL when CUDA is available, else gloo; `nccl` without CUDA is a config error."""
    # NCCL puts each local peer on its own GPU (cuda:LOCAL_RANK): it needs one GPU per local peer.
    local_peers = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    enough = torch.cuda.is_available() and torch.cuda.device_count() >= local_peers
    if backend == "auto":
        return "nccl" if enough else "gloo"
    if backend == "nccl" and not enough:
        raise ConfigError("comm.backend", backend, f"nccl needs one CUDA GPU per local peer ({local_peers}), "
                                                   f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                                                   "allowed here: auto, gloo")
    return backend


def open_comm(cfg: CommConfig, spin: bool = False) -> Communicator:
    """Join the peers started by torchrun (once per process), or return a world of one.

    `spin`: wait for gloo collectives by polling (for a peer pinned to its own cores)."""
    comm = _open(cfg, spin)
    comm.overlap = cfg.overlap
    return comm


def _open(cfg: CommConfig, spin: bool) -> Communicator:
    rank, local_rank, world_size = torchrun_world()
    backend = resolve_backend(cfg.backend)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if world_size == 1:
        return LocalComm(device)
    if backend == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # The timeout bounds both connection set-up and every collective, so a dead or frozen peer
        # ends the job instead of hanging it. Created once per process: Hydra multirun jobs reuse it.
        timeout = timedelta(seconds=cfg.timeout_s)
        store = attempt_store(cfg.timeout_s)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        atexit.register(_destroy)
    log.debug("rank %d/%d joined with %s", rank, world_size, backend)
    comm = ProcessGroupComm(backend, device, cfg.timeout_s, spin)
    if backend == "gloo":
        comm.shared = _shared_memory(comm, spin)
    return comm


_SHARED: Optional[SharedMemorySum] = None


def _shared_memory(comm: ProcessGroupComm, spin: bool) -> Optional[SharedMemorySum]:
    """The shared-memory segment for sums, if every peer is on this node and pinned, else None.

    All peers must agree: one peer summing through memory while another uses gloo would hang both.
    Mapped once per process, like the process group; Hydra multirun jobs reuse it, and each job
    checks that every peer's count of calls through it is the same.
    """
    global _SHARED
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) == comm.world_size
    everyone = comm.all_gather_object((spin and local and supported(), _SHARED and _SHARED.calls))
    if not all(want for want, _ in everyone):
        return None
    if len({calls for _, calls in everyone}) > 1:
        raise comm._failure(SumFailed(f"shared-memory sums out of step between jobs: {everyone}"))
    if _SHARED is None:
        _SHARED = open_shared_sum(comm.rank, comm.world_size, comm.all_gather_object)
        if _SHARED is not None:
            log.info("peers on this node sum through shared memory")
    return _SHARED


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def differing_keys(everyone: list[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every peer's flat config."""
    diffs: set[str] = set()
    for other in everyone:
        keys = set(other) | set(everyone[0])
        diffs |= {k for k in keys if other.get(k) != everyone[0].get(k)}
    return sorted(diffs)


def _differs(keys: list[str]) -> ConfigError:
    return ConfigError("config", "differs between peers",
                       f"every peer must compose the same config; differing keys: {', '.join(keys[:8])}")


def agree_on_config(comm: Communicator, flat: dict[str, Any]) -> None:
    """Fail on every peer, naming the keys, if the peers did not compose the same config."""
    keys = differing_keys(comm.all_gather_object(flat))
    if keys:
        raise _differs(keys)


def agree_before_start(error: Optional[str], configs: list[dict[str, Any]], timeout_s: float) -> Optional[str]:
    """The one error every peer stops with before training, or None: the lowest rank's own validation
    error, else the keys in which the peers' configs (one flat dict per job) differ.

    Runs through the launcher's store, before any process group exists, so every peer exits alike.
    """
    rank, _, world_size = torchrun_world()
    if world_size == 1:
        return error
    everyone = gather_before_start(rank, world_size, {"error": error, "configs": configs}, timeout_s)
    if everyone is None:
        return error
    for r, peer in enumerate(everyone):
        if peer["error"]:
            return peer["error"] if r == 0 else f"rank {r}: {peer['error']}"
    for job in range(len(configs)):
        keys = differing_keys([peer["configs"][job] for peer in everyone])
        if keys:
            return str(_differs(keys))
    return None


def parameter_digest(tensors: list[torch.Tensor]) -> int:
    """A 63-bit digest of the exact bits of `tensors` (order matters)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_identical(comm: Communicator, tensors: list[torch.Tensor], what: str = "parameters") -> None:
    """Stop with a clear error if any peer's `tensors` differ bit-wise from rank 0's."""
    digests = torch.zeros(comm.world_size, dtype=torch.int64)
    digests[comm.rank] = parameter_digest(tensors)
    comm.all_reduce_sum(digests)
    bad = [r for r in range(comm.world_size) if digests[r] != digests[0]]
    if bad:
        raise PeerFailure(f"{what} diverged between peers: rank(s) {bad} differ from rank 0")
