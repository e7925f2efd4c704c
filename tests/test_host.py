"""Where a peer runs: its own cores when the node has enough free ones within the cgroup's CPU quota
(cgroup v1 and v2), never cores another job is pinned to, and spinning only on cores of its own; and
which device and backend `device` and `comm.backend` resolve to."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import p2prl.host as host
from p2prl.checks import ConfigError
from p2prl.host import choose_devices, cores_pinned_by_others, cpu_quota, place


@pytest.fixture
def node(monkeypatch):
    """`node(allowed, local_peers, local_rank)`: this process as a torchrun peer on such a node."""
    def set_up(allowed, local_peers, local_rank):
        monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(allowed))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_peers))
    return set_up


@pytest.mark.parametrize("allowed, local_peers, threads, local_rank, expected", [
    ({0, 1}, 2, 1, 1, [1]),              # 2 peers, 2 cores: one each
    ({2, 3, 5, 7}, 2, 2, 1, [5, 7]),     # 2 threads each, from the cores this process may use
    ({0, 1}, 3, 1, 0, None),             # more peers than cores: nobody is pinned
    ({0, 1, 2, 3}, 2, 3, 0, None),       # not enough cores for every peer's threads
])
def test_each_local_peer_gets_its_own_cores(node, allowed, local_peers, threads, local_rank, expected):
    node(allowed, local_peers, local_rank)
    p = place(threads, quota=None, taken={})
    assert p.cores == expected and p.spin == (expected is not None), p.reason


def test_cores_pinned_by_another_job_are_left_alone(node):
    node({0, 1, 2, 3}, 2, 1)
    p = place(1, quota=None, taken={0: 4242})
    assert p.cores == [2] and "pinned by other processes: 0" in p.reason
    node({0, 1}, 2, 0)
    p = place(1, quota=None, taken={1: 4242})
    assert p.cores is None and not p.spin and "1 free core(s) for 2 local peer(s)" in p.reason


def test_never_spins_on_more_cores_than_the_cpu_quota_grants(node):
    node({0, 1, 2, 3}, 2, 0)
    assert place(1, quota=2.0, taken={}).cores == [0]
    p = place(1, quota=1.5, taken={})
    assert p.cores is None and not p.spin and "quota grants 1.5 cores for 2 local peer(s)" in p.reason


def test_not_pinned_without_torchruns_local_layout(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert place(1).cores is None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cpu_quota_cgroup_v1(tmp_path):
    root, cgroup = tmp_path / "fs", tmp_path / "cgroup"
    _write(cgroup, "4:memory:/job\n2:cpu,cpuacct:/job/step\n0::/\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # unlimited at the root
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "job" / "step" / "cpu.cfs_quota_us", "150000\n")  # the tightest
    _write(root / "cpu,cpuacct" / "job" / "step" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(root, cgroup) == 1.5


def test_cpu_quota_cgroup_v2(tmp_path):
    root, cgroup = tmp_path / "fs", tmp_path / "cgroup"
    _write(cgroup, "0::/user.slice/job\n")
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(root / "user.slice" / "cpu.max", "max 100000\n")
    _write(root / "user.slice" / "job" / "cpu.max", "250000 100000\n")
    assert cpu_quota(root, cgroup) == 2.5
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    assert cpu_quota(root, cgroup) is None


def test_this_machines_quota_is_read_without_error():
    quota = cpu_quota()
    assert quota is None or quota > 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin one of them")
def test_a_process_pinned_to_a_core_is_seen():
    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    job = subprocess.Popen([sys.executable, "-c", f"import os, signal, sys; os.sched_setaffinity(0, {{{core}}}); "
                            "print('pinned', flush=True); signal.pause()"], stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "pinned"
        # Other processes on this machine may be pinned to the same core: the scan of every process
        # sees the core taken, the scan of the job alone names the job.
        assert core in cores_pinned_by_others(allowed)
        assert cores_pinned_by_others(allowed, pids=[job.pid]) == {core: job.pid}
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.pid not in cores_pinned_by_others(allowed).values()
    assert cores_pinned_by_others(allowed, pids=[job.pid]) == {}


# -- device and backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend, gpus, peers, image, expected", [
    ("auto", "auto", 0, 2, False, ("cpu", "gloo")),
    ("auto", "auto", 0, 2, True, ("cpu", "gloo")),        # no GPU: images too on the CPU
    ("auto", "auto", 2, 2, False, ("cpu", "gloo")),       # small MLPs stay on the CPU
    ("auto", "auto", 2, 2, True, ("cuda", "nccl")),       # image encoders on the GPUs
    ("auto", "auto", 1, 2, True, ("cpu", "gloo")),        # not a GPU per peer
    ("auto", "nccl", 2, 2, False, ("cuda", "nccl")),
    ("cpu", "auto", 8, 2, True, ("cpu", "gloo")),         # cpu forces gloo even with CUDA
    ("cuda", "auto", 2, 2, False, ("cuda", "nccl")),
    ("cuda", "auto", 1, 2, False, ("cuda", "gloo")),      # two peers on one GPU: gloo over CUDA tensors
    ("cuda", "gloo", 4, 2, False, ("cuda", "gloo")),
])
def test_device_and_backend_choice(device, backend, gpus, peers, image, expected):
    d = choose_devices(device, backend, gpus, peers, image)
    assert (d.device, d.backend) == expected and d.reason


@pytest.mark.parametrize("device, backend, gpus, peers, key", [
    ("cuda", "auto", 0, 1, "device=cuda"),
    ("cpu", "nccl", 4, 1, "comm.backend=nccl"),
    ("cuda", "nccl", 1, 2, "comm.backend=nccl"),          # NCCL refuses two ranks on one GPU
    ("auto", "nccl", 0, 1, "comm.backend=nccl"),
])
def test_device_and_backend_refusals(device, backend, gpus, peers, key):
    with pytest.raises(ConfigError, match=key):
        choose_devices(device, backend, gpus, peers, False)
