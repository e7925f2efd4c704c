"""Plots of sweeps: runs grouped by the config keys that differ (seed ignored), each group's mean and
min-max band on a common x grid, and one `p2prl plot` over a real 2-peer Hydra multirun."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2prl import plot, sweep

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def config(seed: int, lr: float, **algo) -> dict:
    return {"seed": seed, "algo": {"name": "ppo", "lr": lr, "hidden_sizes": [64, 64], **algo},
            "env": {"name": "cartpole"}, "train": {"resume": "auto", "total_steps": 256}}


def test_differing_keys_ignore_the_seed_and_compare_lists_and_absent_keys():
    assert sweep.differing_keys([config(0, 1e-3), config(1, 1e-3)]) == []
    assert sweep.differing_keys([config(0, 1e-3), config(1, 3e-4)]) == ["algo.lr"]
    assert sweep.differing_keys([config(0, 1e-3), config(0, 1e-3, hidden_sizes=[32])]) == ["algo.hidden_sizes"]
    assert sweep.differing_keys([config(0, 1e-3), config(0, 1e-3, ent_coef=0.01)]) == ["algo.ent_coef"]
    assert sweep.differing_keys([{**config(0, 1e-3), "train": {"resume": "never", "total_steps": 256}},
                                 config(0, 1e-3)]) == []


def test_group_runs_by_their_settings_in_order_of_appearance():
    runs = [Path(f"sweep/{i}") for i in range(5)]
    configs = [config(0, 1e-3), config(0, 3e-4), config(1, 1e-3), config(1, 3e-4), None]
    groups = sweep.group_runs(runs, configs)
    assert groups == [sweep.Group("algo.lr=0.001", [runs[0], runs[2]]),
                      sweep.Group("algo.lr=0.0003", [runs[1], runs[3]]),
                      sweep.Group("4", [runs[4]])]  # no config: a group of its own, named by its path
    # Seeds of one setting only: one group, named by its algorithm and env.
    assert sweep.group_runs(runs[:2], [config(0, 1e-3), config(1, 1e-3)]) == \
        [sweep.Group("algo.name=ppo env.name=cartpole", runs[:2])]


def test_band_interpolates_onto_the_union_of_steps_and_keeps_the_runs_still_going():
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 10.0, 20.0]))
    b = (np.array([0.0, 5.0]), np.array([10.0, 20.0]))  # ended sooner (reached its target)
    grid, mean, lo, hi = plot.band([a, b, (np.empty(0), np.empty(0))])
    assert grid.tolist() == [0.0, 5.0, 10.0, 20.0]
    assert lo.tolist() == [0.0, 5.0, 10.0, 20.0] and hi.tolist() == [10.0, 20.0, 10.0, 20.0]
    assert mean.tolist() == [5.0, 12.5, 10.0, 20.0]


def test_band_holds_a_run_that_reached_its_target_at_its_last_value():
    a = (np.array([0.0, 10.0, 20.0]), np.array([0.0, 10.0, 20.0]))
    b = (np.array([0.0, 5.0]), np.array([10.0, 20.0]))  # stopped at 5: it reached its target there
    grid, mean, lo, hi = plot.band([a, b], held=[False, True])
    assert grid.tolist() == [0.0, 5.0, 10.0, 20.0]
    assert mean.tolist() == [5.0, 12.5, 15.0, 20.0]
    assert lo.tolist() == [0.0, 5.0, 10.0, 20.0] and hi.tolist() == [10.0, 20.0, 20.0, 20.0]


def test_find_runs_in_natural_order(tmp_path):
    for job in ("10", "2", "1/inner"):
        (tmp_path / job).mkdir(parents=True)
        (tmp_path / job / "metrics.jsonl").write_text("")
    assert sweep.find_runs([tmp_path]) == [tmp_path / "1/inner", tmp_path / "2", tmp_path / "10"]
    assert sweep.find_runs([tmp_path / "2", tmp_path]) == [tmp_path / "2", tmp_path / "1/inner", tmp_path / "10"]


def test_plot_of_a_dir_without_runs_exits_2_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert e.value.code == 2 and f"no metrics.jsonl in or below {tmp_path}" in capsys.readouterr().err


def test_two_peer_sweep_of_two_seeds_by_two_learning_rates_plots_two_groups(tmp_path):
    out = tmp_path / "sweep"
    tiny = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=1",
            "train.total_steps=256", "train.log_every_steps=64", "train.target_return=null"]
    p = subprocess.run([sys.executable, "-m", "p2prl", "train", "--nproc", "2", "--multirun", "seed=0,1",
                        "algo.lr=1e-3,3e-4", *tiny, f"hydra.sweep.dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d.name for d in out.iterdir() if (d / "summary.json").is_file())
    assert jobs == ["0", "1", "2", "3"]
    seen = {(s["config"]["seed"], s["config"]["algo"]["lr"]) for s in
            (json.loads((out / j / "summary.json").read_text()) for j in jobs)}
    assert seen == {(0, 1e-3), (1, 1e-3), (0, 3e-4), (1, 3e-4)} and all(
        json.loads((out / j / "summary.json").read_text())["world_size"] == 2 for j in jobs)
    e = subprocess.run([sys.executable, "-m", "p2prl", "plot", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert e.returncode == 0, e.stderr
    assert e.stdout.splitlines() == ["group algo.lr=0.001: 2 runs", "group algo.lr=0.0003: 2 runs",
                                     str(out / "curves.png")]
    assert (out / "curves.png").read_bytes()[:8] == PNG
