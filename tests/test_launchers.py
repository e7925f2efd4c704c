"""launch/: the scripts parse, use torchrun's c10d rendezvous, and launch/slurm.sbatch runs end to end
with stub `srun` and `scontrol` commands that start its "nodes" on this machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)
TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        "train.total_steps=256", "train.log_every_steps=64", "train.target_return=null"]

SRUN = """#!/usr/bin/env bash
# srun's part here: --ntasks=N tasks, one per "node", each with its SLURM_NODEID / SLURM_PROCID.
n=1
args=()
for a in "$@"; do
  case "$a" in --ntasks=*) n=${a#--ntasks=} ;; --*) ;; *) args+=("$a") ;; esac
done
pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "${args[@]}" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames LIST`: every node of this allocation is this machine.
[ "$1 $2" = "show hostnames" ] || exit 1
for ((i = 0; i < SLURM_NNODES; i++)); do echo localhost; done
"""


@pytest.mark.parametrize("script", ["local.sh", "multinode.sh", "slurm.sbatch"])
def test_launchers_parse_and_use_c10d(script):
    path = ROOT / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert "--rdzv-backend=c10d" in text or "launch/multinode.sh" in text


def _stubs(tmp_path, scontrol: str = SCONTROL):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", scontrol)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    return stubs


def test_slurm_script_refuses_a_head_node_without_an_address(tmp_path):
    unknown = SCONTROL.replace("echo localhost", "echo no-such-node.invalid")
    env = {**os.environ, "PATH": f"{_stubs(tmp_path, unknown)}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "x[1-2]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("HEAD_ADDR", None)
    p = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "algo=ppo"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip() == ("slurm.sbatch: the head node no-such-node.invalid has no IPv4 address here "
                                "(getent ahostsv4); set HEAD_ADDR")


def test_slurm_script_end_to_end_with_stub_srun_and_scontrol(tmp_path):
    stubs = _stubs(tmp_path)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[01-02]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": str(4000 + os.getpid() % 1000), "SLURM_SUBMIT_DIR": str(ROOT),
           "IFNAME": "lo", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    p = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), *TINY, f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_step"] == s["config"]["train"]["total_steps"]
    assert sorted(x.name for x in (run_dir / "checkpoints").iterdir() if x.is_dir()) == ["rank0", "rank1"]
