"""One peer's run: the prologue every peer agrees on (preflight, placement, the communicator), this
peer's collector and algorithm, then its loop (`p2prl.loop`: sample -> learn -> log / checkpoint ->
agree to stop, the phases marked there). Raises; never exits."""
from __future__ import annotations

import gc
import logging
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from p2prl import algos
from p2prl.atomic import write_json_atomic
from p2prl.collect import Collector
from p2prl.comm import Communicator, PeerFailure, agree_on_config, open_comm
from p2prl.config import RunConfig, config_hash
from p2prl.envs import make_vec_env
from p2prl.faults import Interrupted
from p2prl.host import pin, place
from p2prl.loop import Loop
from p2prl.precheck import Preflight, agreed_preflight
from p2prl.preemption import preemption
from p2prl.seeding import env_seed
from p2prl.timing import Stopwatch

log = logging.getLogger(__name__)


def build_algorithm(cfg: RunConfig, comm: Communicator, tag: str = "", clock: Optional[Stopwatch] = None
                    ) -> algos.Algorithm:
    """This peer's collector (its envs seeded seed + rank * num_envs + i) and the algorithm with a shared
    model, built with it; `tag` names the run among others sharing torchrun's store (for straggler
    preemption); `clock` times both (a fresh one if None)."""
    num_envs = cfg.algo.num_envs
    envs, obs = make_vec_env(cfg.env, num_envs, env_seed(cfg.seed, comm.rank, num_envs))
    torch.manual_seed(cfg.seed)  # the model seed is shared; rank 0's weights are broadcast anyway
    c, clock = cfg.comm, clock if clock is not None else Stopwatch(comm)
    collector = Collector(envs, obs, preemption(comm, c.straggler_frac, c.min_rollout_frac, tag or "run"), clock)
    algo = algos.spec(cfg.algo.name).build(cfg.algo, collector, algos.Peer(comm, cfg.seed, c, clock))
    # Per-peer sampling randomness: different actions and minibatches on every peer.
    torch.manual_seed(cfg.seed + comm.rank)
    np.random.seed(cfg.seed + comm.rank)
    random.seed(cfg.seed + comm.rank)
    return algo


def run(cfg: RunConfig, run_dir: Path, checked: Optional[Preflight] = None) -> dict:
    """Train until the target return or the global step budget; returns the summary (all ranks).

    `checked`: what the precheck established for this job (a single run's, from Hydra's callback);
    None: a sweep's job, or a caller's, checked here, every peer's verdict compared. Raises
    `Interrupted` (SIGTERM/SIGINT, or torchrun's agent died), `PeerFailure` (a peer died or froze),
    `NonFiniteUpdates` and `ConfigError`; on the first two, rank 0 first saves the model of the last
    iteration boundary to checkpoints/interrupted.pt.
    """
    t_start = time.perf_counter()
    checked = checked if checked is not None else agreed_preflight(cfg, run_dir)
    torch.set_num_threads(cfg.train.torch_threads)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    placement = place(cfg.train.torch_threads) if cfg.train.pin_cores else None
    if placement is not None:
        pin(placement)
    devices = checked.devices
    comm = open_comm(cfg.comm, devices.backend, cores=placement.cores if placement else None, device=devices.device)
    log.info("device %s, %s sums: %s", devices.device, devices.backend, devices.reason)
    if comm.world_size > 1:
        log.info("%s: %s", f"pinned to cores {placement.cores}" if placement and placement.cores else "not pinned",
                 placement.reason if placement else "train.pin_cores=false")
    try:
        return _train(cfg, run_dir, comm, t_start, checked.checkpoint)
    finally:
        # A multirun's next job (or an in-process caller) gets back the cores the process had before.
        if placement is not None and placement.cores is not None:
            os.sched_setaffinity(0, affinity)
        comm.close()


def _train(cfg: RunConfig, run_dir: Path, comm: Communicator, t_start: float, checked: Optional[Path]) -> dict:
    """Agree, build, loop, finish, report, leave together."""
    agree_on_config(comm, cfg.flat())
    run_dir = Path(comm.broadcast_object(str(run_dir)))  # rank 0 chooses the run dir
    clock = Stopwatch(comm)
    algo = build_algorithm(cfg, comm, config_hash({"run_dir": str(run_dir), "config": cfg.to_dict()}), clock)
    loop = Loop(cfg, run_dir, comm, algo, clock, checked)
    interrupted, failed = False, True
    try:
        loop.run(t_start)
        loop.finish()
        failed = False
    except BaseException as e:
        interrupted = isinstance(e, Interrupted)
        if isinstance(e, (Interrupted, PeerFailure)):
            try:
                loop.saver.save_interrupted(str(e))
            except Interrupted:  # torchrun's SIGTERM to the survivors of a failure, landing here
                interrupted = True
                raise
        raise
    finally:
        gc.unfreeze()  # a multirun's next job starts from a collectable heap
        if failed and not interrupted:  # a signal may have landed inside the writer: the entry point leaves lock-free
            loop.close()
        try:
            algo.collector.close()
        except Exception as e:  # workers killed with the job (scancel): the reason the run ended matters more
            log.warning("closing the envs failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    summary = loop.summary()
    if comm.rank == 0:
        write_json_atomic(run_dir / "summary.json", summary)
        mean = "none yet" if loop.window.mean is None else f"{loop.window.mean:.1f}"  # as the progress lines show it
        log.info("done: step %d, return %s, reached=%s, %.1f s", loop.p.step, mean, summary["reached"],
                 summary["wall_s"])
    comm.phase = "shutdown"
    try:
        comm.agree(False)  # leave together: no peer tears down while another still writes
    except Interrupted:
        raise  # the entry point leaves lock-free
    except BaseException:
        loop.close()
        raise
    loop.close()  # after the last collective: W&B's upload on rank 0 may outlast comm.timeout_s
    return summary
