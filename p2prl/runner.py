"""The per-peer loop: sample -> learn -> log / checkpoint -> agree to stop. Raises; never exits."""
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
from p2prl.comm import (
    Communicator,
    PeerFailure,
    agree_on_config,
    check_identical,
    open_comm,
)
from p2prl.config import RunConfig, config_hash
from p2prl.envs import make_vec_env
from p2prl.faults import Interrupted, NonFiniteUpdates
from p2prl.host import pin, place
from p2prl.metrics import MetricsWriter, ReturnWindow, peak_rss_mb
from p2prl.periodic_eval import PeriodicEval
from p2prl.precheck import Preflight, agreed_preflight
from p2prl.preemption import preemption
from p2prl.provenance import provenance
from p2prl.checkpointer import Checkpointer
from p2prl.resume import Progress, restore
from p2prl.rundir import set_aside_earlier_run
from p2prl.seeding import env_seed
from p2prl.trackers import open_trackers

log = logging.getLogger(__name__)


def build_algorithm(cfg: RunConfig, comm: Communicator, tag: str = "") -> algos.Algorithm:
    """Per-peer envs (seeded seed + rank * num_envs + i) and the algorithm with a shared model; `tag`
    names the run among others sharing torchrun's store (for straggler preemption)."""
    num_envs = cfg.algo.num_envs
    envs, obs = make_vec_env(cfg.env, num_envs, env_seed(cfg.seed, comm.rank, num_envs))
    torch.manual_seed(cfg.seed)  # the model seed is shared; rank 0's weights are broadcast anyway
    c = cfg.comm
    peer = algos.Peer(comm, cfg.seed, c, preemption(comm, c.straggler_frac, c.min_rollout_frac, tag or "run"))
    algo = algos.spec(cfg.algo.name).build(cfg.algo, envs, obs, peer)
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
    agree_on_config(comm, cfg.flat())
    run_dir = Path(comm.broadcast_object(str(run_dir)))  # rank 0 chooses the run dir
    is_main = comm.rank == 0
    algo = build_algorithm(cfg, comm, tag=config_hash({"run_dir": str(run_dir), "config": cfg.to_dict()}))
    shared, learner = algo.shared_tensors(), algo.learner
    # local_sgd and gossip keep the peers' parameters apart on purpose: nothing to check there.
    identical = learner is None or not learner.strategy.differs
    window = ReturnWindow(cfg.train.return_window)
    p, resumed_from = restore(comm, cfg, run_dir, algo, window, checked)
    own = (run_dir / "checkpoints").resolve()
    if resumed_from is None or own not in Path(resumed_from).resolve().parents:
        # A fresh start, or one from another run's checkpoint: whatever this dir holds belongs to an
        # earlier run. Before any writer opens a file here.
        set_aside_earlier_run(comm, run_dir)
    p_start = Progress(p.step, p.iteration, p.time_s)  # where this attempt started
    saver = Checkpointer(comm, cfg, run_dir, algo, window)
    # W&B may take seconds to start on rank 0 while the others wait in the next collective: within half
    # of comm.timeout_s, or the run goes on without it.
    trackers = open_trackers(cfg.logger, run_dir, cfg.flat(), cfg.comm.timeout_s / 2) if is_main else []
    writer = MetricsWriter(run_dir, cfg.train.total_steps, enabled=is_main, start_step=p.step, trackers=trackers)
    evaluator = PeriodicEval(cfg, comm, saver, resumed=resumed_from is not None)
    code = provenance() if is_main else {}  # the code that starts the run, not what the tree holds at its end
    target, every, log_every = cfg.train.target_return, cfg.checkpoint.every_steps, cfg.train.log_every_steps
    next_log = (p.step // log_every + 1) * log_every
    # Every peer holds the same window, so decisions derived from it are already collective.
    reached = target is not None and window.mean is not None and window.mean >= target
    steps_to_target, time_to_target = (p.step, p.time_s) if reached else (None, None)
    # Everything built so far (torch, Hydra, envs, model) lives for the whole run: keep it out of the
    # garbage collector's full passes, which otherwise stall one peer at a time for milliseconds
    # while the others wait for it in the next collective.
    gc.collect()
    gc.freeze()
    t_loop, comm_s0, bytes0, calls0 = time.perf_counter(), comm.seconds, comm.bytes, comm.calls  # the loop's only
    saver.mark_boundary(p)
    interrupted, failed = False, True
    steps_by_rank = [0] * comm.world_size  # this attempt's
    try:
        while p.step < cfg.train.total_steps and not reached:
            start_step, progress = p.step, p.step / cfg.train.total_steps
            sample = algo.sample(progress)
            table = window.local_table(comm.rank, comm.world_size, start_step, algo.num_envs, sample.episodes,
                                       sample.steps)
            comm.sum_with_next(table)  # rides in the algorithm's first collective of the same dtype
            logs = algo.learn(progress)
            comm.settle()
            steps = window.merge(table)  # every peer's own steps: they differ when stragglers are cut short
            steps_by_rank = [a + b for a, b in zip(steps_by_rank, steps)]
            p.step += sum(steps)
            p.iteration += 1
            mean = window.mean
            reached = target is not None and mean is not None and mean >= target
            streak = learner.skipped_in_a_row if learner is not None else 0
            if streak >= cfg.train.max_skipped_updates:  # the same counter on every peer
                raise NonFiniteUpdates(
                    f"{streak} updates in a row were skipped because a loss or gradient was NaN or infinite on "
                    f"some peer (train.max_skipped_updates={cfg.train.max_skipped_updates}); stopping. The last "
                    f"good checkpoint is the newest in {run_dir / 'checkpoints'}")
            if identical and p.iteration % cfg.comm.check_every == 0:
                comm.phase = "check"
                check_identical(comm, shared)
            done = reached or p.step >= cfg.train.total_steps
            p.time_s = p_start.time_s + time.perf_counter() - t_start  # run time over all attempts
            evals = evaluator(p) if evaluator.due(start_step, p.step) else {}  # a collective, at global steps
            if p.step >= next_log or done or evals:
                next_log = (p.step // log_every + 1) * log_every
                elapsed = max(time.perf_counter() - t_loop, 1e-9)
                if learner is not None:  # a collective for some strategies; every peer logs the same rows
                    logs.update(learner.strategy.logs(), skipped_updates=learner.skipped)
                writer.write({"step": p.step, "time_s": p.time_s, "episode_return_mean": mean,
                              "episodes": window.episodes, "sps": (p.step - p_start.step) / elapsed,
                              "comm_frac": (comm.seconds - comm_s0) / elapsed, **logs, **evals})
            # At a rollout boundary, when the global step crosses a multiple; never while updates are
            # being skipped, so that the checkpoints before a run of NaNs are kept.
            if every is not None and p.step // every > start_step // every and not done and streak == 0:
                saver.save(p)
            saver.mark_boundary(p)
            if reached:
                steps_to_target, time_to_target = p.step, p.time_s
        loop_s, comm_s = time.perf_counter() - t_loop, comm.seconds - comm_s0
        comm_bytes, comm_calls = comm.bytes - bytes0, comm.calls - calls0
        if identical:
            comm.phase = "check"
            check_identical(comm, shared)
        if saver.saved_step != p.step:
            saver.save(p)
        max_rss_mb = comm.all_gather_object(peak_rss_mb())  # every rank's peak resident memory
        failed = False
    except BaseException as e:
        interrupted = isinstance(e, Interrupted)
        if isinstance(e, (Interrupted, PeerFailure)):
            try:
                saver.save_interrupted(str(e))
            except Interrupted:  # torchrun's SIGTERM to the survivors of a failure, landing here
                interrupted = True
                raise
        raise
    finally:
        gc.unfreeze()  # a multirun's next job starts from a collectable heap
        if failed and not interrupted:  # a signal may have landed inside the writer: the entry point leaves lock-free
            writer.close()
            evaluator.close()
        try:
            algo.envs.close(terminate=True)  # async workers end with the run, not the process (multirun jobs share it)
        except Exception as e:  # workers killed with the job (scancel): the reason the run ended matters more
            log.warning("closing the envs failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
    updates = learner.updates if learner is not None else p.iteration - p_start.iteration
    summary = {
        "reached": steps_to_target is not None, "steps_to_target": steps_to_target,
        "time_to_target_s": time_to_target, "final_step": p.step, "world_size": comm.world_size,
        "wall_s": time.perf_counter() - t_start, "loop_s": loop_s, "comm_s": comm_s,
        "comm_frac": comm_s / max(loop_s, 1e-9), "comm_calls": comm_calls, "comm_bytes": comm_bytes,
        "updates": updates,
        "comm_bytes_per_update": comm_bytes / updates if updates else None,  # what a comm.compress form saves
        "sps": (p.step - p_start.step) / max(loop_s, 1e-9), "steps_by_rank": steps_by_rank,
        "max_rss_mb": max_rss_mb, "episodes": window.episodes,
        "episode_return_mean": window.mean, "run_dir": str(run_dir),
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "resumed_at_step": p_start.step if resumed_from is not None else None,
        **code, "config": cfg.to_dict(),
    }
    if is_main:
        write_json_atomic(run_dir / "summary.json", summary)
        mean = "none yet" if window.mean is None else f"{window.mean:.1f}"  # as the progress lines show it
        log.info("done: step %d, return %s, reached=%s, %.1f s", p.step, mean, summary["reached"],
                 summary["wall_s"])
    comm.phase = "shutdown"
    try:
        comm.agree(False)  # leave together: no peer tears down while another still writes
    except Interrupted:
        raise  # the entry point leaves lock-free
    except BaseException:
        writer.close()
        evaluator.close()
        raise
    # After the last collective: W&B's upload on rank 0 may outlast comm.timeout_s, and no peer waits for it.
    writer.close()
    evaluator.close()
    return summary
