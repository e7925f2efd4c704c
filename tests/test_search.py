"""What a sweep's job returns to its sweeper (`train.objective`, p2prl.search), and p2prl's defaults for
Hydra's Optuna sweeper and submitit launchers (those tests skip without the optuna or submitit extra)."""
import importlib.util
import json
import math

import pytest

from p2prl import checkpoint
from p2prl.search import TPE_SEED, TPE_STARTUP_TRIALS, objective, results_table


def summary(**changes) -> dict:
    """A run's summary.json, as much of it as the objective reads: a run that missed its target."""
    return {"reached": False, "steps_to_target": None, "episode_return_mean": 120.5, **changes}


def test_the_default_objective_is_the_last_return_window_mean(compose, tmp_path):
    cfg = compose()
    assert cfg.train.objective == "episode_return_mean"
    assert objective(cfg, summary(), tmp_path) == 120.5
    assert objective(cfg, summary(episode_return_mean=None), tmp_path) == -math.inf  # no episode ended: ranks last


def test_minus_the_steps_to_target_ranks_every_run_that_reached_it_above_every_one_that_did_not(compose, tmp_path):
    cfg = compose("train.objective=steps_to_target", "train.target_return=475", "train.total_steps=100000")
    reached_last_step = objective(cfg, summary(reached=True, steps_to_target=100000), tmp_path)
    assert reached_last_step == -100000
    assert objective(cfg, summary(), tmp_path) == -100001  # minus train.total_steps + 1


def test_the_best_evaluation_return_is_the_one_best_pt_was_kept_for(compose, tmp_path):
    cfg = compose("train.objective=best_eval_return", "train.eval_every_steps=1000")
    assert objective(cfg, summary(), tmp_path) == -math.inf  # no evaluation finished
    (tmp_path / "checkpoints").mkdir()
    checkpoint.save_atomic({"eval": {"return_mean": 321.0}}, tmp_path / "checkpoints" / "best.pt")
    assert objective(cfg, summary(), tmp_path) == 321.0


def test_a_sweeps_table_has_a_row_per_job_and_marks_the_best(compose, tmp_path):
    for job, (seed, lr, steps) in enumerate([(1, 1e-3, 30000), (2, 1e-3, None), (1, 2e-3, 20000)]):
        run = tmp_path / str(job)
        run.mkdir()
        (run / "metrics.jsonl").write_text("{}\n")
        cfg = compose(f"seed={seed}", f"algo.lr={lr}", "train.objective=steps_to_target", "train.total_steps=100000")
        (run / "summary.json").write_text(json.dumps({**summary(reached=steps is not None, steps_to_target=steps),
                                                      "config": cfg.to_dict()}))
    (tmp_path / "3").mkdir()  # a job that did not finish: no row
    (tmp_path / "3" / "metrics.jsonl").write_text("")
    head, *rows = [line.split() for line in results_table(tmp_path).splitlines()]
    assert head == ["job", "seed", "algo.lr", "reached", "steps_to_target", "return_mean", "objective"]
    assert rows == [["0", "1", "0.001", "true", "30000", "120.5", "-30000"],
                    ["1", "2", "0.001", "false", "-", "120.5", "-100001"],
                    ["*", "2", "1", "0.002", "true", "20000", "120.5", "-20000"]]


def hydra_config(*overrides: str):
    """The config `python -m p2prl.train -m OVERRIDES` composes, its hydra section included."""
    from hydra import compose, initialize_config_dir
    from p2prl.config import conf_dir
    from p2prl.search import register_plugin_defaults
    register_plugin_defaults()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("config", list(overrides), return_hydra_config=True)


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="needs the optuna extra")
def test_p2prls_optuna_sweeper_maximizes_with_a_seeded_sampler_and_few_random_trials():
    sweeper = hydra_config("hydra/sweeper=optuna").hydra.sweeper
    assert sweeper.direction == "maximize"
    assert sweeper.sampler.seed == TPE_SEED and sweeper.sampler.n_startup_trials == TPE_STARTUP_TRIALS <= 5
    # An override still wins over p2prl's default.
    assert hydra_config("hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=7").hydra.sweeper.sampler.seed == 7


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="needs the submitit extra")
@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_submitits_tasks_get_train_torch_threads_cpus(launcher):
    cfg = hydra_config(f"hydra/launcher={launcher}", "train.torch_threads=3")
    assert cfg.hydra.launcher.cpus_per_task == 3
