"""Greedy evaluation of a run's latest checkpoint: `python -m p2prl.evaluate RUN_DIR [--episodes N] [--video]`.

Writes RUN_DIR/eval.json (returns of each episode, mean, std, min, max) and prints a one-line result;
with `--video`, MP4s of the first episodes under RUN_DIR/videos/ (`p2prl.video`), one `video: PATH`
line each.
Each algorithm's greedy policy comes from the registry (PPO: the distribution's mode, argmax or the
Gaussian mean clipped to the bounds; DQN and tabular Q-learning: argmax Q). Evaluation episodes use
seeds disjoint from training's by default.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np

from p2prl import algos, checkpoint, video
from p2prl.atomic import write_json_atomic
from p2prl.config import ConfigError, RunConfig
from p2prl.envs import make_single_env, spec_of
from p2prl.precheck import to_run_config
from p2prl.sweep import saved_config
from p2prl.wrappers import GAME_OVER, SCORE


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's config: from summary.json when the run finished, else Hydra's saved config."""
    config = saved_config(run_dir)
    if config is None:
        raise ConfigError("run_dir", str(run_dir), "no summary.json or .hydra/config.yaml: not a p2prl run dir")
    return to_run_config(config)


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


def evaluate(run_dir: Path, episodes: int = 20, seed: int = 1_000_000, ckpt: Path | None = None,
             videos: int = 0) -> dict:
    """Greedy returns of `episodes` episodes; the first `videos` of them filmed into RUN_DIR/videos/
    (the result's `videos`; `video_skipped` says why not, where the env cannot render here)."""
    cfg = load_run_config(run_dir)
    path = ckpt or latest_checkpoint(run_dir)
    state = checkpoint.load(path)
    if state is None:
        raise ConfigError("checkpoint", str(path), "is unreadable (truncated or corrupt)")
    gl = video.gl_problem(spec_of(cfg.env).entry_point)
    if gl:
        raise ConfigError("MUJOCO_GL", os.environ["MUJOCO_GL"], gl)
    recorder = video.Recorder(run_dir / "videos", path.stem, min(videos, episodes), video.fps(cfg.env))
    filming = {"inner": recorder.wrap, "render_mode": "rgb_array"} if videos else {}
    env = make_single_env(cfg.env, **filming)
    try:
        policy = algos.spec(cfg.algo.name).greedy(cfg.algo, state, env.observation_space, env.action_space)
        returns = run_episodes(env, policy, episodes, seed)
    finally:
        try:
            env.close()  # writes the last video
        finally:
            filmed = recorder.finish()
    r = np.asarray(returns)
    result = {"checkpoint": str(path), "episodes": episodes, "seed": seed, "mean_return": float(r.mean()),
              "std_return": float(r.std()), "min_return": float(r.min()), "max_return": float(r.max()),
              "returns": returns}
    if videos:
        result.update(videos=[str(f) for f in filmed], video_skipped=recorder.skipped)
    write_json_atomic(run_dir / "eval.json", result)
    return result


def main(argv: list[str] | None = None, prog: str = "python -m p2prl.evaluate") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Greedy episodes of a run's latest checkpoint: prints the mean return, writes RUN_DIR/eval.json"
                    " and, with --video, MP4s under RUN_DIR/videos/.",
        epilog=f"example:\n  {prog} outputs/ppo-cartpole/<run> --episodes 10 --video\n\n"
               "MuJoCo videos need an offscreen OpenGL: MUJOCO_GL=egl (apt-get install libegl1) or\n"
               "MUJOCO_GL=osmesa (apt-get install libosmesa6); without one the video is skipped.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=20, help="evaluation episodes (default 20)")
    p.add_argument("--seed", type=int, default=1_000_000, help="seed of the first episode (then +1 each)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file (default: the latest)")
    p.add_argument("--video", action="store_true",
                   help=f"film the first episodes into RUN_DIR/videos/ (the video extra; at most {video.MAX_FRAMES} "
                        "frames each)")
    p.add_argument("--video-episodes", type=int, default=1, metavar="N",
                   help="with --video: how many of the episodes to film (default 1)")
    a = p.parse_args(argv)
    for flag, value in (("--episodes", a.episodes), ("--video-episodes", a.video_episodes)):
        if value <= 0:
            p.error(f"{flag}={value}: must be a positive integer")
    problem = video.missing_extra() if a.video else None
    if problem:
        print(f"p2prl: error: {problem}", file=sys.stderr)
        return 2
    try:
        res = evaluate(a.run_dir, a.episodes, a.seed, a.checkpoint, a.video_episodes if a.video else 0)
    except ConfigError as e:
        print(f"p2prl: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(f"{res['checkpoint']}: mean return {res['mean_return']:.2f} +- {res['std_return']:.2f} "
                     f"over {a.episodes} episodes (min {res['min_return']:.1f}, max {res['max_return']:.1f})\n")
    for path in res.get("videos", []):
        sys.stdout.write(f"video: {path}\n")
    if res.get("video_skipped"):
        print(f"p2prl: video skipped: {res['video_skipped']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
