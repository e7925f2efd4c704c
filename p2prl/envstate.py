"""A vector env's state for checkpoints, as plain values (loadable with weights_only), and what it covers.

Every numpy array, number and RNG in the instance dicts of the env's wrapper chain (and, for
SyncVectorEnv, of every copy's chain), and MuJoCo's physics (`_mujoco_state`). That is exact for
gymnasium's native CartPole vector env (state, steps, prev_done: the autoreset flags, np_random), the
classic-control envs (state, TimeLimit's _elapsed_steps, np_random, SyncVectorEnv's _autoreset_envs)
and the MuJoCo envs. `restorable` says where state lives elsewhere (Box2D's worlds, worker processes,
an emulator): there a resume must start fresh episodes, or its first steps would splice two. Those
fresh episodes continue the run's random stream: `copy_rngs` saves every copy's generator (also in
AsyncVectorEnv's workers), `load_copy_rngs` puts it back before a reset without a seed.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch

# What mj_step leaves computed from the state before its last integration, one substep behind the
# integration state: gymnasium's Ant and Humanoid read body positions from them before their next step
# (mj_forward after mj_setState would compute them from the restored state: not the uninterrupted
# run's values). The step itself recomputes every derived quantity from the integration state.
_MJ_DERIVED = ("xpos", "xquat", "xmat", "xipos", "ximat", "xanchor", "xaxis", "geom_xpos", "geom_xmat",
               "site_xpos", "site_xmat", "subtree_com", "cinert", "cdof", "cvel", "cdof_dot", "cacc",
               "cfrc_int", "cfrc_ext", "qfrc_actuator", "actuator_force", "sensordata")


def _layers(env) -> list:
    out = [env]
    while hasattr(out[-1], "env") and len(out) < 32:
        out.append(out[-1].env)
    return out


def _is(v: Any, package: str, name: str = "") -> bool:
    """Whether v is an object of a package's (and of class `name`), without importing the package."""
    return type(v).__module__.split(".")[0] == package and type(v).__name__.startswith(name)


def _mj_model(obj):
    """The MjModel beside an MjData (MujocoEnv's `model`) and the state signature saved."""
    import mujoco
    return next(m for m in vars(obj).values() if _is(m, "mujoco", "MjModel")), int(mujoco.mjtState.mjSTATE_INTEGRATION)


def _mujoco_state(obj, data) -> dict:
    """The full integration state of `data` (an MjData beside its MjModel in `obj`: time, qpos, qvel,
    act, the solver's warm start, ctrl, applied forces, mocap...; `set_state(qpos, qvel)` alone would
    not resume exactly) and the derived quantities that `_MJ_DERIVED` lists."""
    import mujoco
    model, sig = _mj_model(obj)
    state = np.empty(mujoco.mj_stateSize(model, sig))
    mujoco.mj_getState(model, data, state, sig)
    return {"integration": torch.from_numpy(state),
            "derived": {k: torch.from_numpy(getattr(data, k).copy()) for k in _MJ_DERIVED}}


def _load_mujoco_state(obj, data, s: dict) -> None:
    import mujoco
    model, sig = _mj_model(obj)
    state = s["integration"].numpy()
    if len(state) != mujoco.mj_stateSize(model, sig):
        raise ValueError(f"the checkpoint's MuJoCo state has {len(state)} values, mujoco {mujoco.__version__} "
                         f"expects {mujoco.mj_stateSize(model, sig)}: resume with the mujoco the run was saved with")
    mujoco.mj_setState(model, data, state, sig)
    mujoco.mj_forward(model, data)  # what _MJ_DERIVED omits then belongs to this state, not the one reset to
    for k, v in s["derived"].items():
        getattr(data, k)[...] = v.numpy()


def _plain(obj) -> dict:
    out = {}
    for k, v in vars(obj).items():
        if _is(v, "mujoco", "MjData"):
            out[k] = {"mujoco": _mujoco_state(obj, v)}
        elif isinstance(v, np.random.Generator):
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
        elif isinstance(v, dict) and "mujoco" in v:
            _load_mujoco_state(obj, current, v["mujoco"])
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


def not_restorable(envs: gym.vector.VectorEnv) -> Optional[str]:
    """Why `vec_env_state` does not hold all of the envs' state (None: it does)."""
    if not _in_process(envs):
        return "their copies live in worker processes (env.vectorization=async) or EnvPool"
    layers = _copy_layers(envs)
    if any(isinstance(x, (gym.wrappers.FrameStackObservation, gym.wrappers.AtariPreprocessing)) for x in layers):
        return "an emulator or frame queues hold part of it"
    # Box2D's worlds (LunarLander, BipedalWalker, CarRacing) cannot be saved; restoring the rest onto a
    # freshly reset world would splice two episodes (LunarLander's shaping reward across them).
    if any(_is(v, "Box2D") for x in layers for v in vars(x).values()):
        return "their physics is a Box2D world, which cannot be saved"
    return None


def restorable(envs: gym.vector.VectorEnv) -> bool:
    """Whether `vec_env_state` holds all of the envs' state, so that they resume their episodes exactly."""
    return not_restorable(envs) is None


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


def copy_rngs(envs: gym.vector.VectorEnv) -> Optional[list]:
    """Every copy's numpy generator state (`np_random`), wherever the copy lives; None where the vector
    env cannot say (EnvPool, whose C++ envs keep their own)."""
    get_attr = getattr(envs, "get_attr", None)
    if get_attr is None or not (_in_process(envs) or isinstance(envs.unwrapped, gym.vector.AsyncVectorEnv)):
        return None
    return [g.bit_generator.state for g in get_attr("np_random")]


def load_copy_rngs(envs: gym.vector.VectorEnv, states: list) -> None:
    """Give every copy the generator state `copy_rngs` saved (a reset without a seed then draws on)."""
    rngs = []
    for state in states:
        g = np.random.Generator(getattr(np.random, state["bit_generator"])())
        g.bit_generator.state = state
        rngs.append(g)
    envs.set_attr("np_random", rngs)
