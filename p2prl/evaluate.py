"""Greedy evaluation of a run's checkpoint: `python -m p2prl.evaluate RUN_DIR [--episodes N] [--checkpoint C]`.

Writes RUN_DIR/eval.json (returns of each episode, mean, std, min, max) and prints a one-line result.
The checkpoint (`--checkpoint`): latest (the newest checkpoints/step_<N>.pt), best (checkpoints/best.pt,
the best evaluation during training, `train.eval_every_steps`) or a file. The policy is the one
`p2prl.load` gives (p2prl.policy: PPO's distribution mode, argmax or the Gaussian mean clipped to
the bounds; DQN and tabular Q-learning: argmax Q). Evaluation episodes use seeds disjoint from
training's by default, the same as the evaluation during training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Union

import numpy as np

from p2prl.atomic import write_json_atomic
from p2prl.config import ConfigError
from p2prl.policy import EVAL_SEED, load, load_run_config, run_episodes

__all__ = ["evaluate", "load_run_config", "main", "run_episodes"]


def evaluate(run_dir: Path, episodes: int = 20, seed: int = EVAL_SEED, ckpt: Union[str, Path, None] = None) -> dict:
    """Greedy episodes of `ckpt` ("latest" when None, "best", or a file); writes and returns eval.json's
    contents."""
    run_dir = Path(run_dir)
    policy = load(run_dir, "latest" if ckpt is None else ckpt)
    env = policy.make_env()
    try:
        returns = run_episodes(env, policy, episodes, seed)
    finally:
        env.close()
    r = np.asarray(returns)
    result = {"checkpoint": str(policy.checkpoint), "episodes": episodes, "seed": seed, "mean_return": float(r.mean()),
              "std_return": float(r.std()), "min_return": float(r.min()), "max_return": float(r.max()),
              "returns": returns}
    write_json_atomic(run_dir / "eval.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p2prl.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--episodes", type=int, default=20, help="evaluation episodes (default 20)")
    p.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"seed of the first episode, then +1 each (default {EVAL_SEED})")
    p.add_argument("--checkpoint", default="latest",
                   help="latest (default), best (checkpoints/best.pt, kept by train.eval_every_steps) or a file")
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
