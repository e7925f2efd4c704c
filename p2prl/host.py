"""Where this peer runs: what its launcher's environment says about it (ranks, the node's layout), its
device and backend, its cores (the cgroup's CPU quota, the cores free of other jobs, pinning), and
the run id.

torchrun sets RANK (global identity), LOCAL_RANK (which GPU on this node), WORLD_SIZE and
LOCAL_WORLD_SIZE; a peer that SLURM or submitit started derives them from its launcher's variables
first (`p2prl.launcher_env`). Without them this process is a world of one.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import torch

from p2prl.checks import ConfigError

log = logging.getLogger(__name__)
PF_KTHREAD = 0x00200000  # /proc/<pid>/stat flags: a kernel thread (pinned per core by design)


def torchrun_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Devices(NamedTuple):
    """Where a peer computes and how the peers sum, and why."""

    device: str  # cpu | cuda (this peer's GPU is cuda:LOCAL_RANK)
    backend: str  # gloo | nccl
    reason: str


def choose_devices(device: str, backend: str, gpus: int, local_peers: int, image_obs: bool) -> Devices:
    """Resolve the top-level `device` (auto|cpu|cuda) and `comm.backend` (auto|gloo|nccl).

    `auto` puts image encoders on a GPU and small MLP policies on the CPU, where they are usually
    faster (every step's tiny kernels and host-device copies cost more than the math). NCCL reduces GPU
    tensors only and refuses two ranks on one GPU, so it needs `cuda` and one GPU per local peer; gloo
    sums CPU or GPU tensors, so with gloo several peers may share a GPU (cuda:LOCAL_RANK % GPUs).
    Raises ConfigError for a combination that cannot run here.
    """
    per_peer = gpus >= local_peers and gpus > 0
    if device == "cuda" and gpus == 0:
        raise ConfigError("device", device, "needs a CUDA GPU, found none; allowed here: auto, cpu")
    if backend == "nccl" and (device == "cpu" or not per_peer):
        why = "device=cpu" if device == "cpu" else f"{gpus} CUDA GPU(s) for {local_peers} local peer(s)"
        raise ConfigError("comm.backend", backend, f"nccl needs one CUDA GPU per local peer and device=cuda or "
                                                   f"auto, here {why}; allowed here: auto, gloo")
    if device == "auto":
        if backend == "nccl":
            device, reason = "cuda", "comm.backend=nccl reduces GPU tensors"
        elif per_peer and image_obs:
            device, reason = "cuda", "image observations: the encoder runs on this peer's GPU"
        elif per_peer:
            device, reason = "cpu", "a small MLP policy: faster on the CPU than on the GPU"
        else:
            device, reason = "cpu", f"{gpus} CUDA GPU(s) for {local_peers} local peer(s)"
    else:
        reason = f"device={device}"
    if backend == "auto":
        backend = "nccl" if device == "cuda" and per_peer else "gloo"
    return Devices(device, backend, reason)


def resolve_devices(device: str, backend: str, image_obs: bool, local_peers: Optional[int] = None) -> Devices:
    """`choose_devices` for this machine and `local_peers` on it (default: torchrun's local layout)."""
    local_peers = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_peers is None else local_peers
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_devices(device, backend, gpus, local_peers, image_obs)


# -- the run id ------------------------------------------------------------------------------------
_RUN_ID: Optional[str] = None


def _agent_started() -> Optional[datetime]:
    """When this process's parent (torchrun's agent) started: the same for all of its workers and
    across its restarts of them. Linux only."""
    try:
        start_ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return datetime.fromtimestamp(boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_id() -> str:
    """The same id on every peer and across torchrun restarts, so a restarted peer finds its run dir:
    torchrun's run id (--rdzv-id; a fresh uuid with --standalone); without one, the start time of
    torchrun's agent; for the tasks of a job that SLURM or submitit started (`p2prl.launcher_env`), the job's
    id, as launch/slurm.sbatch names it (a requeued job finds its run again); otherwise the current
    time."""
    global _RUN_ID
    if _RUN_ID is None:
        rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
        started = _agent_started() if "TORCHELASTIC_RESTART_COUNT" in os.environ else None
        if rid and rid != "none":
            _RUN_ID = rid
        elif os.environ.get("P2PRL_LAUNCHER_JOB"):
            _RUN_ID = f"p2prl-{os.environ['P2PRL_LAUNCHER_JOB']}"
        else:
            _RUN_ID = (started or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S_%f")[:-3]
    return _RUN_ID


# -- cores -----------------------------------------------------------------------------------------
class Placement(NamedTuple):
    """Where this peer runs: its own cores (None: not pinned), and why."""

    cores: Optional[list[int]]
    reason: str

    @property
    def spin(self) -> bool:
        """Whether this peer may wait for collectives by polling: only on cores of its own."""
        return self.cores is not None


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), cgroup_file: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """The cores' worth of CPU time this process's cgroups grant (the smallest quota on the path to the
    root, cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us / cpu.cfs_period_us`); None if unlimited."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2 (unified)
            bases = [root, root / "unified"]
            for base in bases:
                limits += _walk(base, rel, lambda d: _v2_limit(d / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                limits += _walk(mount, rel, _v1_limit)
    return min(limits) if limits else None


def _walk(base: Path, rel: str, read) -> list[float]:
    """The limits found at base/rel and each of its parents up to base."""
    out = []
    d = base / rel if rel else base
    while True:
        if (limit := read(d)) is not None:
            out.append(limit)
        if d == base or base not in d.parents:
            return out
        d = d.parent


def _v2_limit(path: Path) -> Optional[float]:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(d: Path) -> Optional[float]:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cores_pinned_by_others(allowed: set[int], pids: Optional[Iterable[int]] = None) -> dict[int, int]:
    """{core: pid} for cores that some other user process (not this job's own peers) is pinned to,
    i.e. whose affinity is a strict subset of `allowed`; the first such process found per core.
    Kernel threads are pinned per core by design and do not count. `pids`: only these processes
    (default: every process in /proc)."""
    me, agent = os.getpid(), os.getppid()
    taken: dict[int, int] = {}
    entries = Path("/proc").iterdir() if pids is None else (Path("/proc") / str(pid) for pid in pids)
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in (me, agent):
            continue
        pid = int(entry.name)
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == agent or int(fields[6]) & PF_KTHREAD or int(fields[1]) == 2:
                continue  # a sibling peer of this job, or a kernel thread
            cpus = os.sched_getaffinity(pid)
        except (OSError, ValueError, IndexError):
            continue
        if cpus < allowed:
            for c in cpus:
                taken.setdefault(c, pid)
    return taken


def place(threads: int, quota: Optional[float] = None, taken: Optional[dict[int, int]] = None) -> Placement:
    """Choose this peer's own `threads` cores, if this node has enough for every local peer: among the
    cores this process may use, not pinned by another job, and within the cgroup's CPU quota. Only
    decides; `pin` applies it. `quota` and `taken` default to this machine's."""
    if "LOCAL_RANK" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return Placement(None, "not started by torchrun: where the other local peers run is unknown")
    local_rank, local_peers = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return Placement(None, "this platform cannot pin processes")
    need = local_peers * threads
    quota = cpu_quota() if quota is None else quota
    if quota is not None and quota < need:
        return Placement(None, f"the cgroup's CPU quota grants {quota:g} cores for {local_peers} local "
                               f"peer(s) x {threads} thread(s)")
    taken = cores_pinned_by_others(allowed) if taken is None else taken
    free = sorted(c for c in allowed if c not in taken)
    busy = f"; cores pinned by other processes: {_ranges(sorted(taken))}" if taken else ""
    if len(free) < need:
        return Placement(None, f"{len(free)} free core(s) for {local_peers} local peer(s) x {threads} "
                               f"thread(s){busy}")
    mine = free[local_rank * threads:(local_rank + 1) * threads]
    return Placement(mine, f"{local_peers} local peer(s) x {threads} thread(s) on free cores "
                           f"{_ranges(free)}{busy}; CPU quota {'none' if quota is None else f'{quota:g} cores'}")


def pin(placement: Placement) -> None:
    if placement.cores is not None:
        os.sched_setaffinity(0, placement.cores)


def _ranges(cores: list[int]) -> str:
    return ",".join(map(str, cores)) if len(cores) < 6 else f"{cores[0]}-{cores[-1]} ({len(cores)})"
