"""`open_comm`: join the peers torchrun started, and choose how they sum.

- One process: a world of one (`LocalComm`).
- Flat (`comm.topology=flat`, or one node, or one peer per node): one all-reduce among all peers; when
  every peer is on one node and owns its cores, through one shared-memory segment.
- Hierarchical (`comm.topology=hierarchical`, or `auto` with several nodes of which some holds more
  than one peer): node, then the nodes' leaders, then node (`p2prl.comm.hierarchical`); each node's
  peers share a segment of their own when they all own their cores.

The process group, its subgroups and the segments are made once per process: Hydra multirun jobs
reuse them, and check that every peer's count of calls through a segment is the same.
"""
from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from p2prl.comm.base import Communicator
from p2prl.comm.hierarchical import HierarchicalComm, Layout, make_groups
from p2prl.comm.local import LocalComm
from p2prl.comm.process_group import PeerFailure, ProcessGroupComm
from p2prl.comm.segment import supported
from p2prl.comm.shm import SharedMemorySum, SumFailed, open_shared_sum
from p2prl.comm.store import attempt_store
from p2prl.config import CommConfig
from p2prl.host import torchrun_world

log = logging.getLogger(__name__)
_SEGMENTS: dict[tuple, Optional[SharedMemorySum]] = {}  # by the ranks that share one
_GROUPS: dict[Layout, object] = {}


def node_key() -> str:
    """What names this peer's node: torchrun's node rank, else the host name."""
    return os.environ.get("GROUP_RANK") or os.uname().nodename


def open_comm(cfg: CommConfig, backend: str, cores: Optional[list[int]] = None, device: str = "cpu") -> Communicator:
    """Join the peers started by torchrun (once per process), or return a world of one.

    `backend` and `device` (cpu, or cuda: this peer's GPU cuda:LOCAL_RANK, shared round-robin under
    gloo when there are fewer GPUs than local peers) as resolved for this
    machine (`p2prl.comm.resolve_devices`); `cores`: the
    cores this peer is pinned to (`p2prl.comm.place`). A peer whose cores no other peer of its node
    shares may wait for collectives by polling; the peers of a node that all own their cores sum
    through shared memory.
    """
    rank, local_rank, world_size = torchrun_world()
    assert backend != "nccl" or device == "cuda", "NCCL reduces GPU tensors only"
    where = torch.device("cuda", local_rank % torch.cuda.device_count()) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    if world_size == 1:
        return LocalComm(where)
    if not dist.is_initialized():
        # The timeout bounds both connection set-up and every collective, so a dead or frozen peer
        # ends the job instead of hanging it.
        timeout = timedelta(seconds=cfg.timeout_s)
        store = attempt_store(cfg.timeout_s)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
        atexit.register(_destroy)
    log.debug("rank %d/%d joined with %s", rank, world_size, backend)
    everyone: list = [None] * world_size
    try:
        dist.all_gather_object(everyone, (node_key(), cores))
    except RuntimeError as e:  # a peer died during start-up
        raise PeerFailure(f"a peer did not join the process group within comm.timeout_s={cfg.timeout_s:g} s: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    layout = Layout.of([key for key, _ in everyone])
    hierarchical = cfg.topology == "hierarchical" or (cfg.topology == "auto" and layout.worth_it)
    if hierarchical and len(layout.nodes) > 1:
        if layout not in _GROUPS:
            _GROUPS[layout] = make_groups(layout, rank)
        comm: ProcessGroupComm = HierarchicalComm(backend, where, cfg.timeout_s, layout, _GROUPS[layout])
        peers = layout.node_of(rank)
    else:
        comm = ProcessGroupComm(backend, where, cfg.timeout_s)
        peers = tuple(range(world_size))
    # Every peer chose its cores alone: make sure no two peers of one node took the same ones.
    mine = layout.node_of(rank)
    others = {c for r in mine if r != rank for c in everyone[r][1] or ()}
    own = cores is not None and not others & set(cores)
    if cores is not None and not own:
        log.warning("rank %d: another peer of this node is pinned to some of cores %s: waiting by sleeping", rank, cores)
    comm.spin = own and backend == "gloo"
    if backend == "gloo":
        one_node = len(layout.nodes) == 1
        gather = comm.all_gather_object if peers == tuple(range(world_size)) else _gather_in(comm.groups.node)
        segment = _segment(comm, peers, gather, own and len(peers) > 1 and (one_node or isinstance(comm, HierarchicalComm)))
        if isinstance(comm, HierarchicalComm):
            comm.node_shared = segment
        else:
            comm.shared = segment
    log.info("peers sum %s", _describe(comm, layout))
    return comm


def _gather_in(group) -> Callable[[object], list]:
    def gather(obj: object) -> list:
        out: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out
    return gather


def _segment(comm: ProcessGroupComm, peers: tuple[int, ...], gather: Callable[[object], list],
             want: bool) -> Optional[SharedMemorySum]:
    """The shared-memory segment of `peers` (this peer among them), if all of them may use it, else None.

    All of them must agree: one peer summing through memory while another uses gloo would hang both.
    """
    segment = _SEGMENTS.get(peers)
    everyone = gather((want and supported(), segment and segment.calls))
    if not all(ok for ok, _ in everyone):
        return None
    if len({calls for _, calls in everyone}) > 1:
        raise comm.failure(SumFailed(f"shared-memory sums out of step between jobs: "
                                     f"{[calls for _, calls in everyone]}", mismatch=True))
    if peers not in _SEGMENTS:
        _SEGMENTS[peers] = open_shared_sum(peers.index(comm.rank), len(peers), gather, list(peers))
    return _SEGMENTS[peers]


def _describe(comm: ProcessGroupComm, layout: Layout) -> str:
    nodes = f"{len(layout.nodes)} node(s) of {'/'.join(str(len(n)) for n in layout.nodes)} peer(s)"
    if isinstance(comm, HierarchicalComm):
        inside = "shared memory" if comm.node_shared is not None else f"{comm.backend} in the node"
        return f"hierarchically over {nodes}: {inside}, then {comm.backend} between the nodes' leaders"
    return f"flat over {nodes}: {'shared memory' if comm.shared is not None else comm.backend}"


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
