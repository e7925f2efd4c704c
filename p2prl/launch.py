"""How Hydra runs p2prl's jobs: the precheck as a Hydra callback, the jobs of a sweep it checks, and
where they run.

`@hydra.main` composes the command line, then calls `Precheck.on_run_start` (a single run) or
`on_multirun_start` (a sweep): Hydra 1.3's `Hydra.run` calls it before `run_job` creates the run dir
and saves .hydra/, `Hydra.multirun` before it instantiates the sweeper. The callback checks the config
Hydra composed (p2prl.precheck); under torchrun, or as tasks of a SLURM or submitit job, every peer's
verdict goes through the peers' store first, so all of them stop alike. A bad command raises `Stop`,
a BaseException because Hydra turns a callback's Exceptions into warnings and carries on; the entry
point (p2prl.train) turns it into the one line and exit code 2.

A single run's check is handed to its job (`take_checked`: one process, one job). A sweep's jobs are
checked before the first one starts: every job of Hydra's basic sweeper (each composed once here, for
the check; Hydra's sweeper and launcher compose it again to run it), or, for a sweeper that draws its
jobs as it goes (Optuna), one job: each sweep's first value, an interval's lower end. What needs the
machine a job runs on (its env, devices, extras) is checked here only when that is this machine (the
basic and submitit_local launchers); elsewhere each job checks it where it runs, and a bad job fails
alone, its line in its own log.
"""
from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path
from typing import Any, NamedTuple, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from p2prl.checks import ConfigError, positive
from p2prl.config import RunConfig, conf_dir
from p2prl.host import run_id
from p2prl.launcher_env import peer_rank
from p2prl.precheck import (DIR_KEYS, START_TIMEOUT_S, Preflight, check_peers, check_writable, explain, preflight,
                            to_run_config)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
LOCAL_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", SUBMITIT + "LocalLauncher")
MAX_JOBS = 256  # a sweep's jobs checked before the first starts
log = logging.getLogger(__name__)

# Cached: a submitit job composes its config again on its node, and must land in the sweep dir the sweep chose.
OmegaConf.register_new_resolver("p2prl_run_id", run_id, use_cache=True, replace=True)
# Hydra formats a job's log lines before the job adopts its launcher's variables (p2prl.launcher_env).
OmegaConf.register_new_resolver("p2prl_rank", peer_rank, replace=True)


class Stop(BaseException):
    """The command line cannot run: `line` says why; `code` 2 for bad input, 1 when a peer never came."""

    def __init__(self, line: str, code: int = 2) -> None:
        super().__init__(line)
        self.line, self.code = line, code


class Crashed(BaseException):
    """A bug in the callback, carried past Hydra's catch-all (which would run the job unchecked); its
    cause is the error."""


def _unchecked_never(method):
    def wrapped(self: "Precheck", config: DictConfig, **kwargs: Any) -> None:
        try:
            method(self, config, **kwargs)
        except Exception as e:
            raise Crashed() from e
    return wrapped


_CHECKED: list[tuple[RunConfig, Preflight]] = []  # a single run's, from the callback to its job


def take_checked() -> Optional[tuple[RunConfig, Preflight]]:
    """A single run's typed config and what the callback established about it (once); None in a sweep's job."""
    return _CHECKED.pop() if _CHECKED else None


def _errors() -> tuple[type, ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    return ConfigError, HydraException, OmegaConfBaseException, ValueError


def _agree(error: Optional[str], flats: list[dict], timeout_s: float) -> None:
    from p2prl.comm import StartTimeout, agree_before_start
    try:
        error = agree_before_start(error, flats, timeout_s, tag="start")
    except StartTimeout as e:  # every peer that waited says so: the one that did not come may be rank 0
        raise Stop(str(e), 1) from None
    if error is not None:
        # torchrun terminates the other peers as soon as one exits: from here every peer exits 2 all the same.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(error)


class Place(NamedTuple):
    """Where a sweep's jobs run."""

    here: bool  # on this machine: what needs the machine is checked before the first job starts
    peers: Optional[tuple[int, int]]  # each job's (world size, peers per node); None: this process's own


def jobs_place(config: DictConfig) -> Place:
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if not target.startswith(SUBMITIT):
        return Place(target in LOCAL_LAUNCHERS, None)
    choice = OmegaConf.select(config, "hydra.runtime.choices.hydra/launcher") or target.rpartition(".")[2]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("hydra/launcher", choice, "starts every job's peers itself (hydra.launcher.nodes x "
                                                    "tasks_per_node), and under torchrun every peer would submit "
                                                    "the sweep again: start one process; allowed under torchrun: basic")
    for key in ("nodes", "tasks_per_node"):
        positive(f"hydra.launcher.{key}", launcher[key], integer=True)
    here = target == SUBMITIT + "LocalLauncher"
    if here and launcher.nodes != 1:
        raise ConfigError("hydra.launcher.nodes", launcher.nodes, f"{choice} runs every job on this machine; allowed: 1")
    return Place(here, (launcher.nodes * launcher.tasks_per_node, launcher.tasks_per_node))


def _sampled(override: Any) -> str:
    """One value of a sweep override: its first, an interval's lower end."""
    if not override.is_sweep_override():
        return override.input_line
    key = override.get_key_element()
    if override.is_interval_sweep():
        return f"{key}={override.value().start}"
    return f"{key}={next(iter(override.sweep_string_iterator()))}"


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of the jobs to check before the first one starts (see the module's docstring)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(args)
    if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
        for o in parsed:
            if o.is_sweep_override() and not o.is_discrete_sweep():
                raise ConfigError(o.get_key_element(), o.input_line.partition("=")[2],
                                  "Hydra's basic sweeper lists its jobs, it cannot draw them from an interval; "
                                  "allowed: a list (a,b,c or range(...)), or a sweeper that draws (hydra/sweeper=optuna)")
        return BasicSweeper.split_arguments(parsed, None)[0][:MAX_JOBS]
    return [[_sampled(o) for o in parsed]]


class Precheck(Callback):
    """Hydra's callback (conf/config.yaml, hydra.callbacks) that checks a command line before Hydra writes anything."""

    @_unchecked_never
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        job, error = None, None
        try:
            HydraConfig.instance().set_config(config)  # resolves ${hydra:...} in the run dir
            job = to_run_config(config)
            checked = preflight(job, Path(OmegaConf.select(config, DIR_KEYS[0])))
        except _errors() as e:
            error = explain(e, list(config.hydra.overrides.task))
        _agree(error, [job.flat()] if job is not None else [], job.comm.timeout_s if job is not None else START_TIMEOUT_S)
        _CHECKED[:] = [(job, checked)]

    @_unchecked_never
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig
        error, flats, timeout_s = None, [], START_TIMEOUT_S
        try:
            place = jobs_place(config)
            for overrides in sweep_jobs(config):
                composed = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
                HydraConfig.instance().set_config(composed)
                job = to_run_config(composed)
                timeout_s, out = job.comm.timeout_s, Path(OmegaConf.select(composed, DIR_KEYS[1]))
                if place.here:  # a job's dir is numbered at launch: it checks its resume source itself
                    preflight(job, None, DIR_KEYS[1], out, place.peers)
                else:
                    if place.peers:
                        check_peers(job, place.peers[0])
                    check_writable(DIR_KEYS[1], out)
                flats.append(job.flat())
        except _errors() as e:
            error = explain(e, list(config.hydra.overrides.task))
        finally:
            HydraConfig.instance().set_config(config)
        _agree(error, flats, timeout_s)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from p2prl.host import is_rank0
        from p2prl.search import results_table
        table = results_table(Path(config.hydra.sweep.dir)) if is_rank0() else None
        if table:
            log.info("the sweep's jobs (%s):\n%s", config.hydra.sweep.dir, table)


def failed_job(error: BaseException) -> Optional[Stop]:
    """A sweep's job that failed where it ran (submitit's UncompletedJobError), in one line: the job's
    own line (exit code 2) or that it failed (1), and where its log is; None for other errors."""
    if type(error).__name__ != "UncompletedJobError":
        return None
    text = str(error)
    job = re.search(r"Job (\S+) \(task: \d+\) with path (\S+)", text)
    own = re.search(r"^p2prl: error: (.*)$", text, re.M)
    where = f" (job {job.group(1)}, its log in {Path(job.group(2)).parent})" if job else ""
    if own:
        return Stop(own.group(1) + where)
    return Stop(f"a job of the sweep failed{where}: {text.splitlines()[0]}", 1)


def check_command_line(argv: list[str]) -> Optional[str]:
    """The one line `python -m p2prl.train ARGV` stops with before anything runs, or None: Hydra composes
    the command line as under `@hydra.main`, then `Precheck` checks it (nothing runs, nothing is written)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from p2prl.search import register_plugin_defaults
    multirun = "-m" in argv or "--multirun" in argv
    overrides = [a for a in argv if not a.startswith("-")]
    register_plugin_defaults()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="train"):
            try:
                cfg = GlobalHydra.instance().hydra.compose_config(
                    "config", overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
            except _errors() as e:
                _agree(explain(e, argv), [], START_TIMEOUT_S)
            check = Precheck()
            (check.on_multirun_start if multirun else check.on_run_start)(cfg)
            take_checked()
    except Stop as e:
        return e.line
    except Crashed as e:
        raise e.__cause__ from None
    finally:
        GlobalHydra.instance().clear()
    return None
