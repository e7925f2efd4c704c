"""Every user-caused error, caught before training in one place.

The command line is composed with Hydra's compose API (each job of a sweep too) and turned into the
typed config, which checks every value (`to_run_config`: the schema's checks, then those the
strategy table holds). Then `preflight` checks what needs the outside world: the env's spaces against
the algorithm, the strategy against the number of peers, the comm backend against the hardware, the
run dir writable, the checkpoint to resume readable and fitting this config. Under torchrun the peers
then swap their verdicts and configs through torchrun's store: if any peer found an error, or the
peers' configs differ, every peer stops with the same one line. All of it happens before Hydra creates
a run dir, so a bad command overwrites nothing of an existing run. What `preflight` established is
kept (`Preflight`), so the run does not check it again.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

from omegaconf import DictConfig, OmegaConf

from p2prl import algos
from p2prl.checks import ConfigError
from p2prl.config import RunConfig, build_config, conf_dir, config_hash, upgrade
from p2prl.sync import table as sync

if TYPE_CHECKING:
    from p2prl.host import Devices

GROUPS = ("algo", "env", "comm", "checkpoint", "logger")
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
MAX_JOBS = 256
START_TIMEOUT_S = 60.0  # the start-up exchange's wait when the command line did not even compose


def env_label(choice: str, env_id: str) -> str:
    """The env's part of a run dir's name: the preset's name, or for env=gym the id itself
    (`ALE/Pong-v5` -> `ALE-Pong-v5`, a `module:` prefix dropped)."""
    if choice != "gym":
        return choice
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(env_id).rpartition(":")[2]).strip("-") or choice


OmegaConf.register_new_resolver("p2prl_env", env_label, replace=True)


class Preflight(NamedTuple):
    """What the precheck established about one job, for the run to use instead of checking again."""

    devices: "Devices"  # the device and comm.backend resolved on this machine, and why
    checkpoint: Optional[Path]  # the checkpoint to resume from, found to fit this config (None: none checked)


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """The typed config of a composed (or saved) one; its `hydra` section, if any, is left out."""
    raw = {}
    for key in cfg:
        if key != "hydra":
            value = cfg[key]
            raw[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    cfg = build_config(upgrade(raw, algos.algo_sections(), algos.added_keys()), algos.algo_sections())
    sync.check(cfg.comm)  # what depends on the strategy, from its table
    return cfg


def preflight(cfg: RunConfig, run_dir: Optional[Path], dir_key: str = DIR_KEYS[0],
              out_dir: Optional[Path] = None) -> Preflight:
    """Check what needs the outside world; `run_dir` None: a sweep's job dir, numbered at launch, whose
    resume source the run checks itself."""
    from p2prl.host import resolve_devices
    from p2prl.envs import check_vectorization, make_single_env
    from p2prl.resume import check_source
    algos.check_strategy(cfg.algo.name, cfg.comm.strategy, cfg.comm.straggler_frac)
    sync.check_world(cfg.comm, int(os.environ.get("WORLD_SIZE", 1)))
    env = make_single_env(cfg.env)
    check_vectorization(cfg.env)
    try:
        algos.check_spaces(cfg.algo.name, env.observation_space, env.action_space)
        _check_frame_stack(cfg.env, env.observation_space)
        image = algos.spec(cfg.algo.name).check_observations(cfg.algo, env.observation_space)
        algos.spec(cfg.algo.name).check_actions(cfg.algo, env.action_space)
    finally:
        env.close()
    devices = resolve_devices(cfg.device, cfg.comm.backend, image)
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        # Checked on every peer: torchrun's rendezvous may place rank 0, the one that logs, on any node.
        raise ConfigError("logger", "wandb", 'needs the wandb package: pip install -e ".[wandb]" (on every node); '
                                             "allowed here: tensorboard")
    _check_writable(dir_key, out_dir or run_dir or Path("."))
    explicit = cfg.train.resume not in ("auto", "never")  # a path: the same source for every job
    checked = check_source(cfg, run_dir or out_dir or Path(".")) if run_dir is not None or explicit else None
    return Preflight(devices, checked)


def _check_frame_stack(env, space) -> None:
    """`env.frame_stack` against the (stacked) observations."""
    if env.frame_stack is not None and len(space.shape or ()) > 3:
        raise ConfigError("env.frame_stack", env.frame_stack, f"stacks vectors or 2-D (grey) frames; the env's "
                                                              f"frames are {tuple(space.shape[1:])} (HxWxC); allowed "
                                                              "here: null")


def _check_writable(key: str, path: Path) -> None:
    """The dir exists and is writable, or its nearest existing ancestor is a directory in which one can be made."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, path, f"cannot be a directory: {probe} is a file; allowed: a writable directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, path, f"{probe} is not writable; allowed: a writable directory")
    if probe != path.absolute():
        # Hydra makes the rest, which os.access does not foresee for root (/proc, /sys): make and remove one.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".p2prl-probe-", dir=probe))
        except OSError as e:
            raise ConfigError(key, path, f"cannot be created: no directory can be made in {probe} ({e.strerror}); "
                                         "allowed: a writable directory") from None


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _job_overrides(argv: list[str]) -> list[list[str]]:
    """Per override, the list of its values as `key=value` strings (sweeps expanded); of Hydra's
    own overrides only the output dirs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    args = []
    skip_next = False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir",
                   "--info", "-i", "--cfg", "-c", "--package", "-p"):
            skip_next = a not in ("--info", "-i")
        elif not a.startswith("-"):
            args.append(a)
    out = []
    for o in OverridesParser.create().parse_overrides(args):
        key = o.key_or_group
        if key not in DIR_KEYS and (key == "hydra" or key.startswith(("hydra.", "hydra/"))):
            continue
        if o.is_sweep_override():
            prefix = o.input_line.split("=", 1)[0]
            out.append([f"{prefix}={v}" for v in o.sweep_string_iterator()])
        else:
            out.append([o.input_line])
        if key in GROUPS:
            for item in out[-1]:
                value = item.split("=", 1)[1]
                if value not in _options(key):
                    hint = ""
                    if key == "env" and re.search(r"-v\d+$", value):  # a gymnasium id, as SB3 takes it
                        hint = f" (a gymnasium id: env=gym env.id={value})"
                    raise ConfigError(key, value, f"unknown {key}; allowed: {', '.join(_options(key))}{hint}")
    return out


def _compose(overrides: list[str], hydra_config: bool = True) -> DictConfig:
    """Hydra's compose; an override of a key that does not exist says which keys do."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException
    try:
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)
    except ConfigCompositionException as e:
        m = re.search(r"Could not override '([^']+)'", str(e))
        bad = [o for o in overrides if m and o.split("=", 1)[0] == m.group(1)]
        if not bad:
            raise
        key, value = bad[0].split("=", 1)
        section = OmegaConf.select(compose(config_name="config", overrides=[o for o in overrides if o != bad[0]]),
                                   key.rpartition(".")[0])
        allowed = ", ".join(sorted(section.keys())) if isinstance(section, DictConfig) else "none"
        raise ConfigError(key, value, f"unknown key; allowed: {allowed}") from e


def compose(*overrides: str) -> RunConfig:
    """The typed config that `python -m p2prl.train <overrides>` would run (conf/'s defaults, the
    tuned preset of the algo/env pair, then the overrides), checked, without running anything."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return to_run_config(_compose(list(overrides), hydra_config=False))
    finally:
        GlobalHydra.instance().clear()


def compose_jobs(argv: list[str]) -> dict[str, tuple[RunConfig, Preflight]]:
    """Compose and check every job the command line asks for: {config hash: (config, preflight)}.

    Raises ConfigError (or Hydra's and OmegaConf's own errors) for the first bad job."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    multirun = "-m" in argv or "--multirun" in argv
    dir_key = DIR_KEYS[1] if multirun else DIR_KEYS[0]
    combos = list(itertools.islice(itertools.product(*_job_overrides(argv)), MAX_JOBS))
    jobs: dict[str, tuple[RunConfig, Preflight]] = {}
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            for overrides in combos:
                cfg = _compose(list(overrides))
                HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} in the output dirs
                job = to_run_config(cfg)  # first: the output dirs interpolate config values
                out_dir = Path(OmegaConf.select(cfg, dir_key))
                # A sweep's job dirs are numbered at launch; each job checks its own resume source then.
                jobs[config_hash(job.to_dict())] = (job, preflight(job, None if multirun else out_dir, dir_key,
                                                                   out_dir))
    finally:
        GlobalHydra.instance().clear()
    return jobs


def check_command_line(argv: list[str]) -> tuple[Optional[str], dict[str, tuple[RunConfig, Preflight]]]:
    """(the one error line every peer stops with, or None; the checked jobs). Under torchrun every
    peer's verdict and configs are compared through torchrun's store before any peer goes on."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from p2prl.comm import agree_before_start

    error, jobs, timeout_s = None, {}, START_TIMEOUT_S
    try:
        jobs = compose_jobs(argv)
        timeout_s = next(iter(jobs.values()))[0].comm.timeout_s if jobs else timeout_s
    except ConfigError as e:
        error = str(e)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        error = _one_line(e)
    flat = [job.flat() for job, _ in jobs.values()]
    return agree_before_start(error, flat, timeout_s), jobs


def _one_line(e: Optional[BaseException]) -> str:
    """Hydra/OmegaConf errors span several lines; keep the informative ones on one."""
    parts: list[str] = []
    while e is not None and len(parts) < 3:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip() and
                        not line.strip().startswith(("full_key", "object_type", "Available options",
                                                     "To append")))
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__
    return "; ".join(parts) or "invalid configuration"
