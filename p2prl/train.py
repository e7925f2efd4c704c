"""Entry point: `python -m p2prl.train [overrides]` or `torchrun ... -m p2prl.train [overrides]`.

The overrides are checked first (`p2prl.precheck`), so a mistake ends every peer with one line and
exit code 2 before Hydra creates any run dir and before any peer trains. Then @hydra.main runs the job
(or the sweep). Exit codes: 0 done, 2 bad input, 1 a peer failed or training diverged, 128 + signal
when interrupted (SIGTERM 143, SIGINT 130).

This module is the only one that ends the process; the library raises. Two exits skip the
interpreter's clean-up on purpose: after a stop signal (it may have landed inside TensorBoard's or
logging's machinery with a lock held, and closing them could then hang: seen), and when torchrun's
agent died and the peer is stuck in a C-level collective that no exception can interrupt.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from p2prl.checks import ConfigError
from p2prl.comm import StartTimeout
from p2prl.config import conf_dir, config_hash
from p2prl.host import is_rank0, run_id
from p2prl.precheck import Preflight, check_command_line, to_run_config

log = logging.getLogger("p2prl")
OmegaConf.register_new_resolver("p2prl_run_id", run_id, replace=True)
_CHECKED: dict[str, Preflight] = {}  # what the precheck established, by config hash


def _fail(message: str) -> NoReturn:
    """One line on stderr (rank 0 only, so N peers print it once), exit code 2."""
    if is_rank0():
        print(f"p2prl: error: {message}", file=sys.stderr, flush=True)
    _leave(2)


def _leave(code: int) -> NoReturn:
    """Everything is on disk (summary, checkpoints, metrics; TensorBoard closed). Flush the logs and
    leave without the interpreter's teardown of torch's modules, which takes most of a second: the
    run ends when the peers agree it has, not a second later."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave_now(code: int, why: str) -> NoReturn:
    """Leave without touching any lock: after a signal, or stuck in a collective."""
    os.write(2, f"[rank {os.environ.get('RANK', '0')}] {why}\n".encode())
    os._exit(code)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from p2prl.comm import PeerFailure
    from p2prl.faults import Interrupted, NonFiniteUpdates, stop_on_signals
    from p2prl.runner import run

    if not is_rank0():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        job = to_run_config(cfg)
        with stop_on_signals(lambda code: _leave_now(code, "torchrun's agent is gone and this peer is stuck")):
            summary = run(job, Path(HydraConfig.get().runtime.output_dir), _CHECKED.get(config_hash(job.to_dict())))
    except ConfigError as e:
        _fail(str(e))
    except (PeerFailure, StartTimeout, NonFiniteUpdates) as e:
        log.error("%s", e)
        _leave(1)
    except Interrupted as e:
        _leave_now(e.exit_code, f"{e}: stopped")
    # Multirun sweepers (e.g. Optuna) optimise the returned value.
    return summary["episode_return_mean"]


def main() -> None:
    try:
        error, jobs = check_command_line(sys.argv[1:])
    except StartTimeout as e:  # every peer that waited says so: the one that did not come may be rank 0
        print(f"p2prl: error: {e}", file=sys.stderr, flush=True)
        _leave(1)
    if error:
        # torchrun terminates the other peers as soon as one exits: every peer exits 2 all the same.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _fail(error)
    _CHECKED.update({h: checked for h, (_, checked) in jobs.items()})
    if not is_rank0():  # a sweep's "Launching N jobs" and its list of jobs: once, from rank 0
        logging.getLogger("hydra._internal.core_plugins.basic_launcher").addFilter(lambda record: False)
    hydra_main()
    _leave(0)


if __name__ == "__main__":
    main()
