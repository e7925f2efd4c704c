"""Greedy evaluation of a run's latest checkpoint: `python -m p2prl.evaluate RUN_DIR [--episodes N]`.

Writes RUN_DIR/eval.json (returns of each episode, mean, std, min, max) and prints a one-line result.
Each algorithm's greedy policy comes from the registry (PPO: the distribution's mode, argmax or the
Gaussian mean clipped to the bounds; DQN and tabular Q-learning: argmax Q). Evaluation episodes use
seeds disjoint from training's by default.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

from p2prl import algos, checkpoint
from p2prl.atomic import write_json_atomic
from p2prl.config import ConfigError, RunConfig
from p2prl.envs import make_single_env
from p2prl.precheck import to_run_config
from p2prl.wrappers import GAME_OVER, SCORE


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's config: from summary.json when the run finished, else Hydra's saved config."""
    from omegaconf import OmegaConf
    summary = run_dir / "summary.json"
    if summary.is_file():
        return to_run_config(json.loads(summary.read_text())["config"])
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError("run_dir", str(run_dir), "no summary.json or .hydra/config.yaml: not a p2prl run dir")
    return to_run_config(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))


def latest_checkpoint(run_dir: Path) -> Path:
    steps = checkpoint.list_steps(run_dir / "checkpoints")
    if not steps:
        raise ConfigError("run_dir", str(run_dir), "has no checkpoints/step_<N>.pt to evaluate")
    return checkpoint.shared_path(run_dir / "checkpoints", steps[-1])


def run_episodes(env: gym.Env, policy: algos.Policy, episodes: int, seed: int) -> list[float]:
    """Returns of whole episodes; on Atari (the wrappers' `score` and `game_over` in the info) the game's
    own score over every life, an episode being a game: a lost life's reset only continues it."""
    returns = []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        total = float(info.get(SCORE, 0.0))
        while True:
            obs, r, term, trunc, info = env.step(policy(obs))
            total += float(info.get(SCORE, r))
            if info.get(GAME_OVER, term or trunc):
                break
            if term or trunc:  # a life lost: the same game goes on
                obs, info = env.reset()
                total += float(info.get(SCORE, 0.0))
        returns.append(total)
    return returns


def evaluate(run_dir: Path, episodes: int = 20, seed: int = 1_000_000, ckpt: Path | None = None) -> dict:
    cfg = load_run_config(run_dir)
    path = ckpt or latest_checkpoint(run_dir)
    state = checkpoint.load(path)
    if state is None:
        raise ConfigError("checkpoint", str(path), "is unreadable (truncated or corrupt)")
    env = make_single_env(cfg.env)
    try:
        policy = algos.spec(cfg.algo.name).greedy(cfg.algo, state, env.observation_space, env.action_space)
        returns = run_episodes(env, policy, episodes, seed)
    finally:
        env.close()
    r = np.asarray(returns)
    result = {"checkpoint": str(path), "episodes": episodes, "seed": seed, "mean_return": float(r.mean()),
              "std_return": float(r.std()), "min_return": float(r.min()), "max_return": float(r.max()),
              "returns": returns}
    write_json_atomic(run_dir / "eval.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p2prl.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=20, help="evaluation episodes (default 20)")
    p.add_argument("--seed", type=int, default=1_000_000, help="seed of the first episode (then +1 each)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file (default: the latest)")
    a = p.parse_args(argv)
    if a.episodes <= 0:
        p.error(f"--episodes={a.episodes}: must be a positive integer")
    try:
        res = evaluate(a.run_dir, a.episodes, a.seed, a.checkpoint)
    except ConfigError as e:
        print(f"p2prl: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(f"{res['checkpoint']}: mean return {res['mean_return']:.2f} +- {res['std_return']:.2f} "
                     f"over {a.episodes} episodes (min {res['min_return']:.1f}, max {res['max_return']:.1f})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
