"""Every user-caused error, caught before training in one place: one line, exit code 2.

The command line is composed with Hydra's compose API (each job of a sweep too) and turned into the
typed config, which checks every value. Then what needs the outside world: the env's spaces against
the algorithm, the comm backend against the hardware, the run dir writable, the checkpoint to resume
readable and of this algorithm and env. Under torchrun the peers then swap their verdicts and configs
through torchrun's store: if any peer found an error, or the peers' configs differ, every peer exits
2 and rank 0 prints the line. All of it happens before Hydra creates a run dir, so a bad command
overwrites nothing of an existing run.
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from p2prl.config import ConfigError, RunConfig, build_config

GROUPS = ("algo", "env", "comm")
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> None:
    """One line on stderr (rank 0 only, so N peers print it once), exit code 2."""
    if is_rank0():
        print(f"p2prl: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed config of a composed one (its `hydra` section, if any, is neither resolved nor kept)."""
    raw = {}
    for key in cfg:
        if key != "hydra":
            value = cfg[key]
            raw[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return build_config(raw)


def _options(conf_dir: str, group: str) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))


def _job_overrides(conf_dir: str, argv: list[str]) -> list[list[str]]:
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
                if value not in _options(conf_dir, key):
                    allowed = ", ".join(_options(conf_dir, key))
                    raise ConfigError(key, value, f"unknown {key}; allowed: {allowed}")
    return out


def _check_env(cfg: RunConfig) -> None:
    from p2prl.envs import check_spaces, make_single_env
    env = make_single_env(cfg.env)
    try:
        check_spaces(cfg.algo.name, env.observation_space, env.action_space)
    finally:
        env.close()


def _check_writable(key: str, path: Path) -> None:
    """The dir exists and is writable, or its nearest existing ancestor is a writable directory."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, path, f"cannot be a directory: {probe} is a file; allowed: a writable directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, path, f"{probe} is not writable; allowed: a writable directory")


def _check_job(cfg: RunConfig, run_dir: Optional[Path], dir_key: str, out_dir: Path) -> None:
    from p2prl.comm import resolve_backend
    from p2prl.resume import check_source
    _check_env(cfg)
    resolve_backend(cfg.comm.backend)
    _check_writable(dir_key, out_dir)
    if run_dir is not None or cfg.train.resume not in ("auto", "never"):
        check_source(cfg, run_dir or out_dir)


def _compose(overrides: list[str]) -> DictConfig:
    """Hydra's compose; an override of a key that does not exist says which keys do."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException
    try:
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)
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


def _compose_jobs(conf_dir: str, argv: list[str]) -> list[RunConfig]:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    multirun = "-m" in argv or "--multirun" in argv
    dir_key = DIR_KEYS[1] if multirun else DIR_KEYS[0]
    combos = list(itertools.islice(itertools.product(*_job_overrides(conf_dir, argv)), 256))
    jobs = []
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base=None):
            for overrides in combos:
                cfg = _compose(list(overrides))
                HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} in the output dirs
                out_dir = Path(OmegaConf.select(cfg, dir_key))
                job = to_run_config(cfg)
                # A sweep's job dirs are numbered at launch; each job checks its own resume source then.
                _check_job(job, None if multirun else out_dir, dir_key, out_dir)
                jobs.append(job)
    finally:
        GlobalHydra.instance().clear()
    return jobs


def precheck(conf_dir: str, argv: list[str]) -> None:
    """Compose and validate every job the command line asks for; exit 2 with one line if any is bad."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from p2prl.comm import agree_before_start
    from p2prl.resume import flatten

    error, configs, timeout_s = None, [], 60.0
    try:
        jobs = _compose_jobs(conf_dir, argv)
        configs = [flatten(job.to_dict()) for job in jobs]
        timeout_s = jobs[0].comm.timeout_s if jobs else timeout_s
    except ConfigError as e:
        error = str(e)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        error = _one_line(e)
    error = agree_before_start(error, configs, timeout_s)
    if error:
        # torchrun terminates the other peers as soon as one exits: every peer exits 2 all the same.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fail(error)


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
