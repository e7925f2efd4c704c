"""Entry point: `python -m p2prl.train [overrides]` or `torchrun ... -m p2prl.train [overrides]`.

The overrides are checked first, by composing the config with Hydra's compose API and building the
typed config, so a mistake ends every peer with one line and exit code 2 before Hydra creates any
run dir and before any peer waits on another. Then @hydra.main runs the job (or the sweep).
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from p2prl.config import ConfigError, RunConfig, build_config

log = logging.getLogger("p2prl")


def _find_conf() -> str:
    # Installed: conf/ ships inside the package as p2prl/conf; from a checkout: ../conf.
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise FileNotFoundError(f"p2prl: no conf/config.yaml next to {here}")


CONF_DIR = _find_conf()
GROUPS = ("algo", "env", "comm")
_RUN_ID: Optional[str] = None


def run_id() -> str:
    """The same id on every peer and across torchrun restarts (its run id), else a timestamp."""
    global _RUN_ID
    if _RUN_ID is None:
        rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
        _RUN_ID = rid if rid and rid != "none" else datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")[:-3]
    return _RUN_ID


OmegaConf.register_new_resolver("p2prl_run_id", run_id, replace=True)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> None:
    """One line on stderr (rank 0 only, so N peers print it once), exit code 2."""
    if _is_rank0():
        print(f"p2prl: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def to_run_config(cfg: DictConfig) -> RunConfig:
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    return build_config(raw)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _job_overrides(argv: list[str]) -> list[list[str]]:
    """Per override, the list of its values as `key=value` strings (sweeps expanded)."""
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
    parsed = OverridesParser.create().parse_overrides(args)
    out = []
    for o in parsed:
        key = o.key_or_group
        if key == "hydra" or key.startswith("hydra.") or key.startswith("hydra/"):
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
                    raise ConfigError(key, value, f"unknown {key}; allowed: {', '.join(_options(key))}")
    return out


def precheck(argv: list[str]) -> None:
    """Compose and validate every job the command line asks for; exit 2 with one line if any is bad."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        per_override = _job_overrides(argv)
        combos = list(itertools.islice(itertools.product(*per_override), 256))
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            for overrides in combos:
                cfg = compose(config_name="config", overrides=list(overrides))
                run_cfg = to_run_config(cfg)
                _check_env(run_cfg)
    except ConfigError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(_one_line(e))
    finally:
        GlobalHydra.instance().clear()


def _check_env(cfg: RunConfig) -> None:
    from p2prl.envs import check_spaces, make_single_env
    env = make_single_env(cfg.env)
    try:
        check_spaces(cfg.algo.name, env.observation_space, env.action_space)
    finally:
        env.close()


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the informative ones on one."""
    parts = []
    while e is not None and len(parts) < 3:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip() and
                        not line.strip().startswith(("full_key", "object_type", "Available options",
                                                     "To append")))
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__
    return "; ".join(parts) or "invalid configuration"


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from p2prl.comm import PeerFailure
    from p2prl.runner import run

    if not _is_rank0():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run_cfg = to_run_config(cfg)
        summary = run(run_cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        fail(str(e))
    except PeerFailure as e:
        log.error("%s", e)
        sys.exit(1)
    # Multirun sweepers (e.g. Optuna) optimise the returned value.
    return summary["episode_return_mean"]


def main() -> None:
    precheck(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
