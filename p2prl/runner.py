"""The per-peer loop: sample -> update -> log / checkpoint -> agree to stop."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2prl import checkpoint
from p2prl.algos import Algorithm
from p2prl.comm import Communicator, agree_on_config, check_identical, open_comm
from p2prl.config import RunConfig
from p2prl.envs import check_spaces, make_vec_env
from p2prl.metrics import MetricsWriter, ReturnWindow, write_json_atomic

log = logging.getLogger(__name__)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
    """Train until the target return or the global step budget; returns the summary (all ranks)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.train.torch_threads)
    comm = open_comm(cfg.comm)
    agree_on_config(comm, flatten(cfg.to_dict()))
    run_dir = Path(comm.broadcast_object(str(run_dir)))  # rank 0 chooses the run dir
    is_main = comm.rank == 0
    algo = build_algorithm(cfg, comm)
    shared = algo.shared_tensors()
    window = ReturnWindow(cfg.train.return_window)
    writer = MetricsWriter(run_dir, cfg.train.total_steps, enabled=is_main)
    target = cfg.train.target_return
    step, iteration, next_log = 0, 0, cfg.train.log_every_steps
    steps_to_target = time_to_target = None
    comm.seconds = 0.0
    t_loop = time.perf_counter()
    try:
        while step < cfg.train.total_steps:
            result = algo.iteration(progress=step / cfg.train.total_steps)
            start_step, iteration = step, iteration + 1
            step += result.steps * comm.world_size
            window.sync(comm, start_step, algo.num_envs, result.episodes)
            mean = window.mean
            # Every peer holds the same window, so this decision is already collective.
            reached = target is not None and mean is not None and mean >= target
            if iteration % cfg.comm.check_every == 0:
                comm.phase = "check"
                check_identical(comm, shared)
            done = reached or step >= cfg.train.total_steps
            if step >= next_log or done:
                next_log = (step // cfg.train.log_every_steps + 1) * cfg.train.log_every_steps
                elapsed = time.perf_counter() - t_loop
                writer.write({"step": step, "time_s": time.perf_counter() - t_start,
                              "episode_return_mean": mean, "episodes": window.episodes,
                              "sps": step / max(elapsed, 1e-9), "comm_frac": comm.seconds / max(elapsed, 1e-9),
                              **result.logs})
            if reached:
                steps_to_target, time_to_target = step, time.perf_counter() - t_start
                break
        loop_s = time.perf_counter() - t_loop
        comm_s = comm.seconds
        comm.phase = "check"
        check_identical(comm, shared)
        comm.phase = "checkpoint"
        if is_main:
            checkpoint.save_atomic({"step": step, **algo.state_dict()}, checkpoint.shared_path(run_dir, step))
            checkpoint.prune(run_dir / "checkpoints", cfg.checkpoint.keep)
    finally:
        writer.close()
    summary = {
        "reached": steps_to_target is not None, "steps_to_target": steps_to_target,
        "time_to_target_s": time_to_target, "final_step": step, "world_size": comm.world_size,
        "wall_s": time.perf_counter() - t_start, "comm_frac": comm_s / max(loop_s, 1e-9),
        "sps": step / max(loop_s, 1e-9), "episodes": window.episodes,
        "episode_return_mean": window.mean, "comm_calls": comm.calls, "run_dir": str(run_dir),
        "config": cfg.to_dict(),
    }
    if is_main:
        write_json_atomic(run_dir / "summary.json", summary)
        log.info("done: step %d, return %s, reached=%s, %.1f s", step, window.mean, summary["reached"],
                 summary["wall_s"])
    comm.phase = "shutdown"
    comm.agree(False)  # leave together: no peer tears down while another still writes
    return summary
