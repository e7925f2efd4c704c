"""Per-peer vector environments: construction, seeding and space checks."""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from p2prl.config import ConfigError, EnvConfig


def env_kwargs(cfg: EnvConfig) -> dict:
    kwargs = dict(cfg.kwargs)
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    return kwargs


def spec_of(cfg: EnvConfig) -> gym.envs.registration.EnvSpec:
    try:
        return gym.spec(cfg.id)
    except gym.error.Error as e:
        raise ConfigError("env.id", cfg.id, f"not a registered gymnasium env ({str(e).splitlines()[0]})")


def make_single_env(cfg: EnvConfig, **extra) -> gym.Env:
    """One env, for space checks and evaluation; a missing extra becomes a one-line config error."""
    spec_of(cfg)
    try:
        return gym.make(cfg.id, **env_kwargs(cfg), **extra)
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env={cfg.name}", cfg.id, f"needs an extra: {str(e).splitlines()[0]}")


def make_vec_env(cfg: EnvConfig, num_envs: int, seed: int) -> tuple[gym.vector.VectorEnv, np.ndarray]:
    """A vector env of `num_envs` copies, reset with seeds seed, seed+1, ...; returns (envs, first obs).

    Uses gymnasium's native vector env where the env has one (CartPole: one numpy step for all envs,
    far faster than stepping Python envs in a loop). Every kind autoresets on the *next* step
    (gymnasium 1.x default), which the samplers rely on.
    """
    spec = spec_of(cfg)
    mode = "vector_entry_point" if spec.vector_entry_point is not None else "sync"
    try:
        envs = gym.make_vec(cfg.id, num_envs=num_envs, vectorization_mode=mode, **env_kwargs(cfg))
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env={cfg.name}", cfg.id, f"needs an extra: {str(e).splitlines()[0]}")
    mode_used = envs.metadata.get("autoreset_mode")
    assert mode_used is None or getattr(mode_used, "value", mode_used) == "NextStep", \
        f"p2prl's samplers expect next-step autoreset, {cfg.id} uses {mode_used}"
    obs, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)
    return envs, obs


def check_spaces(algo: str, obs_space: gym.Space, action_space: gym.Space) -> None:
    """Refuse algorithm/env pairs that cannot work, before any training starts."""
    box_or_discrete = (gym.spaces.Box, gym.spaces.Discrete)
    if algo in ("ppo", "a2c"):
        if not isinstance(action_space, box_or_discrete):
            raise ConfigError("algo", algo, f"needs Discrete or Box actions, the env has {action_space}")
        if not isinstance(obs_space, gym.spaces.Box):
            raise ConfigError("algo", algo, f"needs Box observations, the env has {obs_space}")
    elif algo == "dqn":
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ConfigError("algo", algo, f"needs Discrete actions, the env has {action_space}; use algo=ppo")
        if not isinstance(obs_space, gym.spaces.Box):
            raise ConfigError("algo", algo, f"needs Box observations, the env has {obs_space}")
    elif algo == "qlearning":
        if not (isinstance(obs_space, gym.spaces.Discrete) and isinstance(action_space, gym.spaces.Discrete)):
            raise ConfigError("algo", algo, f"needs Discrete observations and actions, the env has "
                                            f"{obs_space} and {action_space}")
