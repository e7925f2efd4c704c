"""Greedy policies as torch modules, for `p2prl export`: obs (B, *obs_shape) in the env's own dtype ->
actions, with everything between inside the module (the cast to float32, the observation normalization
of the checkpoint, pixels scaled to [0, 1] inside the CNN, the argmax or the action bounds), so that an
exported file needs nothing of p2prl to act.

Each algorithm with a network names its builder in the registry (`AlgorithmSpec.greedy_module`):
(algo cfg, shared state, obs space, action space) -> a `GreedyPolicy` that computes what
`p2prl.load(run).act(obs, deterministic=True)` computes.
"""
from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import torch
from torch import nn

from p2prl.nets import ActorCritic, QNetwork, resolve_encoder
from p2prl.normalize import RunningNormalizer


class ObsNormalization(nn.Module):
    """x (B, *shape) -> ((x - mean) / std) clipped to +-clip, frozen at a normalizer's statistics (the
    float32 mean and std that `RunningNormalizer.__call__` uses, so both round alike)."""

    def __init__(self, norm: RunningNormalizer) -> None:
        super().__init__()
        self.register_buffer("mean", norm.mean.clone() if norm.center else torch.zeros_like(norm.mean))
        self.register_buffer("std", norm.std.clone())
        self.clip = float(norm.clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).clamp(-self.clip, self.clip)


class GreedyPolicy(nn.Module):
    """obs (B, *obs_shape) -> the argmax of `net`'s scores (B,) int64 for Discrete actions, or `net`'s
    action (B, *action_shape) float32 clipped to the Box's bounds."""

    def __init__(self, net: nn.Module, action_space: gym.Space, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.net, self.norm = net, norm if norm is not None else nn.Identity()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        if not self.discrete:
            self.shape = tuple(action_space.shape)
            self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def scores(self, obs: torch.Tensor) -> torch.Tensor:
        """The network's output (B, n_actions or action_dim), before the argmax or the bounds."""
        return self.net(self.norm(obs.to(torch.float32)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.scores(obs)
        if self.discrete:
            return out.argmax(-1)  # ties to the lowest index, as numpy's argmax (and ONNX's ArgMax) take them
        # Max then min, as np.clip does; elementwise bounds, which ONNX's Clip (scalar bounds) cannot take.
        return torch.minimum(torch.maximum(out.reshape(-1, *self.shape), self.low), self.high)


class Scale(nn.Module):
    """Actions in [-1, 1] (B, A) -> the env's Box bounds (float32 low, high), for exported policies."""

    def __init__(self, space: gym.spaces.Box) -> None:
        super().__init__()
        self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32).reshape(-1))
        self.register_buffer("radius", torch.as_tensor((space.high - space.low) / 2, dtype=torch.float32).reshape(-1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.low + (a + 1) * self.radius


def frozen(module: GreedyPolicy) -> GreedyPolicy:
    # Exported as constants: parameters that need no gradient also give numpy-convertible outputs.
    return module.eval().requires_grad_(False)


def ppo_greedy(cfg: Any, state: dict, obs_space: gym.Space, action_space: gym.Space) -> GreedyPolicy:
    """PPO/A2C: the actor's mode (argmax of the logits, or the Gaussian mean clipped to the bounds) on
    observations normalized as in training (`algo.norm_obs`); the critic stays behind."""
    model = ActorCritic(obs_space, action_space, cfg.hidden_sizes, cfg.activation,
                        resolve_encoder(cfg.encoder, obs_space))
    model.load_state_dict(state["model"])
    norm = None
    if "obs_norm" in state:
        stats = RunningNormalizer(obs_space.shape)
        stats.load_state_dict(state["obs_norm"])
        norm = ObsNormalization(stats)
    return frozen(GreedyPolicy(nn.Sequential(model.encoder, model.actor), action_space, norm))


def dqn_greedy(cfg: Any, state: dict, obs_space: gym.Space, action_space: gym.Space) -> GreedyPolicy:
    """DQN: argmax of the online network's Q-values."""
    q = QNetwork(obs_space, int(action_space.n), cfg.hidden_sizes, cfg.activation,
                 resolve_encoder(cfg.encoder, obs_space))
    q.load_state_dict(state["model"])
    return frozen(GreedyPolicy(q, action_space))
