"""The algorithm registry: one table, name -> what the rest of p2prl needs to know of an algorithm.

config (the `algo` section's schema, the keys added to it since runs were saved), precheck (the spaces
and observations it accepts), resume (the keys a resume may not change, those that restart each
rank's own state), the runner (how to build it), p2prl.policy (a checkpoint's policy, for evaluate, the
evaluation during training and `p2prl.load`) and p2prl.export (the greedy policy as a torch module)
read this table; nothing else branches on an algorithm's name. Adding one is its file (a config
dataclass, an `Algorithm` subclass that steps envs through its collector, a policy function, for a
network its greedy module) plus `register(...)` or a line in REGISTRY, and its conf/algo/<name>.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import gymnasium as gym
import torch
from torch import nn

from p2prl.algos.base import ActFn, Algorithm, Peer
from p2prl.algos.dqn import DQN, DQNConfig
from p2prl.algos.dqn import policy as dqn_policy
from p2prl.algos.greedy import dqn_greedy, ppo_greedy
from p2prl.algos.ppo import PPO, PPOConfig
from p2prl.algos.ppo import policy as ppo_policy
from p2prl.algos.qlearning import QLearning, QLearningConfig
from p2prl.algos.offpolicy import check_bounds, check_comm
from p2prl.algos.qlearning import policy as qlearning_policy
from p2prl.algos import sac, td3
from p2prl.checks import ConfigError
from p2prl.collect import Collector
from p2prl.nets import resolve_encoder
from p2prl.sync import table as sync

Box, Discrete = gym.spaces.Box, gym.spaces.Discrete


@dataclass(frozen=True)
class AlgorithmSpec:
    config: type  # the dataclass of its `algo` section (fields = the keys of conf/algo/<name>.yaml)
    build: Callable[[Any, Collector, Peer], Algorithm]  # (algo cfg, this peer's collector, peer)
    observations: tuple[type, ...]  # the gymnasium observation spaces it accepts
    actions: tuple[type, ...]  # and action spaces
    # (algo cfg, shared state, obs space, action space, device) -> its policy on a batch (base.ActFn)
    policy: Callable[[Any, dict, gym.Space, gym.Space, torch.device], ActFn]
    # algo.* keys that fix what a checkpoint holds (shapes, optimizer state): a resume may not change them.
    fixed_on_resume: tuple[str, ...]
    hint: str  # appended to a refusal of the env's spaces
    # algo.* keys whose change restarts each rank's own state on resume (its envs, windows, replay); the
    # shared state carries over. Every algorithm steps algo.num_envs envs per peer.
    rank_keys: tuple[str, ...] = ("num_envs",)
    # Keys added to its `algo` section after runs were saved, with the value that behaves as those runs
    # did: a saved config without them means that value (p2prl.config.upgrade).
    added_keys: Mapping[str, Any] = field(default_factory=dict)
    # (algo cfg, obs space) -> whether its encoder is the CNN (image work, for the device choice); raises
    # ConfigError for settings the observations refuse. Default: no encoder to check.
    check_observations: Callable[[Any, gym.Space], bool] = lambda algo, space: False
    # (algo cfg, action space) -> None; raises ConfigError for actions it cannot take beyond their type
    # (SAC, TD3: infinite bounds). Default: none.
    check_actions: Callable[[Any, gym.Space], None] = lambda algo, space: None
    # (algo cfg, comm cfg) -> None; raises ConfigError for sharing settings its updates cannot take
    # (SAC, TD3: updates in two parts cannot overlap). Default: none.
    check_comm: Callable[[Any, Any], None] = lambda algo, comm: None
    # True: it sums exact tables itself instead of gradients, so only strategies that serve tables fit
    # (p2prl.sync.base.Strategy.tables).
    tables: bool = False
    stragglers: bool = False  # whether it can cut a rollout short (comm.straggler_frac)
    # (algo cfg, shared state, obs space, action space) -> its greedy policy as a module, obs (B, *obs_shape)
    # -> actions (p2prl.algos.greedy), for `p2prl export --format onnx|pt2`; None: no network to export
    greedy_module: Optional[Callable[[Any, dict, gym.Space, gym.Space], nn.Module]] = None


def _encoder(algo: Any, space: gym.Space) -> bool:
    """`algo.encoder` against the observations: whether it is the CNN."""
    return resolve_encoder(algo.encoder, space) == "cnn"


def _normalized_encoder(algo: Any, space: gym.Space) -> bool:
    """`_encoder`, for an algorithm that may also normalize observations (`algo.norm_obs`)."""
    cnn = _encoder(algo, space)
    if cnn and algo.norm_obs:
        raise ConfigError("algo.norm_obs", True, "does not apply to image observations (the CNN scales pixels "
                                                 "to [0, 1] itself); allowed here: false")
    return cnn


_PPO = AlgorithmSpec(PPOConfig, PPO, (Box,), (Discrete, Box), ppo_policy,
                     ("hidden_sizes", "activation", "encoder", "norm_obs", "norm_reward", "optimizer"), "",
                     rank_keys=("num_envs",), added_keys={"encoder": "mlp", "clip_reward": None, "log_std_init": 0.0},
                     check_observations=_normalized_encoder, stragglers=True, greedy_module=ppo_greedy)
REGISTRY: dict[str, AlgorithmSpec] = {
    "ppo": _PPO,
    "a2c": _PPO,  # PPO's code with one epoch, one minibatch and no clipping (conf/algo/a2c.yaml)
    "dqn": AlgorithmSpec(DQNConfig, DQN, (Box,), (Discrete,), dqn_policy, ("hidden_sizes", "activation", "encoder"),
                         "; use algo=ppo", rank_keys=("num_envs", "n_step"), added_keys={"encoder": "mlp"},
                         check_observations=_encoder, greedy_module=dqn_greedy),
    # Continuous control: tanh-squashed actions in the Box's (finite) bounds.
    # Runs saved before algo.actor_after_critics stepped all three in one all-reduce.
    "sac": AlgorithmSpec(sac.SACConfig, sac.SAC, (Box,), (Box,), sac.policy,
                         ("hidden_sizes", "activation", "autotune", "actor_after_critics"),
                         "; use algo=ppo or algo=dqn", added_keys={"actor_after_critics": False},
                         check_actions=check_bounds, check_comm=check_comm, greedy_module=sac.greedy_module),
    "td3": AlgorithmSpec(td3.TD3Config, td3.TD3, (Box,), (Box,), td3.policy, ("hidden_sizes", "activation"),
                         "; use algo=ppo or algo=dqn", added_keys={"actor_after_critics": False},
                         check_actions=check_bounds, check_comm=check_comm, greedy_module=td3.greedy_module),
    # Exact tabular Q-learning sums its own table's TD errors: no gradient for a strategy to share.
    "qlearning": AlgorithmSpec(QLearningConfig, QLearning, (Discrete,), (Discrete,), qlearning_policy, (), "",
                               rank_keys=("num_envs",), tables=True),
}


def register(name: str, spec: AlgorithmSpec) -> None:
    """Add (or replace) an algorithm; `algo=<name>` then needs conf/algo/<name>.yaml, or
    `algo.name=<name>` with its keys."""
    REGISTRY[name] = spec


def spec(name: str) -> AlgorithmSpec:
    if name not in REGISTRY:
        raise ConfigError("algo.name", name, f"allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def algo_sections() -> dict[str, type]:
    """Each algorithm's `algo` section dataclass, by name (for p2prl.config.build_config)."""
    return {name: s.config for name, s in REGISTRY.items()}


def added_keys() -> dict[str, Mapping[str, Any]]:
    """Each algorithm's keys added since runs were saved, by name (for p2prl.config.upgrade)."""
    return {name: s.added_keys for name, s in REGISTRY.items()}


def check_strategy(name: str, strategy: str, straggler_frac, compress: str = "none") -> None:
    """Refuse an algorithm/strategy pair (or straggler preemption, or a compression) that cannot work."""
    if spec(name).tables and not sync.strategy(strategy).tables:
        allowed = [s for s, cls in sync.STRATEGIES.items() if cls.tables]
        raise ConfigError("comm", strategy, f"algo={name} cannot share its updates this way; allowed: "
                                            f"{', '.join(allowed)}")
    if spec(name).tables and compress != "none":  # its exact tables would stop being exact
        raise ConfigError("comm.compress", compress, f"algo={name} sums exact tables, not gradients; allowed: none")
    if straggler_frac is not None and not spec(name).stragglers:
        raise ConfigError("comm.straggler_frac", straggler_frac, f"algo={name} does not collect rollouts that "
                                                                 "could be cut short; allowed: null")


def check_spaces(name: str, obs_space: gym.Space, action_space: gym.Space) -> None:
    """Refuse an algorithm/env pair that cannot work, before any training starts."""
    s = spec(name)
    for what, space, allowed in (("observations", obs_space, s.observations), ("actions", action_space, s.actions)):
        if not isinstance(space, allowed):
            kinds = " or ".join(k.__name__ for k in allowed)
            raise ConfigError("algo", name, f"needs {kinds} {what}, the env has {space}{s.hint}")


__all__ = ["ActFn", "Algorithm", "AlgorithmSpec", "Peer", "REGISTRY", "added_keys", "algo_sections",
           "check_spaces", "check_strategy", "register", "spec"]
