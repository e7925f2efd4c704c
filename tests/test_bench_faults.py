"""python -m p2prl.bench --faults K: the fault plan, reading a job's log, the comparison and the table on
synthetic input, the refusals, and (slow) five faults in one CartPole PPO run that ends bit-identical to
the same run uninterrupted."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2prl.bench import faultbench, faults, nodeloss
from p2prl.checks import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def test_the_plan_spreads_k_faults_over_the_budget():
    plan = faults.plan(20, 2 * 1024 * 22, 1024, 256, random.Random(0))
    steps = [f.at_step for f in plan]
    assert len(plan) == 20 and {f.kind for f in plan} == set(faults.KINDS)
    assert all(s % 256 == 0 for s in steps) and steps[0] >= 2048 and steps[-1] <= 2 * 1024 * 21
    assert all(b - a >= 1024 - 256 for a, b in zip(steps, steps[1:]))  # at least a checkpoint apart (rounded up)
    assert [f.kind for f in faults.plan(20, 2 * 1024 * 22, 1024, 256, random.Random(0))] == [f.kind for f in plan]


def test_the_job_log_gives_rank_0s_progress_and_each_resume(tmp_path):
    path = tmp_path / "log"
    lines = ["[2026-01-01 10:00:00,000][rank 0][INFO] step 256  return 20.1  1300 steps/s",
             "[2026-01-01 10:00:00,250][rank 1][INFO] step 999  return 1  1 steps/s",
             "[2026-01-01 10:00:00,200][rank 0][INFO] step 512  return 22.0  1310 steps/s",
             "W1201 torchrun: Sending process 7 closing signal SIGTERM",
             "[2026-01-01 10:00:05,000][rank 1][INFO] resumed from /r/checkpoints/step_256.pt at step 256",
             "[2026-01-01 10:00:05,000][rank 0][INFO] resumed from /r/checkpoints/step_256.pt at step 256"]
    path.write_text("\n".join(lines[:3]) + "\n")
    log = faults.JobLog(path)
    log.poll()
    assert log.step == 512 and log.resumes == [] and log.iteration_s == pytest.approx(0.2)
    with open(path, "a") as f:
        f.write("\n".join(lines[3:]) + "\n[2026-01-01 10:00:06,000][rank 0][INFO] step 76")  # a line still being written
    log.poll()
    assert log.resumes == [(512, 256)] and log.step == 256
    with open(path, "a") as f:
        f.write("8  return 25.0  1200 steps/s\n")
    log.poll()
    assert log.step == 768


def test_compare_is_bit_for_bit():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert faultbench.compare(a, {k: v.clone() for k, v in a.items()}) == \
        {"identical": True, "tensors": 2, "differing": [], "max_abs_diff": 0.0}
    b = {"w": torch.ones(3) + torch.tensor([0.0, 1e-7, 0.0]), "b": torch.zeros(2)}
    r = faultbench.compare(a, b)
    assert not r["identical"] and r["differing"] == ["w"] and 0 < r["max_abs_diff"] < 1e-6
    assert not faultbench.compare(a, None)["identical"]


def _result(lost, identical=True, node=None):
    fs = [{"kind": k, "at_step": 0, "rank": 1, "reached": 2048 + x, "resumed": 2048, "seconds_lost": 5.0 + x / 1000,
           "steps_lost": x} for k, x in zip(["kill", "stop", "checkpoint"], lost)]
    return {"task": "cartpole-ppo", "k": len(fs), "budget": 4096, "every_steps": 1024, "iteration_steps": 256,
            "faulty": {"faults": fs, "restarts": len(fs), "returncode": 0, "final_step": 4096, "error": None},
            "final_parameters": {"compared": True, "identical": identical, "tensors": 12, "differing": [] if identical else ["w"],
                                 "max_abs_diff": 0.0 if identical else 1e-3},
            "node_loss": node or {"skipped": "network namespaces need root"}}


def test_the_table_and_the_verdict():
    r = _result([256, 0, 1024])
    text = faultbench.format_task(r)
    assert "kill -9 in a checkpoint write  1         1         1,024 / 1,024" in text
    assert "all                            3         3         256 / 1,024" in text
    assert "restarts observed: 3; torchrun exit code 0; final step 4,096 of 4,096" in text
    assert "(1,280): yes" in text and "bit-identical (12 tensors)" in text and "node loss: skipped" in text
    assert faultbench.passed(r)
    assert not faultbench.passed(_result([256, 0, 1281]))
    assert not faultbench.passed(_result([256, 0, 1024], identical=False))
    lost = {"world_before": 2, "world_after": 2, "final_step": 100, "budget": 8192, "error": "x", "survived": False}
    assert not faultbench.passed(_result([0], node=lost)) and "FAILED, world 2 -> 2" in nodeloss.describe(lost)


def test_bad_values_are_refused_in_one_line(tmp_path):
    for argv, line in ((["--faults", "0"], "--faults=0: must be a positive number of faults"),
                       (["--faults", "2", "-o", "train.total_steps=1000"],
                        "train.total_steps=1000: too few steps for 2 faults at least 1024 steps apart; allowed: >= 8192")):
        p = subprocess.run([sys.executable, "-m", "p2prl.bench", *argv, "--out", str(tmp_path / "b")], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"python -m p2prl.bench: error: {line}"], p.stderr
    assert not (tmp_path / "b").exists()


def test_setup_of_a_physics_env_is_not_compared():
    pytest.importorskip("Box2D")
    s = faultbench.setup("lunarlander-dqn", 3, [])
    assert s.not_compared and "LunarLander" in s.not_compared and "checkpoint.replay=true" in s.overrides
    assert faultbench.setup("cartpole-ppo", 3, []).not_compared is None
    with pytest.raises(ConfigError, match="checkpoint.every_steps=null"):
        faultbench.setup("cartpole-ppo", 3, ["checkpoint.every_steps=null"])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_five_faults_in_one_ppo_run_end_bit_identical(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "-m", "p2prl.bench", "--faults", "5", "--tasks", "cartpole-ppo",
                        "--seeds", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1400)
    (r,) = json.loads((out / "faults.json").read_text())["tasks"]
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    f = r["faulty"]
    assert {x["kind"] for x in f["faults"]} == set(faults.KINDS)  # seed 2 draws every kind
    assert f["error"] is None and f["returncode"] == 0 and f["restarts"] == 5 and f["final_step"] == r["budget"]
    assert all(0 <= x["steps_lost"] <= r["every_steps"] + r["iteration_steps"] for x in f["faults"]), f["faults"]
    assert r["final_parameters"]["identical"], r["final_parameters"]
    assert "bit-identical" in p.stdout
    n = r["node_loss"]
    assert "skipped" in n or (n["survived"] and n["world_after"] == 1), n
