"""Per-peer vector environments: construction and seeding (their state for checkpoints: `p2prl.envstate`).

Discrete spaces that do not start at 0 (`Discrete(n, start=s)`) are shifted to start at 0 before an
algorithm sees them (`zero_based`): algorithms index actions and states from 0.
"""
from __future__ import annotations

import ctypes.util
import functools
import importlib
import importlib.util
import os
import signal
from typing import Callable, Optional

import gymnasium as gym
import numpy as np

from p2prl.checks import ConfigError
from p2prl.config import EnvConfig
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


def _copy(cfg: EnvConfig, inner: Optional[Callable[[gym.Env], gym.Env]] = None, **extra) -> gym.Env:
    env = gym.make(env_id(cfg), **env_kwargs(cfg), **extra)
    return _wrapped(cfg)(inner(env) if inner else env)


GL_LIBRARIES = {"egl": ("EGL", "libegl1"), "osmesa": ("OSMesa", "libosmesa6")}  # MUJOCO_GL -> (library, package)


def gl_problem(entry_point: str) -> Optional[str]:
    """Why a MuJoCo env (by its gymnasium entry point) cannot even be made here: MUJOCO_GL names an
    OpenGL backend whose library is not installed, which fails `import mujoco` itself; or None."""
    backend = os.environ.get("MUJOCO_GL", "").lower()
    if "mujoco" not in str(entry_point) or backend not in GL_LIBRARIES:
        return None
    library, package = GL_LIBRARIES[backend]
    if ctypes.util.find_library(library) is None:
        return (f"needs lib{library}, which is not installed (apt-get install {package}); "
                "allowed: a backend whose library is here, or unset (no MuJoCo videos then)")
    return None


def make_single_env(cfg: EnvConfig, inner: Optional[Callable[[gym.Env], gym.Env]] = None, **extra) -> gym.Env:
    """One env, for space checks and evaluation; a missing extra becomes a one-line config error.
    `inner` wraps the env gymnasium made before p2prl's wrappers do (a video recorder there sees every
    frame of the game itself, not the 84x84 input); `extra` goes to gymnasium.make (render_mode)."""
    gl = gl_problem(spec_of(cfg).entry_point)
    if gl:  # importing mujoco itself fails then, with an AttributeError deep in PyOpenGL
        raise ConfigError("MUJOCO_GL", os.environ["MUJOCO_GL"], gl)
    try:
        return _copy(cfg, inner, **extra)
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env={cfg.name}", cfg.id, f"needs an extra: {str(e).splitlines()[0]}")
    except (TypeError, KeyError, ValueError) as e:  # gymnasium's own complaint about a keyword
        raise ConfigError("env.kwargs", cfg.kwargs, f"rejected by {cfg.id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _worker_copy(cfg: EnvConfig, peer_pid: int) -> gym.Env:
    """A copy built inside an AsyncVectorEnv worker, a fork of the peer (AsyncVectorEnv also builds one
    in the peer itself, to read the spaces). The worker drops the peer's signal handlers, which would
    raise the peer's `Interrupted` in it: it ignores SIGINT (a Ctrl-C reaches the whole process group;
    the peer ends its workers) and dies of SIGTERM."""
    if os.getpid() != peer_pid:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return _copy(cfg)


def envpool_task(cfg: EnvConfig) -> str:
    """EnvPool's name for the env, which must be gymnasium's own (EnvPool's Atari ids preprocess
    differently and are not gymnasium's ALE/ ids): EnvPool installed and the env one of its own."""
    if importlib.util.find_spec("envpool") is None:
        raise ConfigError("env.vectorization", "envpool", "envpool is not installed (pip install envpool); "
                                                         "allowed: sync, async")
    import envpool
    name = cfg.id.rpartition(":")[2]
    if name not in envpool.list_all_envs():
        raise ConfigError("env.vectorization", "envpool", f"EnvPool has no {name}; allowed here: sync, async")
    return name


def _envpool(cfg: EnvConfig, num_envs: int, seed: int) -> gym.vector.VectorEnv:
    """EnvPool's vector env, env i seeded seed + i; its threads run on this peer's cores (they inherit
    the peer's affinity), one per core, at most one per env."""
    task = envpool_task(cfg)
    import envpool
    threads = min(num_envs, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    try:
        return envpool.make_gymnasium(task, num_envs=num_envs, seed=[seed + i for i in range(num_envs)],
                                      num_threads=threads, **env_kwargs(cfg))
    except (TypeError, KeyError, ValueError, AssertionError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("env.kwargs", cfg.kwargs, f"rejected by EnvPool's {task}: {why}")


def check_vectorization(cfg: EnvConfig) -> None:
    """What `env.vectorization=envpool` needs beyond the config: EnvPool, the env among its own, the
    kwargs accepted (a pool of one env is built and closed)."""
    if cfg.vectorization == "envpool":
        _envpool(cfg, 1, 0).close()


def _vector(cfg: EnvConfig, num_envs: int) -> gym.vector.VectorEnv:
    if cfg.vectorization == "async":
        # fork: the workers inherit the peer's imports and env registrations, and its cores (pinned
        # peers keep their workers on their own cores); observations come back through shared memory.
        return gym.vector.AsyncVectorEnv([functools.partial(_worker_copy, cfg, os.getpid())] * num_envs,
                                         shared_memory=True, context="fork")
    native = spec_of(cfg).vector_entry_point is not None and cfg.wrapper == "none" and cfg.frame_stack is None
    extra = {} if native else {"wrappers": [_wrapped(cfg)]}
    return gym.make_vec(env_id(cfg), num_envs=num_envs, vectorization_mode="vector_entry_point" if native else "sync",
                        **extra, **env_kwargs(cfg))


def make_vec_env(cfg: EnvConfig, num_envs: int, seed: int) -> tuple[gym.vector.VectorEnv, np.ndarray]:
    """A vector env of `num_envs` copies, reset with seeds seed, seed+1, ...; returns (envs, first obs).

    `env.vectorization`: sync steps the copies in this process, through gymnasium's native vector env
    where the env has one (CartPole: one numpy step for all envs, far faster than stepping Python envs
    in a loop); async steps each copy in a worker process of its own (AsyncVectorEnv, shared memory);
    envpool in EnvPool's C++ threads. Every kind autoresets on the *next* step (gymnasium 1.x default),
    with the same infos and final observations, which the samplers rely on.
    """
    spec_of(cfg)
    try:
        envs = _envpool(cfg, num_envs, seed) if cfg.vectorization == "envpool" else _vector(cfg, num_envs)
    except gym.error.DependencyNotInstalled as e:
        raise ConfigError(f"env={cfg.name}", cfg.id, f"needs an extra: {str(e).splitlines()[0]}")
    mode_used = envs.metadata.get("autoreset_mode")
    assert mode_used is None or getattr(mode_used, "value", mode_used) == "NextStep", \
        f"p2prl's samplers expect next-step autoreset, {cfg.id} uses {mode_used}"
    # EnvPool seeds its envs when it builds them and ignores reset's seed
    obs, _ = envs.reset() if cfg.vectorization == "envpool" else envs.reset(seed=seed)
    envs.action_space.seed(seed)
    return envs, obs

