"""Every user-caused error, caught before training in one place.

Hydra composes the command line once; `p2prl.launch`'s callback hands what it composed to the checks
here before Hydra creates a run dir. `to_run_config` turns it into the typed config, which checks every
value (the schema's checks, then those the strategy table holds). `preflight` checks what needs the
outside world: the env's spaces against the algorithm, the strategy against the number of peers, the
comm backend against the hardware, the run dir writable, the checkpoint to resume readable and fitting
this config. `explain` turns Hydra's and OmegaConf's errors (a group option or key that does not exist)
into the same kind of line. `agreed_preflight` is a sweep job's check where the job runs.
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
from p2prl.config import RunConfig, build_config, conf_dir, upgrade
from p2prl.sync import table as sync

if TYPE_CHECKING:
    from p2prl.host import Devices

GROUPS = ("algo", "env", "comm", "checkpoint", "logger")
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
START_TIMEOUT_S = 60.0  # the start-up exchange's wait when the command line did not even compose
_JOBS = itertools.count()  # sweep jobs this process checked where they run: every peer counts alike


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
    algos.spec(cfg.algo.name).check_comm(cfg.algo, cfg.comm)
    return cfg


def check_peers(cfg: RunConfig, world_size: int) -> None:
    """What the number of peers decides: the strategy's graph, the straggler cut."""
    algos.check_strategy(cfg.algo.name, cfg.comm.strategy, cfg.comm.straggler_frac, cfg.comm.compress)
    sync.check_world(cfg.comm, world_size)


def preflight(cfg: RunConfig, run_dir: Optional[Path], dir_key: str = DIR_KEYS[0], out_dir: Optional[Path] = None,
              peers: Optional[tuple[int, int]] = None) -> Preflight:
    """Check what needs the outside world; `run_dir` None: a sweep's job dir, numbered at launch, whose
    resume source the job checks itself. `peers`: (world size, peers on this node) of the job, if not
    this process's own (torchrun's environment)."""
    from p2prl.host import resolve_devices
    from p2prl.envs import check_vectorization, make_single_env
    from p2prl.resume import check_source
    world, local = peers or (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    check_peers(cfg, world)
    env = make_single_env(cfg.env)
    check_vectorization(cfg.env)
    try:
        algos.check_spaces(cfg.algo.name, env.observation_space, env.action_space)
        _check_frame_stack(cfg.env, env.observation_space)
        image = algos.spec(cfg.algo.name).check_observations(cfg.algo, env.observation_space)
        algos.spec(cfg.algo.name).check_actions(cfg.algo, env.action_space)
    finally:
        env.close()
    devices = resolve_devices(cfg.device, cfg.comm.backend, image, local)
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        # Checked on every peer: torchrun's rendezvous may place rank 0, the one that logs, on any node.
        raise ConfigError("logger", "wandb", 'needs the wandb package: pip install -e ".[wandb]" (on every node); '
                                             "allowed here: tensorboard")
    check_writable(dir_key, out_dir or run_dir or Path("."))
    explicit = cfg.train.resume not in ("auto", "never")  # a path: the same source for every job
    checked = check_source(cfg, run_dir or out_dir or Path(".")) if run_dir is not None or explicit else None
    return Preflight(devices, checked)


def agreed_preflight(cfg: RunConfig, run_dir: Path) -> Preflight:
    """A sweep job's `preflight` where it runs, then every peer's verdict and config compared through
    the launcher's store, so a bad job stops every peer alike.

    The sweep's jobs were checked before the first one started, but Hydra's launcher composes each
    job anew (on a compute node, for a remote launcher, where it is checked the first time); handing
    the earlier results over would mean matching the launcher's configs to ours, so the job checks
    again here, and checks its own resume source, known only now that its dir is numbered."""
    from p2prl.comm import agree_before_start
    error = None
    checked = None
    try:
        checked = preflight(cfg, run_dir)
    except ConfigError as e:
        error = str(e)
    # Keyed by the job's number, not its config: peers whose configs differ must meet to find out.
    error = agree_before_start(error, [cfg.flat()], cfg.comm.timeout_s, tag=f"job-{next(_JOBS)}")
    if error is not None:
        raise ConfigError.line(error)
    return checked


def _check_frame_stack(env, space) -> None:
    """`env.frame_stack` against the (stacked) observations."""
    if env.frame_stack is not None and len(space.shape or ()) > 3:
        raise ConfigError("env.frame_stack", env.frame_stack, f"stacks vectors or 2-D (grey) frames; the env's "
                                                              f"frames are {tuple(space.shape[1:])} (HxWxC); allowed "
                                                              "here: null")


def check_writable(key: str, path: Path) -> None:
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


def _overrides(argv: list[str]) -> list[str]:
    """The overrides of a command line, without Hydra's own flags and their values."""
    out, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a in ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--cfg", "-c",
                   "--package", "-p"):
            skip_next = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def check_group_choices(argv: list[str]) -> None:
    """An option of p2prl's config groups that conf/ does not have, in one line (Hydra's says it in six)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    for o in OverridesParser.create().parse_overrides(_overrides(argv)):
        key = o.key_or_group
        if key not in GROUPS:
            continue
        values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else [o.get_value_element_as_str()]
        for value in values:
            if value not in _options(key):
                hint = ""
                if key == "env" and re.search(r"-v\d+$", value):  # a gymnasium id, as SB3 takes it
                    hint = f" (a gymnasium id: env=gym env.id={value})"
                raise ConfigError(key, value, f"unknown {key}; allowed: {', '.join(_options(key))}{hint}")


def explain(error: BaseException, argv: list[str]) -> str:
    """The one line for an error of composing the command line `argv` (Hydra's, OmegaConf's or ours)."""
    if isinstance(error, ConfigError):
        return str(error)
    try:
        check_group_choices(argv)
        m = re.search(r"Could not override '([^']+)'", str(error))
        overrides = _overrides(argv)
        bad = [o for o in overrides if m and o.split("=", 1)[0] == m.group(1)]
        if bad:
            key, value = bad[0].split("=", 1)
            # The error path only: compose once more without the bad key, to say which keys its section has.
            section = OmegaConf.select(_compose_plain([o for o in overrides if o != bad[0]]), key.rpartition(".")[0])
            allowed = ", ".join(sorted(section.keys())) if isinstance(section, DictConfig) else "none"
            return str(ConfigError(key, value, f"unknown key; allowed: {allowed}"))
    except ConfigError as e:
        return str(e)
    except Exception:  # the sweep syntax itself is broken: Hydra's own message says where
        pass
    return one_line(error)


def _compose_plain(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def compose(*overrides: str) -> RunConfig:
    """The typed config that `python -m p2prl.train <overrides>` would run (conf/'s defaults, the
    tuned preset of the algo/env pair, then the overrides), checked, without running anything."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        return to_run_config(_compose_plain(list(overrides)))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError.line(explain(e, list(overrides))) from e


def one_line(e: Optional[BaseException]) -> str:
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
