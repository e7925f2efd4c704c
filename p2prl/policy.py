"""A trained policy from Python, and the greedy episodes evaluation plays with it.

    import p2prl
    policy = p2prl.load("outputs/ppo-cartpole/<run>")   # checkpoint="latest" | "best" | a file
    env = policy.make_env()                              # the env the run trained on, its wrappers too
    obs, _ = env.reset(seed=0)
    action = policy.act(obs)                             # one observation, or a batch (B, *obs_shape)

`act(obs, deterministic=True)` takes the algorithm's greedy action (PPO: the distribution's mode, the
Gaussian mean clipped to the bounds; DQN and tabular Q-learning: argmax Q, ties to the lowest action),
on observations normalized as in training (PPO's `algo.norm_obs`). `deterministic=False` explores as
the algorithm does: PPO samples its distribution; DQN and Q-learning act epsilon-greedily with the
final exploration rate `algo.eps_end` (rank 0's; with Ape-X's `algo.apex_alpha` the other peers ended
lower), drawn from the policy's own generator
(`load(..., seed=S)`), never from the global random streams.

No process group is involved: a checkpoint's shared state (rank 0's file: the model or the Q table,
and the observation normalizer), which where the peers' parameters differ (local_sgd, gossip) holds
their mean, is the whole policy. `python -m p2prl.evaluate` and the evaluation during training
(`p2prl.periodic_eval`) play their episodes with `run_episodes` below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import gymnasium as gym
import numpy as np
import torch

from p2prl import algos, checkpoint as ckpt
from p2prl.checks import ConfigError
from p2prl.config import RunConfig
from p2prl.envs import make_single_env
from p2prl.precheck import to_run_config
from p2prl.sweep import saved_config
from p2prl.wrappers import GAME_OVER, SCORE

# The first evaluation episode's seed (then +1 each): far from training's seed + rank * num_envs + i.
EVAL_SEED = 1_000_000
BEST = "best.pt"  # under checkpoints/: the shared checkpoint of the best evaluation during training


class Policy:
    """A checkpoint's policy: `act(obs, deterministic=True)` on one observation or a batch."""

    def __init__(self, cfg: RunConfig, state: dict, observation_space: gym.Space, action_space: gym.Space,
                 seed: Optional[int] = None, checkpoint: Optional[Path] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        self.config, self.checkpoint = cfg, checkpoint
        self.observation_space, self.action_space = observation_space, action_space
        self._act = algos.spec(cfg.algo.name).policy(cfg.algo, state, observation_space, action_space,
                                                     torch.device(device))
        self.rng = np.random.default_rng(seed)

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions of the env's action shape: for one observation (of the observation space's shape)
        one action; for a batch (B, *obs_shape) an array (B, *action_shape)."""
        obs = np.asarray(obs)
        shape = self.observation_space.shape
        if obs.shape == shape:
            return self._act(obs[None], deterministic, self.rng)[0]
        if obs.shape[1:] == shape:
            return self._act(obs, deterministic, self.rng)
        raise ValueError(f"obs of shape {obs.shape}: expected {shape} (one observation) or (B, *{shape}) (a batch)")

    def __call__(self, obs: Any) -> np.ndarray:
        """The greedy action of one observation (what `run_episodes` plays)."""
        return self.act(obs)

    def make_env(self, **kwargs: Any) -> gym.Env:
        """A fresh env as the run trained on (`env.*`, its wrappers included); `kwargs` go to
        gymnasium.make (e.g. render_mode="rgb_array")."""
        return make_single_env(self.config.env, **kwargs)


def load(run_dir: Union[str, Path], checkpoint: Union[str, Path] = "latest", seed: Optional[int] = None,
         device: Union[str, torch.device] = "cpu") -> Policy:
    """The policy of a run's checkpoint: "latest" (the newest checkpoints/step_<N>.pt), "best"
    (checkpoints/best.pt, kept by `train.eval_every_steps`) or a checkpoint file. `seed` seeds the
    generator that `act(..., deterministic=False)` draws from. Raises ConfigError (one line) for a
    directory that is not a run, a missing checkpoint or an unreadable one."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    state = ckpt.load(path)
    if state is None:
        raise ConfigError("checkpoint", str(path), "is unreadable (truncated or corrupt)")
    if not isinstance(state.get("config"), dict) or "rank" in state:
        raise ConfigError("checkpoint", str(path), "is not a shared checkpoint of a p2prl run (a rank's own file "
                                                   "holds no model); allowed: latest, best or checkpoints/step_<N>.pt")
    theirs = (state["config"].get("algo", {}).get("name"), state["config"].get("env", {}).get("id"))
    if theirs != (cfg.algo.name, cfg.env.id):
        raise ConfigError("checkpoint", str(path), f"was trained with algo={theirs[0]} on {theirs[1]}, this run is "
                                                   f"algo={cfg.algo.name} on {cfg.env.id}")
    env = make_single_env(cfg.env)
    try:
        spaces = env.observation_space, env.action_space
    finally:
        env.close()
    try:
        return Policy(cfg, state, *spaces, seed=seed, checkpoint=path, device=device)
    except (KeyError, RuntimeError) as e:  # load_state_dict: missing keys or other shapes
        raise ConfigError("checkpoint", str(path), f"does not fit this run's model: {str(e).splitlines()[0][:200]}")


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's config: from summary.json when the run finished, else Hydra's saved config."""
    config = saved_config(run_dir)
    if config is None:
        raise ConfigError("run_dir", str(run_dir), "no summary.json or .hydra/config.yaml: not a p2prl run dir")
    return to_run_config(config)


def checkpoint_path(run_dir: Path, which: Union[str, Path]) -> Path:
    """The file `which` names: "latest", "best" or a path."""
    folder = run_dir / "checkpoints"
    if str(which) == "latest":
        steps = ckpt.list_steps(folder)
        if not steps:
            raise ConfigError("run_dir", str(run_dir), "has no checkpoints/step_<N>.pt to evaluate")
        return ckpt.shared_path(folder, steps[-1])
    if str(which) == "best":
        if not (folder / BEST).is_file():
            raise ConfigError("checkpoint", "best", f"{run_dir} has no checkpoints/{BEST} (training keeps one with "
                                                    "train.eval_every_steps); allowed here: latest, or a checkpoint file")
        return folder / BEST
    path = Path(which).expanduser()
    if not path.is_file():
        raise ConfigError("checkpoint", str(which), "is missing; allowed: latest, best, or a checkpoint file")
    return path


def run_episodes(env: gym.Env, policy: Callable[[Any], Any], episodes: int, seed: int) -> list[float]:
    """Returns of whole episodes, seeded seed, seed + 1, ...; on Atari (the wrappers' `score` and
    `game_over` in the info) the game's own score over every life, an episode being a game: a lost
    life's reset only continues it."""
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
