"""Entry point: `python -m p2prl.train [overrides]` or `torchrun ... -m p2prl.train [overrides]`.

The overrides are checked first (`p2prl.precheck`), so a mistake ends every peer with one line and
exit code 2 before Hydra creates any run dir and before any peer trains. Then @hydra.main runs the job
(or the sweep). Exit codes: 0 done, 2 bad input, 1 a peer failed or training diverged, 128 + signal
when interrupted (SIGTERM 143, SIGINT 130).
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from p2prl.config import ConfigError
from p2prl.precheck import fail, is_rank0, precheck, to_run_config

log = logging.getLogger("p2prl")


def _find_conf() -> str:
    # Installed: conf/ ships inside the package as p2prl/conf; from a checkout: ../conf.
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise FileNotFoundError(f"p2prl: no conf/config.yaml next to {here}")


CONF_DIR = _find_conf()
_RUN_ID: Optional[str] = None


def _agent_started() -> Optional[datetime]:
    """When this process's parent (torchrun's agent) started: the same for all of its workers and
    across its restarts of them. Linux only."""
    try:
        start_ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return datetime.fromtimestamp(boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_id() -> str:
    """The same id on every peer and across torchrun restarts, so a restarted peer finds its run dir.

    torchrun's run id (--rdzv-id; a fresh uuid with --standalone); without one, the start time of
    torchrun's agent; without torchrun, the current time.
    """
    global _RUN_ID
    if _RUN_ID is None:
        rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
        started = _agent_started() if "TORCHELASTIC_RESTART_COUNT" in os.environ else None
        if rid and rid != "none":
            _RUN_ID = rid
        elif started is not None:
            _RUN_ID = started.strftime("%Y-%m-%d_%H-%M-%S_%f")[:-3]
        else:
            _RUN_ID = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")[:-3]
    return _RUN_ID


OmegaConf.register_new_resolver("p2prl_run_id", run_id, replace=True)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from p2prl.comm import PeerFailure
    from p2prl.faults import Interrupted, NonFiniteUpdates
    from p2prl.runner import run

    if not is_rank0():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run_cfg = to_run_config(cfg)
        summary = run(run_cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as e:
        fail(str(e))
    except (PeerFailure, NonFiniteUpdates) as e:
        log.error("%s", e)
        sys.exit(1)
    except Interrupted as e:
        log.error("%s: stopped", e)
        sys.exit(e.exit_code)
    # Multirun sweepers (e.g. Optuna) optimise the returned value.
    return summary["episode_return_mean"]


def main() -> None:
    precheck(CONF_DIR, sys.argv[1:])
    hydra_main()
    # Everything is on disk (summary, checkpoints, metrics; TensorBoard closed). Flush the logs and
    # leave without the interpreter's teardown of torch's modules, which takes most of a second: the
    # run ends when the peers agree it has, not a second later.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
