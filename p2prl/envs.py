"""Per-peer vector environments: construction, seeding, and env state for checkpoints.

Discrete spaces that do not start at 0 (`Discrete(n, start=s)`) are shifted to start at 0 before an
algorithm sees them (`zero_based`): algorithms index actions and states from 0.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch

from p2prl.config import ConfigError, EnvConfig
from p2prl.wrappers import wrap


def env_kwargs(cfg: EnvConfig) -> dict:
    kwargs = dict(cfg.kwargs)
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    return kwargs


def env_id(cfg: EnvConfig) -> str:
    """The registered id of `cfg.id`, its module imported first (`module:EnvId`, and ale_py for ALE/)."""
    module, _, name = cfg.id.rpartition(":")
    if not module and name.startswith("ALE/"):
        module = "ale_py"
    if module:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            extra = ' (the atari extra: pip install -e ".[atari]")' if module == "ale_py" else ""
            raise ConfigError("env.id", cfg.id, f"needs the module {module}, which does not import{extra}: {e}")
        if module == "ale_py":
            gym.register_envs(mod)
    return name


def spec_of(cfg: EnvConfig) -> gym.envs.registration.EnvSpec:
    try:
        return gym.spec(env_id(cfg))
    except gym.error.Error as e:
        raise ConfigError("env.id", cfg.id, f"not a registered gymnasium env ({str(e).splitlines()[0]})")


def _wrapped(cfg: EnvConfig):
    return lambda env: zero_based(wrap(env, cfg))


def zero_based(env: gym.Env) -> gym.Env:
    """`env` with Discrete action and observation spaces starting at 0 (unchanged if they do)."""
    act, obs = env.action_space, env.observation_space
    if isinstance(act, gym.spaces.Discrete) and act.start != 0:
        env = gym.wrappers.TransformAction(env, lambda a, s=int(act.start): a + s, gym.spaces.Discrete(int(act.n)))
    if isinstance(obs, gym.spaces.Discrete) and obs.start != 0:
        env = gym.wrappers.TransformObservation(env, lambda o, s=int(obs.start): o - s,
                                                gym.spaces.Discrete(int(obs.n)))
    return env


def make_single_env(cfg: EnvConfig, inner: Optional[Callable[[gym.Env], gym.Env]] = None, **extra) -> gym.Env:
    """One env, for space checks and evaluation; a missing extra becomes a one-line config error.
    `inner` wraps the env gymnasium made before p2prl's wrappers do (a video recorder there sees every
    frame of the game itself, not the 84x84 input); `extra` goes to gymnasium.make (render_mode)."""
    spec_of(cfg)
    try:
        env = gym.make(env_id(cfg), **env_kwargs(cfg), **extra)
        return _wrapped(cfg)(inner(env) if inner else env)
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env={cfg.name}", cfg.id, f"needs an extra: {str(e).splitlines()[0]}")
    except (TypeError, KeyError, ValueError) as e:  # gymnasium's own complaint about a keyword
        raise ConfigError("env.kwargs", cfg.kwargs, f"rejected by {cfg.id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def make_vec_env(cfg: EnvConfig, num_envs: int, seed: int) -> tuple[gym.vector.VectorEnv, np.ndarray]:
    """A vector env of `num_envs` copies, reset with seeds seed, seed+1, ...; returns (envs, first obs).

    Uses gymnasium's native vector env where the env has one (CartPole: one numpy step for all envs,
    far faster than stepping Python envs in a loop). Every kind autoresets on the *next* step
    (gymnasium 1.x default), which the samplers rely on.
    """
    spec = spec_of(cfg)
    native = spec.vector_entry_point is not None and cfg.wrapper == "none" and cfg.frame_stack is None
    extra = {} if native else {"wrappers": [_wrapped(cfg)]}
    try:
        envs = gym.make_vec(env_id(cfg), num_envs=num_envs, vectorization_mode="vector_entry_point" if native else "sync",
                            **extra, **env_kwargs(cfg))
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env={cfg.name}", cfg.id, f"needs an extra: {str(e).splitlines()[0]}")
    mode_used = envs.metadata.get("autoreset_mode")
    assert mode_used is None or getattr(mode_used, "value", mode_used) == "NextStep", \
        f"p2prl's samplers expect next-step autoreset, {cfg.id} uses {mode_used}"
    obs, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)
    return envs, obs


# -- checkpoint state ----------------------------------------------------------------------------
# A vector env's state as plain values: every numpy array, number and RNG in the instance dicts of
# its wrapper chain (and, for SyncVectorEnv, of every copy's chain). That is exact for gymnasium's
# native CartPole vector env (state, steps, prev_done: the autoreset flags, np_random) and for the
# classic-control envs (state, TimeLimit's _elapsed_steps, np_random, SyncVectorEnv's
# _autoreset_envs); physics engines (Box2D, MuJoCo) keep state outside Python and resume from their
# RNG states only.

def _layers(env) -> list:
    out = [env]
    while hasattr(out[-1], "env") and len(out) < 32:
        out.append(out[-1].env)
    return out


def _plain(obj) -> dict:
    out = {}
    for k, v in vars(obj).items():
        if isinstance(v, np.random.Generator):
            out[k] = {"rng": v.bit_generator.state}
        elif isinstance(v, np.ndarray) and v.dtype.kind in "biufc":  # not maps of bytes (FrozenLake's desc)
            out[k] = {"array": torch.from_numpy(v.copy())}
        elif isinstance(v, np.generic):
            out[k] = v.item()
        elif isinstance(v, (bool, int, float)) or v is None:
            out[k] = v
    return out


def _load_plain(obj, state: dict) -> None:
    for k, v in state.items():
        current = vars(obj).get(k)
        if isinstance(v, dict) and "rng" in v:
            if isinstance(current, np.random.Generator):
                current.bit_generator.state = v["rng"]
        elif isinstance(v, dict) and "array" in v:
            setattr(obj, k, v["array"].numpy().copy())  # the saved dtype: it can differ from a fresh env's
        else:
            setattr(obj, k, v)


def vec_env_state(envs: gym.vector.VectorEnv) -> dict:
    """This peer's env state as tensors and plain values (loadable with weights_only)."""
    state = {"layers": [_plain(layer) for layer in _layers(envs)],
             "action_space": _plain(envs.action_space)}
    copies = getattr(envs.unwrapped, "envs", None)
    if copies is not None:
        state["copies"] = [[_plain(layer) for layer in _layers(e)] for e in copies]
    return state


def restorable(envs: gym.vector.VectorEnv) -> bool:
    """Whether `vec_env_state` holds all of the envs' state: not where an emulator (ALE) or frame
    queues (FrameStackObservation) keep theirs outside plain values."""
    for env in (getattr(envs.unwrapped, "envs", None) or [])[:1]:
        for layer in _layers(env):
            if isinstance(layer, (gym.wrappers.FrameStackObservation, gym.wrappers.AtariPreprocessing)):
                return False
    return True


def stack_size(envs: gym.vector.VectorEnv) -> int:
    """k of the FrameStackObservation(k) in each copy's wrapper chain (1 without one, or when the
    copies live in other processes)."""
    for env in (getattr(envs.unwrapped, "envs", None) or [])[:1]:
        for layer in _layers(env):
            if isinstance(layer, gym.wrappers.FrameStackObservation):
                return int(layer.stack_size)
    return 1


def load_vec_env_state(envs: gym.vector.VectorEnv, state: dict) -> None:
    for layer, s in zip(_layers(envs), state["layers"]):
        _load_plain(layer, s)
    _load_plain(envs.action_space, state["action_space"])
    for env, layers in zip(getattr(envs.unwrapped, "envs", None) or [], state.get("copies", [])):
        for layer, s in zip(_layers(env), layers):
            _load_plain(layer, s)
