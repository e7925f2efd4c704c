"""Typed run configuration, built once from the composed Hydra config and validated there.

Nothing below the runner sees a DictConfig: the entry point turns the composed config into these
dataclasses, and every user-caused mistake surfaces here as a one-line `ConfigError` that names the
key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-caused configuration error; `str()` is the one line shown to the user."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _positive(key: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ConfigError(key, value, f"must be a positive {'integer' if integer else 'number'}")


def _nonneg(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(key, value, "must be a number >= 0")


def _unit(key: str, value: Any, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ConfigError(key, value, f"must be in {'(0, 1]' if low_open else '[0, 1]'}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {', '.join(allowed)}")


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")


def _optional(check, key: str, value: Any) -> None:
    if value is not None:
        check(key, value)


@dataclass
class PPOConfig:
    """PPO, and A2C as its one-epoch, one-minibatch, no-clip setting (see conf/algo/)."""

    name: str = "ppo"
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_envs: int = 4
    num_steps: int = 128
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: Optional[float] = 0.2
    anneal_clip: bool = False
    clip_vloss: bool = True
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: Optional[float] = 0.5
    target_kl: Optional[float] = None
    norm_adv: bool = True
    norm_obs: bool = False
    norm_reward: bool = False
    hidden_sizes: list = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    optimizer: str = "adam"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        p = "algo."
        _positive(p + "lr", self.lr)
        _unit(p + "gamma", self.gamma, low_open=True)
        _unit(p + "gae_lambda", self.gae_lambda)
        for k in ("num_envs", "num_steps", "num_minibatches", "update_epochs"):
            _positive(p + k, getattr(self, k), integer=True)
        batch = self.num_envs * self.num_steps
        if batch % self.num_minibatches:
            raise ConfigError(p + "num_minibatches", self.num_minibatches,
                              f"must divide the per-peer batch algo.num_envs*algo.num_steps={batch}")
        _optional(_positive, p + "clip_coef", self.clip_coef)
        _optional(_positive, p + "max_grad_norm", self.max_grad_norm)
        _optional(_positive, p + "target_kl", self.target_kl)
        _nonneg(p + "vf_coef", self.vf_coef)
        _nonneg(p + "ent_coef", self.ent_coef)
        _positive(p + "eps", self.eps)
        for k in ("anneal_lr", "anneal_clip", "clip_vloss", "norm_adv", "norm_obs", "norm_reward"):
            _bool(p + k, getattr(self, k))
        _check_net(p, self.hidden_sizes, self.activation)
        _choice(p + "optimizer", self.optimizer, ("adam", "rmsprop"))


def _check_net(prefix: str, hidden_sizes: Any, activation: str) -> None:
    if not isinstance(hidden_sizes, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden_sizes):
        raise ConfigError(prefix + "hidden_sizes", hidden_sizes, "must be a list of positive integers")
    _choice(prefix + "activation", activation, ("tanh", "relu"))


@dataclass
class DQNConfig:
    """DQN / double DQN: every peer has its own replay buffer and epsilon; gradients are averaged."""

    name: str = "dqn"
    lr: float = 2.5e-4
    gamma: float = 0.99
    num_envs: int = 1
    buffer_size: int = 50_000
    batch_size: int = 64
    learning_starts: int = 1_000
    train_freq: int = 1
    gradient_steps: int = 1
    target_update_interval: int = 500
    tau: float = 1.0
    double_dqn: bool = True
    n_step: int = 1
    eps_start: float = 1.0
    eps_end: float = 0.05
    exploration_fraction: float = 0.1
    apex_alpha: Optional[float] = None
    max_grad_norm: Optional[float] = 10.0
    hidden_sizes: list = field(default_factory=lambda: [64, 64])
    activation: str = "relu"

    def __post_init__(self) -> None:
        p = "algo."
        _positive(p + "lr", self.lr)
        _unit(p + "gamma", self.gamma, low_open=True)
        for k in ("num_envs", "buffer_size", "batch_size", "train_freq", "gradient_steps",
                  "target_update_interval", "n_step"):
            _positive(p + k, getattr(self, k), integer=True)
        if isinstance(self.learning_starts, bool) or not isinstance(self.learning_starts, int) or self.learning_starts < 0:
            raise ConfigError(p + "learning_starts", self.learning_starts, "must be an integer >= 0")
        _unit(p + "tau", self.tau, low_open=True)
        for k in ("eps_start", "eps_end"):
            _unit(p + k, getattr(self, k))
        _unit(p + "exploration_fraction", self.exploration_fraction)
        _optional(_nonneg, p + "apex_alpha", self.apex_alpha)
        _optional(_positive, p + "max_grad_norm", self.max_grad_norm)
        _bool(p + "double_dqn", self.double_dqn)
        _check_net(p, self.hidden_sizes, self.activation)
        if self.batch_size > self.buffer_size:
            raise ConfigError(p + "batch_size", self.batch_size, f"must be <= algo.buffer_size={self.buffer_size}")


@dataclass
class QLearningConfig:
    """Exact tabular Q-learning: peers sum TD errors and visit counts per (s, a) every sync."""

    name: str = "qlearning"
    alpha: float = 0.5
    alpha_end: float = 0.05
    gamma: float = 0.99
    num_envs: int = 1
    sync: str = "sum"
    sync_every: int = 32
    eps_start: float = 1.0
    eps_end: float = 0.05
    exploration_fraction: float = 0.5
    apex_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        p = "algo."
        _unit(p + "alpha", self.alpha, low_open=True)
        _unit(p + "alpha_end", self.alpha_end, low_open=True)
        _unit(p + "gamma", self.gamma, low_open=True)
        _positive(p + "num_envs", self.num_envs, integer=True)
        _choice(p + "sync", self.sync, ("sum", "average"))
        _positive(p + "sync_every", self.sync_every, integer=True)
        for k in ("eps_start", "eps_end", "exploration_fraction"):
            _unit(p + k, getattr(self, k))
        _optional(_nonneg, p + "apex_alpha", self.apex_alpha)


# The algorithm sections, by `algo.name`.
ALGO_CONFIGS: dict[str, type] = {"ppo": PPOConfig, "a2c": PPOConfig, "dqn": DQNConfig,
                                 "qlearning": QLearningConfig}


@dataclass
class EnvConfig:
    name: str = "cartpole"
    id: str = "CartPole-v1"
    kwargs: dict = field(default_factory=dict)
    max_episode_steps: Optional[int] = None
    target_return: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.kwargs, dict):
            raise ConfigError("env.kwargs", self.kwargs, "must be a mapping of gymnasium.make keyword arguments")
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError("env.id", self.id, "must be a gymnasium env id such as CartPole-v1")
        _optional(lambda k, v: _positive(k, v, integer=True), "env.max_episode_steps", self.max_episode_steps)


@dataclass
class TrainConfig:
    total_steps: int = 100_000
    target_return: Optional[float] = None
    return_window: int = 20
    log_every_steps: int = 2048
    torch_threads: int = 1
    pin_cores: bool = True  # each peer on its own torch_threads cores, when the node has enough
    resume: str = "auto"  # auto | never | a run dir, checkpoints dir or checkpoint file
    max_skipped_updates: int = 100  # consecutive non-finite updates before the run stops

    def __post_init__(self) -> None:
        for k in ("total_steps", "return_window", "log_every_steps", "torch_threads", "max_skipped_updates"):
            _positive("train." + k, getattr(self, k), integer=True)
        _bool("train.pin_cores", self.pin_cores)
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ConfigError("train.resume", self.resume, "allowed: auto, never, or the path of a run dir "
                                                           "or checkpoint")
        if self.target_return is not None and (isinstance(self.target_return, bool) or not isinstance(
                self.target_return, (int, float)) or not math.isfinite(self.target_return)):
            raise ConfigError("train.target_return", self.target_return, "must be a number or null")


@dataclass
class CommConfig:
    strategy: str = "allreduce"
    backend: str = "auto"
    timeout_s: float = 60.0
    check_every: int = 50
    overlap: bool = False

    def __post_init__(self) -> None:
        _bool("comm.overlap", self.overlap)
        _choice("comm.strategy", self.strategy, ("allreduce",))
        _choice("comm.backend", self.backend, ("auto", "gloo", "nccl"))
        _positive("comm.timeout_s", self.timeout_s)
        _positive("comm.check_every", self.check_every, integer=True)


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    keep: int = 2
    replay: bool = False  # DQN: also save every peer's replay buffer

    def __post_init__(self) -> None:
        _optional(lambda k, v: _positive(k, v, integer=True), "checkpoint.every_steps", self.every_steps)
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 2:
            # Rank 0 prunes without waiting for the other ranks' files of the newest set: keeping one
            # more guarantees a complete set survives a crash during a save.
            raise ConfigError("checkpoint.keep", self.keep, "must be an integer >= 2")
        _bool("checkpoint.replay", self.replay)


@dataclass
class RunConfig:
    seed: int
    algo: Any
    env: EnvConfig
    train: TrainConfig
    comm: CommConfig
    checkpoint: CheckpointConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section(cls: type, key: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(key, values, "must be a config section")
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{key}.{k}", values[k], f"unknown key; allowed: {', '.join(sorted(names))}")
    return cls(**values)


def build_config(raw: dict) -> RunConfig:
    """Build and validate the run configuration from the resolved Hydra config (hydra.* removed)."""
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
        # numpy's legacy seeding takes < 2**32, and peers add rank and env offsets to the seed.
        raise ConfigError("seed", seed, "must be an integer in [0, 2**31)")
    algo = raw.get("algo") or {}
    name = algo.get("name") if isinstance(algo, dict) else None
    _choice("algo.name", name, tuple(sorted(ALGO_CONFIGS)))
    return RunConfig(
        seed=seed,
        algo=_section(ALGO_CONFIGS[name], "algo", algo),
        env=_section(EnvConfig, "env", raw.get("env", {})),
        train=_section(TrainConfig, "train", raw.get("train", {})),
        comm=_section(CommConfig, "comm", raw.get("comm", {})),
        checkpoint=_section(CheckpointConfig, "checkpoint", raw.get("checkpoint", {})),
    )
