"""Entry point: `python -m p2prl.train [overrides]`, `torchrun ... -m p2prl.train [overrides]`, or the
tasks of a SLURM step (`srun`) or of a submitit job.

@hydra.main composes the command line once; its callback (p2prl.launch.Precheck) checks what it
composed before Hydra creates any run dir, so a mistake ends every peer with one line and exit code 2
before any peer trains and before anything of an existing run is touched. Then Hydra runs the job (or
the sweep). Exit codes: 0 done, 2 bad input, 1 a peer failed or training diverged, 128 + signal when
interrupted (SIGTERM 143, SIGINT 130).

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
from omegaconf import DictConfig

from p2prl.checks import ConfigError
from p2prl.comm import StartTimeout
from p2prl.config import conf_dir
from p2prl.host import is_rank0
from p2prl.launch import Crashed, Stop, failed_job, take_checked
from p2prl.launcher_env import adopt_launcher_env
from p2prl.precheck import START_TIMEOUT_S, explain, to_run_config
from p2prl.search import objective, register_plugin_defaults

log = logging.getLogger("p2prl")


def _fail(message: str) -> NoReturn:
    """One line on stderr (rank 0 only, so N peers print it once), exit code 2."""
    # torchrun terminates the other peers as soon as one exits: every peer exits 2 all the same.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    from p2prl.faults import SIGNALS, Interrupted, NonFiniteUpdates, stop_on_signals
    from p2prl.requeue import Requeue, hand_over, in_submitit_job, on_preemption
    from p2prl.runner import run

    adopt_launcher_env()  # a submitit job's task starts here, not in main()
    if not is_rank0():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        # A single run's callback checked it already; a sweep's job is checked where it runs (p2prl.launch).
        job, checked = take_checked() or (to_run_config(cfg), None)
        # In a submitit job SIGTERM comes with the preemption signal, which saves and requeues (p2prl.requeue).
        signals = (signal.SIGINT,) if in_submitit_job() else SIGNALS
        with stop_on_signals(lambda code: _leave_now(code, "torchrun's agent is gone and this peer is stuck"),
                             signals), on_preemption():
            summary = run(job, Path(HydraConfig.get().runtime.output_dir), checked)
    except ConfigError as e:
        _fail(str(e))
    except Requeue as e:
        log.warning("%s", e)
        if is_rank0():
            hand_over()  # submitit's handler: resubmits the job and exits
        _leave(0)
    except (PeerFailure, StartTimeout, NonFiniteUpdates) as e:
        log.error("%s", e)
        _leave(1)
    except Interrupted as e:
        _leave_now(e.exit_code, f"{e}: stopped")
    return objective(job, summary, Path(summary["run_dir"]))  # what a sweeper (Optuna's) optimises


def main() -> None:
    adopt_launcher_env()  # the tasks of a SLURM step: peers without torchrun (p2prl.launcher_env)
    # Hydra then re-raises what goes wrong while composing, instead of printing its own multi-line
    # report and exiting 1: the peers agree on it and say it in one line, with exit code 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_plugin_defaults()
    if not is_rank0():  # a sweep's "Launching N jobs" and its list of jobs: once, from rank 0
        logging.getLogger("hydra._internal.core_plugins.basic_launcher").addFilter(lambda record: False)
    try:
        # Hydra composes once more before that, on its own, to read `hydra.mode` (`Hydra.get_mode`).
        hydra_main()
    except Crashed as e:
        raise e.__cause__ from None  # a bug: its traceback
    except Stop as e:
        if e.code == 2:
            _fail(e.line)
        print(f"p2prl: error: {e.line}", file=sys.stderr, flush=True)
        _leave(e.code)
    except Exception as e:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
        from p2prl.comm import agree_before_start
        if (job := failed_job(e)) is not None:  # a job a launcher ran elsewhere: its own log says more
            print(f"p2prl: error: {job.line}", file=sys.stderr, flush=True)
            _leave(job.code)
        if not isinstance(e, (ConfigError, HydraException, OmegaConfBaseException)):
            raise
        # Hydra's composition, before the callback: the peers still meet, so that every one exits 2 alike.
        try:
            _fail(agree_before_start(explain(e, sys.argv[1:]), [], START_TIMEOUT_S, tag="start"))
        except StartTimeout as timeout:
            print(f"p2prl: error: {timeout}", file=sys.stderr, flush=True)
            _leave(1)
    _leave(0)


if __name__ == "__main__":
    main()
