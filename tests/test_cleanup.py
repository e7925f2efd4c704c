"""kill -9 of one peer at six moments of start-up and training: the job ends, and it leaves no file in
/dev/shm (the shared-memory segment has no name) and no process behind."""
import os
import uuid
from pathlib import Path

import pytest

from p2prl.comm.segment import supported
from p2prl.host import cores_pinned_by_others

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not supported(), reason="shared-memory sums need x86-64 and memfd_create")]
ENDLESS = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
           "train.total_steps=100000000", "train.log_every_steps=64", "train.target_return=null",
           "checkpoint.every_steps=512", "comm.timeout_s=10"]


def _maps_segment(pid: int) -> bool:
    try:
        return "memfd:p2prl-sum" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# (moment, the rank killed, the condition that marks the moment)
MOMENTS = [
    ("importing", 1, lambda run_dir, pids: True),
    ("hydra made the run dir", 0, lambda run_dir, pids: (run_dir / ".hydra").is_dir()),
    ("rank 0 mapped the segment", 0, lambda run_dir, pids: _maps_segment(pids[0])),
    ("rank 1 mapped the segment", 1, lambda run_dir, pids: _maps_segment(pids[1])),
    ("training", 0, lambda run_dir, pids: (run_dir / "metrics.jsonl").is_file()),
    ("checkpointing", 1, lambda run_dir, pids: any((run_dir / "checkpoints" / "rank1").glob("step_*.pt"))),
]


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries `marker`."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("moment, victim, reached", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_kill_9_leaves_nothing_behind(moment, victim, reached, tmp_path, torchrun):
    if "segment" in moment:
        # The peers sum through shared memory only when each owns a core; cores that other processes
        # on this machine are pinned to are not theirs to take, and then the segment never appears.
        allowed = os.sched_getaffinity(0)
        if len(allowed - set(cores_pinned_by_others(allowed))) < 2:
            pytest.skip("other processes are pinned to this machine's cores: the peers cannot own two")
    shm_before = set(os.listdir("/dev/shm"))
    marker = f"p2prl-cleanup-{uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    job = torchrun.start([*ENDLESS, f"hydra.run.dir={run_dir}"], env={"P2PRL_TEST_MARK": marker})
    pids = torchrun.wait_until(lambda: (w := torchrun.workers(job.pid)) and len(w) == 2 and w, 60, "both workers")
    torchrun.wait_until(lambda: reached(run_dir, pids), 90, moment)
    os.kill(pids[victim], 9)
    out = torchrun.finish(job, 120)
    assert job.returncode != 0, out[-2000:]
    assert not any(torchrun.alive(p) for p in pids.values()), out[-2000:]
    assert _marked(marker) == [], "processes of the job are still running"
    assert set(os.listdir("/dev/shm")) <= shm_before, set(os.listdir("/dev/shm")) - shm_before


def test_kill_9_between_creating_and_sharing_the_segment_leaves_no_file():
    # The creator dies right after making the segment, before any other peer could open it.
    import subprocess
    import sys
    shm_before = set(os.listdir("/dev/shm"))
    code = ("import os\nfrom p2prl.comm.segment import open_segment\n"
            "open_segment(0, 2, lambda obj: os.kill(os.getpid(), 9))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    assert set(os.listdir("/dev/shm")) <= shm_before, set(os.listdir("/dev/shm")) - shm_before
