"""The peers' key-value store, for what must work when collectives cannot: heartbeats and start-up checks.

A gloo collective that times out only tells a survivor that *some* peer did not show up. Every peer
therefore runs a daemon thread that writes `<beat> <phase>` to the store once a second; the beat of a
frozen (SIGSTOP) or dead peer stops. After a failed collective the survivors read every beat twice
and name the ranks whose beat did not move, with the phase each was last in.

The store is the one torchrun's agent hosts (MASTER_ADDR:MASTER_PORT). Peers started without an agent
(SLURM's or submitit's tasks, p2prl.launcher_env; or plain env:// start-up) have rank 0 host it there
for the whole process (`peers_store`), from the first start-up exchange on, so that their verdicts on
the command line meet before any process group exists; the process group then opens on it. Keys are
namespaced by attempt (`namespace`): the agent's store outlives restarts.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional

import torch.distributed as dist

log = logging.getLogger(__name__)
BEAT_S = 1.0  # a beat at least this often
# How long naming a silent peer may wait for the store. Short: the store's host (torchrun's agent) may be
# the one that died, and a signal cannot interrupt the connection attempt while it lasts.
STALLED_CONNECT_S = 1.0
MIN_GAP_S = 0.05  # and at most this often: a phase change is published within this delay
POLL_S = 0.01  # how often a start-up check looks for the other peers' values


def namespace() -> str:
    """The keys of this attempt, the same on every peer of it.

    Only a store that outlives restarts needs them told apart: torchrun's agent's, shared by its
    rounds. Its agent counts restarts after failures (TORCHELASTIC_RESTART_COUNT) but not those after
    a membership change, which change the world size instead: together they tell the attempts apart.
    Each agent keeps its own count, though, and after a node leaves one agent may have seen a failed
    peer (counted) where another saw only the new round (not counted): the counts of one attempt then
    differ between nodes. A store that rank 0 hosts (no agent's, or one per round, as
    launch/multinode.sh has for elastic jobs) is fresh in every attempt, so there the count is left out
    and the peers of an attempt always meet."""
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if _agent_hosts() else "0"
    return f"p2prl/{restarts}-{os.environ.get('WORLD_SIZE', '1')}"


_WARNED: list[bool] = []  # restart_hazard logged once per process
_OWN: list[dist.TCPStore] = []  # the store rank 0 hosts without an agent (or a client of it), for the process's life


def connect(timeout_s: float = 5.0) -> Optional[dist.Store]:
    """A client of the launcher's store, or None without one (a world of one, another launcher)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, ValueError, OSError):
        return None


def _agent_hosts(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether torchrun's agent hosts the store (its clients are the peers)."""
    return (os.environ if env is None else env).get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def restart_hazard(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why this job's peers may fail to meet after a restart, or None: torchrun's agents on several
    nodes share a store across rounds and may restart, so the restart counts that name an attempt's keys
    (here and in torch's own start-up) can differ between nodes after a node fails (`namespace`)."""
    env = os.environ if env is None else env
    nodes, restarts = env.get("GROUP_WORLD_SIZE", "1"), env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if not _agent_hosts(env) or not (nodes.isdigit() and restarts.isdigit()):
        return None
    if int(nodes) <= 1 or int(restarts) <= 0:
        return None
    return (f"torchrun's agents on {nodes} nodes share one store across restarts (--max-restarts={restarts}): "
            "after a node fails the survivors may count restarts differently and wait for each other until "
            "comm.timeout_s; use --rdzv-backend=c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node "
            "(launch/multinode.sh does both)")


def peers_store(timeout_s: float, world_size: Optional[int] = None) -> Optional[dist.Store]:
    """The store every peer of this world reaches: a client of torchrun's agent's, or the one rank 0
    hosts without an agent (made once per process: multirun jobs share it); None for a world of one
    or without MASTER_ADDR/MASTER_PORT. Raises `StartTimeout` when rank 0's store does not come up."""
    if (world_size or int(os.environ.get("WORLD_SIZE", 1))) <= 1:
        return None
    if _agent_hosts():
        hazard = restart_hazard()
        if hazard and os.environ.get("RANK", "0") == "0" and not _WARNED:
            _WARNED.append(True)
            log.warning(hazard)
        return connect(timeout_s)
    if not _OWN:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        rank0 = os.environ.get("RANK", "0") == "0"
        try:
            _OWN.append(dist.TCPStore(host, int(port), is_master=rank0, timeout=timedelta(seconds=timeout_s),
                                      wait_for_workers=False))
        except (RuntimeError, ValueError, OSError) as e:
            what = f"cannot host the peers' store at {host}:{port}" if rank0 else \
                f"rank 0's store at {host}:{port} did not answer within {timeout_s:g} s"
            raise StartTimeout(f"{what} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
    return _OWN[0]


def attempt_store(timeout_s: float) -> Optional[dist.Store]:
    """The store for this attempt's process group (`peers_store`, keys prefixed by attempt).

    torchrun's agent keeps one store across restarts, and a process group's keys from the previous
    attempt (peer addresses) are still there: the restarted peers may read them and dial dead ports
    (pytorch/pytorch#135712). Namespacing the keys by attempt avoids that.
    """
    store = peers_store(timeout_s)
    return None if store is None else dist.PrefixStore(f"{namespace()}/pg", store)


class StartTimeout(RuntimeError):
    """A peer did not reach a start-up exchange within comm.timeout_s; `str()` is the one line to show."""


def gather_before_start(rank: int, world_size: int, value: Any, timeout_s: float, tag: str) -> Optional[list]:
    """Every peer's JSON-able `value`, by rank, through the store: no process group is needed yet.

    Used to check every peer's configuration before any of them starts. None without a store (a world
    of one). Raises `StartTimeout` when some peer's value is not there within `timeout_s`.
    """
    store = peers_store(timeout_s, world_size)
    if store is None:
        return None
    keys = [f"{namespace()}/start/{tag}/{r}" for r in range(world_size)]
    store.set(keys[rank], json.dumps(value))
    # Polled rather than store.wait: its timeout is a C++ trace and socket warnings, not one line.
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = ", ".join(str(r) for r, k in enumerate(keys) if not store.check([k]))
            raise StartTimeout(f"the start-up check '{tag}' timed out after comm.timeout_s={timeout_s:g}: rank(s) "
                               f"{missing} never reached it (stuck, or running other jobs than this peer)")
        time.sleep(POLL_S)
    values = [json.loads(store.get(k)) for k in keys]
    # A bad command line ends every peer at once. Under torchrun the first peer to exit has the agent
    # terminate the others: all leave the exchange together, once every peer has read the verdicts.
    _wait_for(store, [f"{namespace()}/start/{tag}/read/{r}" for r in range(world_size)], rank, timeout_s)
    # And rank 0 must not take the store it hosts with it while another peer still polls it (the
    # client's next request fails with C++ warnings on stderr): it leaves last.
    left = [f"{namespace()}/start/{tag}/left/{r}" for r in range(world_size)]
    if _hosting():
        _wait_for(store, left[1:], None, timeout_s)
    elif _OWN:
        store.set(left[rank], "1")  # a set waits for no answer: the client's last request
    return values


def _hosting() -> bool:
    """Whether this process hosts the peers' store (rank 0 without torchrun's agent)."""
    return bool(_OWN) and os.environ.get("RANK", "0") == "0"


def _wait_for(store: dist.Store, keys: list[str], own: Optional[int], timeout_s: float) -> None:
    """Set `keys[own]` (unless None), then wait until every key is set; bounded: a peer that died sets nothing."""
    if own is not None:
        store.set(keys[own], "1")
    deadline = time.monotonic() + timeout_s
    while not store.check(keys) and time.monotonic() < deadline:
        time.sleep(POLL_S)


class Heartbeat:
    """A daemon thread that publishes this peer's liveness and phase; `stalled()` names the silent peers."""

    def __init__(self, rank: int, world_size: int, phase: Callable[[], str]) -> None:
        self.rank, self.world_size, self._phase = rank, world_size, phase
        self._stop = threading.Event()
        self._poked = threading.Event()
        self._store = connect()
        self._beat = 0
        if self._store is not None:
            self._thread = threading.Thread(target=self._run, name="p2prl-heartbeat", daemon=True)
            self._thread.start()

    def _key(self, rank: int) -> str:
        return f"{namespace()}/heartbeat/{rank}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.set(self._key(self.rank), f"{self._beat} {self._phase()}")
            except (RuntimeError, OSError):
                pass  # the store's host is gone: the collectives will say so
            self._beat += 1
            self._stop.wait(MIN_GAP_S)
            self._poked.wait(BEAT_S)
            self._poked.clear()

    def poke(self) -> None:
        """The phase changed: publish it soon."""
        self._poked.set()

    def stop(self) -> None:
        self._stop.set()
        self._poked.set()

    def _read(self, store: dist.Store) -> dict[int, str]:
        out = {}
        for r in range(self.world_size):
            if r != self.rank and store.check([self._key(r)]):
                out[r] = store.get(self._key(r)).decode()
        return out

    def stalled(self) -> Optional[dict[int, str]]:
        """{rank: phase it was last in} for peers whose beat stopped; None if the store cannot tell."""
        if self._store is None:
            return None
        store = connect(STALLED_CONNECT_S)
        if store is None or self._store is None:
            return None
        try:
            first = self._read(store)
            time.sleep(2.5 * BEAT_S)
            second = self._read(store)
        except (RuntimeError, OSError):
            return None
        silent = [r for r in range(self.world_size) if r != self.rank and first.get(r) == second.get(r)]
        return {r: (second.get(r) or "? startup").split(" ", 1)[1] for r in silent}
