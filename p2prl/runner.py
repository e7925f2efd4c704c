"""The per-peer loop: sample -> update -> log / checkpoint -> agree to stop."""
from __future__ import annotations

import gc
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2prl.algos import Algorithm
from p2prl.comm import Communicator, PeerFailure, agree_on_config, check_identical, open_comm, pin_cores
from p2prl.config import RunConfig
from p2prl.envs import check_spaces, make_vec_env
from p2prl.faults import Interrupted, NonFiniteUpdates, stop_on_signals
from p2prl.metrics import MetricsWriter, ReturnWindow, write_json_atomic
from p2prl.resume import Checkpointer, Progress, flatten, restore

log = logging.getLogger(__name__)


def build_algorithm(cfg: RunConfig, comm: Communicator) -> Algorithm:
    """Per-peer envs (seeded seed + rank * num_envs + i) and the algorithm with a shared model."""
    num_envs = cfg.algo.num_envs
    envs, obs = make_vec_env(cfg.env, num_envs, cfg.seed + comm.rank * num_envs)
    check_spaces(cfg.algo.name, envs.single_observation_space, envs.single_action_space)
    torch.manual_seed(cfg.seed)  # the model seed is shared; rank 0's weights are broadcast anyway
    if cfg.algo.name in ("ppo", "a2c"):
        from p2prl.algos.ppo import PPO
        algo = PPO(cfg.algo, envs, obs, comm)
    elif cfg.algo.name == "dqn":
        from p2prl.algos.dqn import DQN
        algo = DQN(cfg.algo, envs, obs, comm, seed=cfg.seed + comm.rank)
    elif cfg.algo.name == "qlearning":
        from p2prl.algos.qlearning import QLearning
        algo = QLearning(cfg.algo, envs, obs, comm, seed=cfg.seed + comm.rank)
    else:  # pragma: no cover - build_config only admits registered names
        raise AssertionError(f"no algorithm {cfg.algo.name}")
    # Per-peer exploration randomness: different actions and minibatches on every peer.
    torch.manual_seed(cfg.seed + comm.rank)
    np.random.seed(cfg.seed + comm.rank)
    random.seed(cfg.seed + comm.rank)
    return algo


def run(cfg: RunConfig, run_dir: Path) -> dict:
    """Train until the target return or the global step budget; returns the summary (all ranks).

    Raises `Interrupted` (SIGTERM/SIGINT, or torchrun's agent died), `PeerFailure` (a peer died or
    froze) and `NonFiniteUpdates`; on the first two, rank 0 first saves the model of the last
    iteration boundary to checkpoints/interrupted.pt.
    """
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.train.torch_threads)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pinned = cfg.train.pin_cores and pin_cores(cfg.train.torch_threads) is not None
    comm = open_comm(cfg.comm, spin=pinned)
    try:
        with stop_on_signals():
            return _train(cfg, run_dir, comm, t_start)
    finally:
        # A multirun's next job (or an in-process caller) gets back the cores the process had before.
        if pinned:
            os.sched_setaffinity(0, affinity)
        comm.close()


def _train(cfg: RunConfig, run_dir: Path, comm: Communicator, t_start: float) -> dict:
    agree_on_config(comm, flatten(cfg.to_dict()))
    run_dir = Path(comm.broadcast_object(str(run_dir)))  # rank 0 chooses the run dir
    is_main = comm.rank == 0
    algo = build_algorithm(cfg, comm)
    shared = algo.shared_tensors()
    window = ReturnWindow(cfg.train.return_window)
    p, resumed_from = restore(comm, cfg, run_dir, algo, window)
    p_start = Progress(p.step, p.iteration, p.time_s)  # where this attempt started
    saver = Checkpointer(comm, cfg, run_dir, algo, window)
    writer = MetricsWriter(run_dir, cfg.train.total_steps, enabled=is_main, start_step=p.step)
    target, every = cfg.train.target_return, cfg.checkpoint.every_steps
    learner = getattr(algo, "learner", None)
    next_log = (p.step // cfg.train.log_every_steps + 1) * cfg.train.log_every_steps
    # Every peer holds the same window, so decisions derived from it are already collective.
    reached = target is not None and window.mean is not None and window.mean >= target
    steps_to_target, time_to_target = (p.step, p.time_s) if reached else (None, None)
    comm.seconds = 0.0
    # Everything built so far (torch, Hydra, envs, model) lives for the whole run: keep it out of the
    # garbage collector's full passes, which otherwise stall one peer at a time for milliseconds
    # while the others wait for it in the next collective.
    gc.collect()
    gc.freeze()
    t_loop, comm_s0 = time.perf_counter(), comm.seconds  # comm_frac counts the loop's collectives only
    saver.mark_boundary(p)
    try:
        while p.step < cfg.train.total_steps and not reached:
            start_step = p.step
            result = algo.iteration(p.step / cfg.train.total_steps,
                                    lambda eps: window.local_table(comm, start_step, algo.num_envs, eps))
            p.step += result.steps * comm.world_size
            p.iteration += 1
            if result.episode_table is not None:  # summed in one of the algorithm's own collectives
                window.merge(result.episode_table)
            else:
                window.sync(comm, start_step, algo.num_envs, result.episodes)
            mean = window.mean
            reached = target is not None and mean is not None and mean >= target
            _check_skips(learner, cfg.train.max_skipped_updates, run_dir)
            if p.iteration % cfg.comm.check_every == 0:
                comm.phase = "check"
                check_identical(comm, shared)
            done = reached or p.step >= cfg.train.total_steps
            p.time_s = p_start.time_s + time.perf_counter() - t_start  # run time over all attempts
            if p.step >= next_log or done:
                next_log = (p.step // cfg.train.log_every_steps + 1) * cfg.train.log_every_steps
                elapsed = max(time.perf_counter() - t_loop, 1e-9)
                row = {"step": p.step, "time_s": p.time_s, "episode_return_mean": mean,
                       "episodes": window.episodes, "sps": (p.step - p_start.step) / elapsed,
                       "comm_frac": (comm.seconds - comm_s0) / elapsed, **result.logs}
                if learner is not None:
                    row.setdefault("skipped_updates", learner.skipped)
                writer.write(row)
            # At a rollout boundary, when the global step crosses a multiple; never while updates are
            # being skipped, so that the checkpoints before a run of NaNs are kept.
            if every is not None and p.step // every > start_step // every and not done and \
                    getattr(learner, "skipped_in_a_row", 0) == 0:
                saver.save(p)
            saver.mark_boundary(p)
            if reached:
                steps_to_target, time_to_target = p.step, p.time_s
        loop_s = time.perf_counter() - t_loop
        comm_s = comm.seconds - comm_s0
        comm.phase = "check"
        check_identical(comm, shared)
        if saver.saved_step != p.step:
            saver.save(p)
    except Interrupted as e:
        saver.save_interrupted(str(e))
        # The signal may have landed inside TensorBoard's or logging's machinery with a lock held, and
        # closing them could then hang (seen). What matters is on disk (metrics rows are written whole,
        # the model just above), so leave now, lock-free.
        os.write(2, f"[rank {comm.rank}] {e}: stopped\n".encode())
        os._exit(e.exit_code)
    except PeerFailure as e:
        saver.save_interrupted(str(e))
        raise
    finally:
        gc.unfreeze()  # a multirun's next job starts from a collectable heap
        writer.close()
    summary = {
        "reached": steps_to_target is not None, "steps_to_target": steps_to_target,
        "time_to_target_s": time_to_target, "final_step": p.step, "world_size": comm.world_size,
        "wall_s": time.perf_counter() - t_start, "comm_frac": comm_s / max(loop_s, 1e-9),
        "sps": (p.step - p_start.step) / max(loop_s, 1e-9), "episodes": window.episodes,
        "episode_return_mean": window.mean, "comm_calls": comm.calls, "run_dir": str(run_dir),
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "resumed_at_step": p_start.step if resumed_from is not None else None,
        "config": cfg.to_dict(),
    }
    if is_main:
        write_json_atomic(run_dir / "summary.json", summary)
        log.info("done: step %d, return %s, reached=%s, %.1f s", p.step, window.mean, summary["reached"],
                 summary["wall_s"])
    comm.phase = "shutdown"
    comm.agree(False)  # leave together: no peer tears down while another still writes
    return summary


def _check_skips(learner: Any, limit: int, run_dir: Path) -> None:
    """Stop (on every peer alike: the counter is) once `limit` updates in a row were non-finite."""
    streak = getattr(learner, "skipped_in_a_row", 0)
    if streak >= limit:
        raise NonFiniteUpdates(
            f"{streak} updates in a row were skipped because a loss or gradient was NaN or infinite on some "
            f"peer (train.max_skipped_updates={limit}); stopping. The last good checkpoint is the newest "
            f"in {run_dir / 'checkpoints'}")
