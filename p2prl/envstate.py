"""A vector env's state for checkpoints, as plain values (loadable with weights_only), and what it covers.

Every numpy array, number and RNG in the instance dicts of the env's wrapper chain (and, for
SyncVectorEnv, of every copy's chain). That is exact for gymnasium's native CartPole vector env (state,
steps, prev_done: the autoreset flags, np_random) and for the classic-control envs (state, TimeLimit's
_elapsed_steps, np_random, SyncVectorEnv's _autoreset_envs); physics engines (Box2D, MuJoCo) keep state
outside Python and resume from their RNG states only; `restorable` says where state lives elsewhere.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch


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


def _in_process(envs: gym.vector.VectorEnv) -> bool:
    """Whether the copies' state lives in this process (not in AsyncVectorEnv's workers, nor in EnvPool's C++)."""
    u = envs.unwrapped  # EnvPool's classes are made by a metaclass in `abc`: their bases say whose they are
    return not isinstance(u, gym.vector.AsyncVectorEnv) and not any(
        c.__module__.startswith("envpool.") for c in type(u).__mro__)


def _copy_layers(envs: gym.vector.VectorEnv) -> list:
    """The wrapper chain of one copy: a SyncVectorEnv's first; for an AsyncVectorEnv, whose copies live
    in its workers, that of a copy built here from the same function; none for a native vector env
    (CartPole's) or EnvPool. `restorable` and `stack_size` both read it."""
    u = envs.unwrapped
    if isinstance(u, gym.vector.SyncVectorEnv):
        return _layers(u.envs[0])
    if isinstance(u, gym.vector.AsyncVectorEnv):
        probe = u.env_fns[0]()
        probe.close()
        return _layers(probe)
    return []


def restorable(envs: gym.vector.VectorEnv) -> bool:
    """Whether `vec_env_state` holds all of the envs' state: not where worker processes (async), EnvPool,
    an emulator (ALE) or frame queues (FrameStackObservation) keep theirs outside plain values here."""
    stateful = (gym.wrappers.FrameStackObservation, gym.wrappers.AtariPreprocessing)
    return _in_process(envs) and not any(isinstance(layer, stateful) for layer in _copy_layers(envs))


def stack_size(envs: gym.vector.VectorEnv) -> int:
    """k of the FrameStackObservation(k) in each copy's wrapper chain (1 without one)."""
    stacks = [layer for layer in _copy_layers(envs) if isinstance(layer, gym.wrappers.FrameStackObservation)]
    return int(stacks[0].stack_size) if stacks else 1


def load_vec_env_state(envs: gym.vector.VectorEnv, state: dict) -> None:
    assert _in_process(envs), "the copies' state lives outside this process: check `restorable` first"
    for layer, s in zip(_layers(envs), state["layers"]):
        _load_plain(layer, s)
    _load_plain(envs.action_space, state["action_space"])
    for env, layers in zip(getattr(envs.unwrapped, "envs", None) or [], state.get("copies", [])):
        for layer, s in zip(_layers(env), layers):
            _load_plain(layer, s)
