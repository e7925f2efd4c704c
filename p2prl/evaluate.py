"""Greedy evaluation of a run's checkpoint:
`python -m p2prl.evaluate RUN_DIR [--episodes N] [--checkpoint C] [--video]`.

Writes RUN_DIR/eval.json (returns of each episode, mean, std, min, max) and prints a one-line result;
with `--video`, MP4s of the first episodes under RUN_DIR/videos/ (`p2prl.video`), one `video: PATH`
line each. The checkpoint (`--checkpoint`): latest (the newest checkpoints/step_<N>.pt), best
(checkpoints/best.pt, the best evaluation during training, `train.eval_every_steps`) or a file. The
policy is the one `p2prl.load` gives (p2prl.policy: PPO's distribution mode, argmax or the Gaussian
mean clipped to the bounds; DQN and tabular Q-learning: argmax Q). Evaluation episodes use seeds
disjoint from training's by default, the same as the evaluation during training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Union

import numpy as np

from p2prl import video
from p2prl.atomic import write_json_atomic
from p2prl.checks import ConfigError
from p2prl.policy import EVAL_SEED, load, load_run_config, run_episodes

__all__ = ["evaluate", "load_run_config", "main", "run_episodes"]


def evaluate(run_dir: Union[str, Path], episodes: int = 20, seed: int = EVAL_SEED,
             ckpt: Union[str, Path, None] = None, videos: int = 0) -> dict:
    """Greedy episodes of `ckpt` ("latest" when None, "best", or a file); the first `videos` of them
    filmed into RUN_DIR/videos/ (the result's `videos`; `video_skipped` says why not, where the env
    cannot render here). Writes and returns eval.json's contents."""
    run_dir = Path(run_dir)
    policy = load(run_dir, "latest" if ckpt is None else ckpt)
    cfg = policy.config
    recorder = video.Recorder(run_dir / "videos", Path(policy.checkpoint).stem, min(videos, episodes),
                              video.fps(cfg.env))
    filming = {"inner": recorder.wrap, "render_mode": "rgb_array"} if videos else {}
    env = None
    try:
        env = policy.make_env(**filming)
        returns = run_episodes(env, policy, episodes, seed)
    finally:
        try:
            if env is not None:
                env.close()  # writes the last video
        finally:
            filmed = recorder.finish()  # and removes its scratch dir, also when the env could not be made
    r = np.asarray(returns)
    result = {"checkpoint": str(policy.checkpoint), "episodes": episodes, "seed": seed,
              "mean_return": float(r.mean()), "std_return": float(r.std()), "min_return": float(r.min()),
              "max_return": float(r.max()), "returns": returns}
    if videos:
        result.update(videos=[str(f) for f in filmed], video_skipped=recorder.skipped)
    write_json_atomic(run_dir / "eval.json", result)
    return result


def main(argv: list[str] | None = None, prog: str = "python -m p2prl.evaluate") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Greedy episodes of a run's checkpoint: prints the mean return, writes RUN_DIR/eval.json"
                    " and, with --video, MP4s under RUN_DIR/videos/.",
        epilog=f"example:\n  {prog} outputs/ppo-cartpole/<run> --episodes 10 --video\n"
               f"  {prog} outputs/ppo-cartpole/<run> --checkpoint best\n\n"
               "MuJoCo videos need an offscreen OpenGL: MUJOCO_GL=egl (apt-get install libegl1) or\n"
               "MUJOCO_GL=osmesa (apt-get install libosmesa6); without one the video is skipped.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=20, help="evaluation episodes (default 20)")
    p.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"seed of the first episode, then +1 each (default {EVAL_SEED})")
    p.add_argument("--checkpoint", default="latest",
                   help="latest (default), best (checkpoints/best.pt, kept by train.eval_every_steps) or a file")
    p.add_argument("--video", action="store_true",
                   help=f"film the first episodes into RUN_DIR/videos/ (the video extra; at most {video.MAX_FRAMES} "
                        "frames each)")
    p.add_argument("--video-episodes", type=int, default=1, metavar="N",
                   help="with --video: how many of the episodes to film (default 1)")
    a = p.parse_args(argv)
    for flag, value in (("--episodes", a.episodes), ("--video-episodes", a.video_episodes)):
        if value <= 0:
            p.error(f"{flag}={value}: must be a positive integer")
    # gymnasium refuses a negative seed only once an episode starts, with a traceback.
    problem = f"--seed={a.seed}: must be an integer >= 0 (episode i is seeded seed + i)" if a.seed < 0 else None
    problem = problem or (video.missing_extra() if a.video else None)
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
