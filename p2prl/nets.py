"""Networks: an MLP actor-critic (discrete or diagonal-Gaussian actions) and an MLP Q-network."""
from __future__ import annotations

import math
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

# Argument validation costs more than the math for small batches; inputs are ours.
Distribution.set_default_validate_args(False)

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "tanh",
        out_gain: float = 1.0) -> nn.Sequential:
    """MLP with orthogonal init (sqrt(2) on hidden layers, `out_gain` on the output layer)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [_init(nn.Linear(d, h), math.sqrt(2)), ACTIVATIONS[activation]()]
        d = h
    layers.append(_init(nn.Linear(d, out_dim), out_gain))
    return nn.Sequential(*layers)


def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def flat_dim(space: gym.Space) -> int:
    return int(np.prod(space.shape))


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs. obs: (B, obs_dim) -> distribution over actions, values (B,)."""

    def __init__(self, obs_space: gym.Space, action_space: gym.Space, hidden: Sequence[int],
                 activation: str) -> None:
        super().__init__()
        obs_dim = flat_dim(obs_space)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.critic = mlp(obs_dim, hidden, 1, activation, out_gain=1.0)
        n_out = int(action_space.n) if self.discrete else flat_dim(action_space)
        self.actor = mlp(obs_dim, hidden, n_out, activation, out_gain=0.01)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.zeros(n_out))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def dist(self, obs: torch.Tensor) -> Distribution:
        out = self.actor(obs)
        if self.discrete:
            return Categorical(logits=out)
        return Normal(out, self.log_std.exp().expand_as(out))

    def log_prob(self, dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        lp = dist.log_prob(actions)
        return lp if self.discrete else lp.sum(-1)

    def entropy(self, dist: Distribution) -> torch.Tensor:
        e = dist.entropy()
        return e if self.discrete else e.sum(-1)

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample actions: (actions, log_probs (B,), values (B,))."""
        d = self.dist(obs)
        a = d.sample()
        return a, self.log_prob(d, a), self.value(obs)


class QNetwork(nn.Module):
    """obs: (B, obs_dim) -> Q-values (B, n_actions)."""

    def __init__(self, obs_space: gym.Space, n_actions: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.net = mlp(flat_dim(obs_space), hidden, n_actions, activation, out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)
