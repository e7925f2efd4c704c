"""Networks: an actor-critic (discrete or diagonal-Gaussian actions) and a Q-network, each on an encoder
(an MLP of the flattened observation, or the Nature CNN for images: `algo.encoder`); for SAC and TD3,
twin Q critics of (observation, action) and the squashed-Gaussian and deterministic actors, whose
actions lie in [-1, 1] (scaled to the env's bounds outside). A little over 250 lines: every network
shares the one MLP builder and its initialization, which a split would import across files."""
from __future__ import annotations

import math
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, Normal

# Argument validation costs more than the math for small batches; inputs are ours.
Distribution.set_default_validate_args(False)

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
_FUNCTIONAL = {nn.Tanh: torch.tanh, nn.ReLU: F.relu}  # what each activation module's forward calls


class MLP(nn.Sequential):
    """Linear and activation layers (an nn.Sequential: the same parameters and state_dict keys) whose
    forward calls the layers' functional ops directly: the same ops, so the same results bit for bit,
    without nn.Module's per-call dispatch, which costs more than the math at the few rows a sampler
    feeds per env step (a 17-256-256-6 MLP on one row: 43 us through the modules, 16 us direct)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = F.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else _FUNCTIONAL[type(layer)](x)
        return x


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "tanh",
        out_gain: float = 1.0, orthogonal: bool = True) -> MLP:
    """MLP with orthogonal init (sqrt(2) on hidden layers, `out_gain` on the output layer), or with
    torch's default init (`orthogonal=False`: SB3's and CleanRL's SAC and TD3 networks)."""
    layers = trunk(in_dim, hidden, activation, orthogonal)
    last = nn.Linear(hidden[-1] if hidden else in_dim, out_dim)
    layers.append(_init(last, out_gain) if orthogonal else last)
    return layers


def trunk(in_dim: int, hidden: Sequence[int], activation: str, orthogonal: bool = True) -> MLP:
    """The hidden layers of `mlp`, each followed by its activation."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [_init(nn.Linear(d, h), math.sqrt(2)) if orthogonal else nn.Linear(d, h), ACTIVATIONS[activation]()]
        d = h
    return MLP(*layers)


def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def flat_dim(space: gym.Space) -> int:
    return int(np.prod(space.shape))


ENCODERS = ("auto", "mlp", "cnn")


def is_image(space: gym.Space) -> bool:
    """An image observation: a uint8 Box of height x width x channels, or stacked channels x H x W."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


MIN_SIDE = 36  # the Nature CNN's kernels and strides need frames of at least 36x36


def _frame_size(shape: Sequence[int]) -> tuple[int, int]:
    return (shape[0], shape[1]) if shape[-1] < shape[0] else (shape[1], shape[2])


def resolve_encoder(choice: str, space: gym.Space) -> str:
    """`algo.encoder`: auto is cnn for image observations of at least 36x36, mlp (flattening) for any
    other Box."""
    from p2prl.checks import ConfigError
    image = is_image(space)
    fits = image and min(_frame_size(space.shape)) >= MIN_SIDE
    if choice == "auto":
        return "cnn" if fits else "mlp"
    if choice == "cnn" and not image:
        raise ConfigError("algo.encoder", choice, f"needs uint8 image observations (HxWxC or CxHxW), the env has "
                                                  f"{space}; allowed: auto, mlp")
    if choice == "cnn" and not fits:
        h, w = _frame_size(space.shape)
        raise ConfigError("algo.encoder", choice, f"the Nature CNN needs frames of at least {MIN_SIDE}x{MIN_SIDE}, "
                                                  f"the env's are {h}x{w}; allowed: auto, mlp")
    return choice


class NatureCNN(nn.Module):
    """The Nature-DQN encoder: pixels (uint8, or floats in 0..255) -> 512 features, scaled to [0, 1]
    inside. Takes channels-first (C, H, W: stacked frames) or channels-last (H, W, C) observations: the
    smaller of the first and last dimensions is the channels."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.channels_last = shape[-1] < shape[0]
        c, h, w = (shape[2], shape[0], shape[1]) if self.channels_last else shape
        g = math.sqrt(2)
        self.conv = nn.Sequential(_init(nn.Conv2d(c, 32, 8, stride=4), g), nn.ReLU(),
                                  _init(nn.Conv2d(32, 64, 4, stride=2), g), nn.ReLU(),
                                  _init(nn.Conv2d(64, 64, 3, stride=1), g), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.conv(torch.zeros(1, c, h, w)).shape[1]
        self.fc = nn.Sequential(_init(nn.Linear(n, 512), g), nn.ReLU())
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) or (B, H, W, C) pixels -> (B, 512)."""
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # a view with channels-last strides: no copy
        # The convolutions run on channels-last (NHWC) floats: oneDNN's CPU kernels train about 1.5x
        # faster on them than on NCHW (the backward most), whatever the weights' layout. The bytes are
        # converted once, in the same pass as the layout; the values stay x.float() * (1 / 255).
        y = x.to(torch.float32, memory_format=torch.channels_last)
        y = y * (1.0 / 255.0) if y is x else y.mul_(1.0 / 255.0)  # never scale the caller's tensor in place
        return self.fc(self.conv(y))


class Encoder(nn.Module):
    """obs (B, *shape) -> features (B, out_dim): the CNN, or the observation flattened for MLPs."""

    def __init__(self, space: gym.Space, kind: str) -> None:
        super().__init__()
        self.cnn = NatureCNN(space.shape) if kind == "cnn" else None
        self.out_dim = self.cnn.out_dim if self.cnn is not None else flat_dim(space)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.cnn(obs) if self.cnn is not None else obs.reshape(obs.shape[0], -1).float()


class ActorCritic(nn.Module):
    """Actor and critic on one encoder's features. MLP encoder: separate actor and critic MLPs on the
    (flattened) observation; CNN: one shared Nature CNN with a linear actor head and a linear critic
    head (as in the Atari PPO of the literature). obs: (B, *shape) -> action distribution, values (B,).
    Continuous actions: a state-independent log standard deviation per dimension, `log_std_init` at first."""

    def __init__(self, obs_space: gym.Space, action_space: gym.Space, hidden: Sequence[int],
                 activation: str, encoder: str = "mlp", log_std_init: float = 0.0) -> None:
        super().__init__()
        self.encoder = Encoder(obs_space, encoder)
        d = self.encoder.out_dim
        heads = [] if encoder == "cnn" else hidden  # the CNN ends in its own 512-unit layer
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.critic = mlp(d, heads, 1, activation, out_gain=1.0)
        n_out = int(action_space.n) if self.discrete else flat_dim(action_space)
        self.actor = mlp(d, heads, n_out, activation, out_gain=0.01)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((n_out,), float(log_std_init)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.encoder(obs)).squeeze(-1)

    def _dist(self, out: torch.Tensor) -> Distribution:
        # No argument validation: it only raises (on NaN parameters, which the learner never applies) and
        # costs more than the small networks' forward at every env step and minibatch.
        if self.discrete:
            return Categorical(logits=out, validate_args=False)
        return Normal(out, self.log_std.exp().expand_as(out), validate_args=False)

    def _heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor's output and the values (B,), the observation encoded once."""
        f = self.encoder(obs)
        return self.actor(f), self.critic(f).squeeze(-1)

    def dist_value(self, obs: torch.Tensor) -> tuple[Distribution, torch.Tensor]:
        """The action distribution and the values."""
        out, v = self._heads(obs)
        return self._dist(out), v

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        """The greedy action: argmax, or the Gaussian's mean."""
        out = self.actor(self.encoder(obs))
        return out.argmax(-1) if self.discrete else out

    def log_prob(self, dist: Distribution, actions: torch.Tensor) -> torch.Tensor:
        lp = dist.log_prob(actions)
        return lp if self.discrete else lp.sum(-1)

    def entropy(self, dist: Distribution) -> torch.Tensor:
        e = dist.entropy()
        return e if self.discrete else e.sum(-1)

    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample actions: (actions, log_probs (B,), values (B,)). Gaussian: the ops (and draws) of
        Normal.sample and Normal.log_prob, without building the distribution at every env step."""
        out, v = self._heads(obs)
        if self.discrete:
            d = self._dist(out)
            a = d.sample()
            return a, d.log_prob(a), v
        scale = self.log_std.exp().expand_as(out)
        with torch.no_grad():
            a = torch.normal(out, scale)
        logp = -((a - out) ** 2) / (2 * scale ** 2) - scale.log() - math.log(math.sqrt(2 * math.pi))
        return a, logp.sum(-1), v


class QNetwork(nn.Module):
    """obs: (B, *shape) -> Q-values (B, n_actions): an MLP, or the Nature CNN and a linear layer."""

    def __init__(self, obs_space: gym.Space, n_actions: int, hidden: Sequence[int], activation: str,
                 encoder: str = "mlp") -> None:
        super().__init__()
        self.encoder = Encoder(obs_space, encoder)
        self.net = mlp(self.encoder.out_dim, [] if encoder == "cnn" else hidden, n_actions, activation, out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(self.encoder(obs))


class TwinQ(nn.Module):
    """Two independent critics: (obs (B, *shape), actions (B, A) in [-1, 1]) -> (q1 (B,), q2 (B,))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, hidden, 1, activation, orthogonal=False)
        self.q2 = mlp(obs_dim + act_dim, hidden, 1, activation, orthogonal=False)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs.reshape(obs.shape[0], -1).float(), actions], 1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def first(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """q1 alone (B,) (TD3's actor follows the first critic)."""
        return self.q1(torch.cat([obs.reshape(obs.shape[0], -1).float(), actions], 1)).squeeze(-1)


class SquashedGaussianActor(nn.Module):
    """SAC's actor: a Gaussian of state-dependent mean and log standard deviation (clamped to
    LOG_STD, as SB3's), squashed by tanh. `forward(obs)` (B, *shape) -> the greedy action tanh(mean),
    (B, A); `sample(obs, noise)` -> (tanh(mean + std * noise) (B, A), its log-probability (B,))."""

    LOG_STD = (-20.0, 2.0)
    TANH_EPS = 1e-6  # keeps log(1 - tanh^2) finite where tanh saturates (SB3's and CleanRL's epsilon)

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.trunk = trunk(obs_dim, hidden, activation, orthogonal=False)
        d = hidden[-1] if hidden else obs_dim
        self.mean = nn.Linear(d, act_dim)
        self.log_std = nn.Linear(d, act_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mean(self.trunk(obs.reshape(obs.shape[0], -1).float())))

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """noise: (B, A) standard normal draws (the caller's stream: a peer's own, or a test's)."""
        f = self.trunk(obs.reshape(obs.shape[0], -1).float())
        log_std = self.log_std(f).clamp(*self.LOG_STD)
        action = torch.tanh(self.mean(f) + log_std.exp() * noise)
        # log N(u; mean, std) at u = mean + std * noise, then the change of variables through tanh.
        log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob - torch.log(1 - action.pow(2) + self.TANH_EPS)
        return action, log_prob.sum(-1)


class DeterministicActor(nn.Module):
    """TD3's actor: obs (B, *shape) -> tanh of an MLP's output, (B, A) in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim, activation, orthogonal=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs.reshape(obs.shape[0], -1).float()))
