"""Hydra multirun under torchrun: one process group serves every job; one subdir per job."""
import json

import pytest

TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        "train.total_steps=256", "train.log_every_steps=64", "train.target_return=null"]

pytestmark = pytest.mark.timeout(180)


def test_two_peer_sweep_writes_one_dir_per_job(tmp_path, cli):
    sweep = tmp_path / "sweep"
    p = cli(["-m", "algo.lr=1e-3,3e-4", *TINY, f"hydra.sweep.dir={sweep}"], nproc=2, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert out.count("Launching 2 jobs locally") == 1 and out.count("#1 : algo.lr=0.0003") == 1, out[-3000:]
    lrs = []
    for job in ("0", "1"):
        s = json.loads((sweep / job / "summary.json").read_text())
        assert s["world_size"] == 2 and s["final_step"] == s["config"]["train"]["total_steps"]
        lrs.append(s["config"]["algo"]["lr"])
    assert lrs == [1e-3, 3e-4]
