"""Hyperparameter search with Hydra's sweepers and launchers: what a job returns, p2prl's defaults for
the plugins, and the table of a sweep's results.

A job returns `train.objective` of its run to the sweeper (Optuna's maximizes it): the last return-window
mean (`episode_return_mean`), the best evaluation return (`best_eval_return`, with
`train.eval_every_steps`), or minus the global steps to `train.target_return` (`steps_to_target`; minus
`train.total_steps + 1` when the run does not reach it, so that every run that does ranks above every
one that does not).

The plugins' defaults p2prl changes (the plugins' own configs otherwise): the submitit launchers give
each peer (a task) `train.torch_threads` CPUs; the Optuna sweeper maximizes, and its TPE sampler has a
fixed seed (the same command proposes the same trials) and starts with few random trials, as a
search of tens of trials on RL's noisy objectives affords.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from p2prl.config import RunConfig, flatten
from p2prl.sweep import differing_keys, find_runs

TPE_SEED = 0
TPE_STARTUP_TRIALS = 4


def objective(cfg: RunConfig, summary: dict, run_dir: Path) -> float:
    """The number a sweeper optimises for this run (higher is better; -inf: no episode finished)."""
    kind = cfg.train.objective
    if kind == "steps_to_target":
        return -float(summary["steps_to_target"] if summary["reached"] else cfg.train.total_steps + 1)
    if kind == "best_eval_return":
        from p2prl.periodic_eval import best_return
        from p2prl.policy import BEST
        value = best_return(run_dir / "checkpoints" / BEST)
    else:
        value = summary["episode_return_mean"]
    return -math.inf if value is None else float(value)


def register_plugin_defaults() -> None:
    """Register p2prl's defaults of the installed plugins (see the module's docstring) in Hydra's
    ConfigStore. After Hydra's plugin scan, which runs each plugin's module (its registrations) again."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    Plugins.instance()  # the scan, once per process
    store = ConfigStore.instance()
    try:
        from hydra_plugins.hydra_submitit_launcher import config as submitit
    except ImportError:
        pass
    else:
        for name, conf in (("submitit_local", submitit.LocalQueueConf), ("submitit_slurm", submitit.SlurmQueueConf)):
            store.store(group="hydra/launcher", name=name, node=conf(cpus_per_task="${train.torch_threads}"),
                        provider="p2prl")
    try:
        from hydra_plugins.hydra_optuna_sweeper import config as optuna
    except ImportError:
        pass
    else:
        store.store(group="hydra/sweeper", name="optuna", node=optuna.OptunaSweeperConf(direction="maximize"),
                    provider="p2prl")
        store.store(group="hydra/sweeper/sampler", name="tpe", provider="p2prl",
                    node=optuna.TPESamplerConfig(seed=TPE_SEED, n_startup_trials=TPE_STARTUP_TRIALS))


def results_table(sweep_dir: Path) -> Optional[str]:
    """The jobs of a sweep, one row each: the keys the jobs differ in (seed included), whether and when each reached
    its target, its last return mean and its objective; the best job marked `*`. None without runs."""
    from p2prl.precheck import to_run_config
    rows = []
    for run in find_runs([sweep_dir]):
        try:
            summary = json.loads((run / "summary.json").read_text())
            cfg = to_run_config(summary["config"])
        except (OSError, ValueError, KeyError):
            continue  # a job that did not finish
        rows.append((run, summary, objective(cfg, summary, run)))
    if not rows:
        return None
    configs = [r[1]["config"] for r in rows]
    keys = differing_keys(configs)
    if len({c.get("seed") for c in configs}) > 1:  # the plots group repeats; this table tells them apart
        keys = ["seed", *keys]
    best = max(range(len(rows)), key=lambda i: rows[i][2])
    head = ["job", *keys, "reached", "steps_to_target", "return_mean", "objective"]
    table = [head]
    for i, (run, s, value) in enumerate(rows):
        flat = flatten(s["config"])
        mean = s["episode_return_mean"]
        table.append([("* " if i == best else "") + str(run.relative_to(sweep_dir)), *(_show(flat.get(k)) for k in keys),
                      str(s["reached"]).lower(), _show(s["steps_to_target"]),
                      "-" if mean is None else f"{mean:.1f}", f"{value:.6g}"])
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table)


def _show(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
