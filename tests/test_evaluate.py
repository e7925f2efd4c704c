"""Greedy evaluation of a finished run's checkpoint writes eval.json."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
PPO = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2"]
RUN = ["train.total_steps=256", "train.log_every_steps=64", "train.target_return=null"]


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_evaluate_latest_checkpoint(run_dir, algo, cli):
    extra = ["algo.learning_starts=64", "algo.batch_size=16"] if algo == "dqn" else PPO
    p = cli([f"algo={algo}", *extra, *RUN, f"hydra.run.dir={run_dir}"])
    assert p.returncode == 0, p.stderr
    e = subprocess.run([sys.executable, "-m", "p2prl.evaluate", str(run_dir), "--episodes", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert e.returncode == 0, e.stderr
    res = json.loads((run_dir / "eval.json").read_text())
    assert len(res["returns"]) == 3 and res["checkpoint"].endswith("step_256.pt")
    assert res["min_return"] <= res["mean_return"] <= res["max_return"] and res["min_return"] >= 8


def test_evaluate_rejects_a_dir_that_is_not_a_run(tmp_path):
    e = subprocess.run([sys.executable, "-m", "p2prl.evaluate", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert e.returncode == 2 and "not a p2prl run dir" in e.stderr and "Traceback" not in e.stderr


def test_a_negative_seed_is_one_line_and_exit_2(run_dir, compose):
    from p2prl.runner import run
    run(compose(*PPO, "train.total_steps=64", "train.log_every_steps=64", "train.target_return=null"), run_dir)
    e = subprocess.run([sys.executable, "-m", "p2prl.evaluate", str(run_dir), "--seed", "-1", "--episodes", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert e.returncode == 2, e.stderr
    assert e.stderr == "p2prl: error: --seed=-1: must be an integer >= 0 (episode i is seeded seed + i)\n", e.stderr
    assert not (run_dir / "eval.json").exists()
