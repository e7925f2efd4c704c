"""The command line as users run it: output contract, 2-peer torchrun, and bad input (exit 2, one line)."""
import json
from pathlib import Path

import pytest
import torch

BUDGET = 256
TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        f"train.total_steps={BUDGET}", "train.log_every_steps=64", "train.target_return=null"]


def check_contract(run: Path, world_size: int):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows, "no metrics rows"
    for r in rows:
        for k in ("step", "time_s", "episode_return_mean", "episodes", "sps"):
            assert k in r, k
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == BUDGET  # the budget is a multiple of an iteration
    s = json.loads((run / "summary.json").read_text())
    for k in ("reached", "steps_to_target", "time_to_target_s", "final_step", "world_size", "wall_s",
              "comm_frac", "comm_bytes", "comm_calls", "comm_s", "loop_s", "updates", "comm_bytes_per_update", "config"):
        assert k in s, k
    assert s["world_size"] == world_size and s["final_step"] == BUDGET and s["reached"] is False
    assert 0 <= s["comm_frac"] <= 1 and s["comm_s"] <= s["loop_s"] <= s["wall_s"]
    ckpt = torch.load(run / "checkpoints" / f"step_{BUDGET}.pt", weights_only=True)
    assert "model" in ckpt and ckpt["step"] == BUDGET and ckpt["learner"]["updates"] == s["updates"]
    return s


def test_one_peer_run_follows_output_contract(run_dir, cli):
    p = cli([*TINY, f"hydra.run.dir={run_dir}"])
    assert p.returncode == 0, p.stderr
    s = check_contract(run_dir, 1)
    assert s["config"]["algo"]["num_envs"] == 2 and s["config"]["seed"] == 0
    assert s["comm_bytes"] == 0 or s["comm_calls"] > 0


def test_two_peers_under_torchrun(run_dir, cli):
    p = cli([*TINY, f"hydra.run.dir={run_dir}"], nproc=2)
    assert p.returncode == 0, p.stderr
    s = check_contract(run_dir, 2)
    # Every update's gradient crossed over: at least the model's bytes per update.
    n_params = sum(t.numel() for t in torch.load(run_dir / "checkpoints" / f"step_{BUDGET}.pt",
                                                  weights_only=True)["model"].values())
    assert s["comm_calls"] >= s["updates"] and s["comm_bytes"] >= s["updates"] * 4 * n_params
    assert s["comm_bytes_per_update"] == s["comm_bytes"] / s["updates"]


def test_target_return_stops_all_peers(run_dir, cli):
    # CartPole episodes always return >= 8, so a target of 5 is reached at the first finished episode.
    p = cli([*TINY[:-2], "train.total_steps=100000", "train.target_return=5", f"hydra.run.dir={run_dir}"], nproc=2)
    assert p.returncode == 0, p.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["reached"] is True and s["steps_to_target"] == s["final_step"] < 1000


# End to end through the command line; tests/test_validation.py has the whole table (docs/validation.md).
BAD = [
    (["env=nosuchenv"], "env=nosuchenv", "cartpole"),
    (["algo.num_envs=3", "algo.num_steps=5", "algo.num_minibatches=4"], "algo.num_minibatches=4", "divide"),
    (["-m", "algo.lr=1e-3,-1"], "algo.lr=-1", "positive"),
]


@pytest.mark.parametrize("args,names,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_override_exits_2_with_one_line(args, names, allowed, tmp_path, cli):
    run = tmp_path / "run"
    p = cli([*args, f"hydra.run.dir={run}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert names in lines[0] and allowed in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert not run.exists() and not (tmp_path / "sweep").exists()


def test_bad_override_on_two_peers_every_peer_exits_2(tmp_path, cli):
    p = cli(["algo.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"], nproc=2, timeout=90)
    assert p.returncode != 0
    assert p.stderr.count("p2prl: error: algo.lr=-1") == 1, p.stderr  # rank 0 prints it once
    assert "exitcode  : 2" in p.stderr and "exitcode  : 1" not in p.stderr
    assert "Traceback" not in p.stderr.split("p2prl: error")[0]


COUNT_COMPOSES = """
import os, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
import p2prl.train as train
real, modes = ConfigLoaderImpl.load_configuration, []
def counting(self, *args, **kwargs):
    modes.append(str(kwargs.get("run_mode")))
    return real(self, *args, **kwargs)
ConfigLoaderImpl.load_configuration = counting
train._leave = lambda code: (print("composed:", " ".join(modes), flush=True), os._exit(code))
sys.argv[1:] = {args!r}
train.main()
"""


def test_a_single_run_is_composed_once_and_checked_on_that_config(run_dir, tmp_path):
    import subprocess
    import sys
    args = [*TINY, f"hydra.run.dir={run_dir}"]
    p = subprocess.run([sys.executable, "-c", COUNT_COMPOSES.format(args=args)], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    # Hydra's own look at `hydra.mode` (Hydra.get_mode), then the one compose the run and its check share.
    assert p.stdout.strip().splitlines()[-1] == "composed: RunMode.MULTIRUN RunMode.RUN", p.stdout
    assert json.loads((run_dir / "summary.json").read_text())["final_step"] == BUDGET
