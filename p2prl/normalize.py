"""Count-weighted running mean/variance and the parallel-variance merge (across peers: `p2prl.sync.stats`)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch



class Moments(NamedTuple):
    """Statistics of a set of vectors: count, mean (D,), and M2 (D,) = sum of squared deviations."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def moments_of(x: torch.Tensor) -> Moments:
    """Moments of x: (B, *shape), in float64."""
    x = x.reshape(x.shape[0], int(np.prod(x.shape[1:]))).to(torch.float64)
    mean = x.mean(0) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64)
    return Moments(torch.tensor(float(x.shape[0]), dtype=torch.float64), mean, ((x - mean) ** 2).sum(0))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two sets (Chan et al.'s parallel algorithm); works on tensors and arrays."""
    n = a.count + b.count
    if float(n) == 0.0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta ** 2 * (a.count * b.count / n)
    return Moments(n, mean, m2)


def _empty(d: int) -> Moments:
    return Moments(np.float64(0.0), np.zeros(d), np.zeros(d))


class RunningNormalizer:
    """Normalizes inputs with running statistics, as SB3's VecNormalize does, over all peers.

    Statistics are used only after they have seen data: `observe` folds each new batch in before
    `__call__` normalizes it. Between merges a peer normalizes with the statistics every peer shares
    plus what it observed itself since (`pending()`); `update` folds the peers' merged pending
    moments (`p2prl.sync.stats.global_moments`) into the shared statistics, identically on every peer.
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8,
                 center: bool = True) -> None:
        self.d = int(np.prod(shape))
        self.shape, self.clip, self.eps, self.center = shape, clip, eps, center
        self.stats = Moments(torch.tensor(0.0, dtype=torch.float64), torch.zeros(self.d, dtype=torch.float64),
                             torch.zeros(self.d, dtype=torch.float64))
        self._shared = _empty(self.d)  # numpy copy of self.stats, for the per-step merge
        self._pending = _empty(self.d)
        self._refresh(self._shared)

    def _refresh(self, m: Moments) -> None:
        # Runs every env step: float32 copies made by numpy and wrapped, which costs a fraction of
        # torch.as_tensor's conversion (the same rounding).
        n = float(m.count)
        var = m.m2 / n if n > 0 else np.ones(self.d)
        self.mean = torch.from_numpy(m.mean.astype(np.float32).reshape(self.shape))
        self.std = torch.from_numpy(np.sqrt(var + self.eps).astype(np.float32).reshape(self.shape))

    def observe(self, x: torch.Tensor | np.ndarray) -> None:
        """Fold a batch (B, *shape) seen by this peer into the statistics used from now on."""
        x = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1, self.d)
        n = len(x)
        if n == 0:
            return
        # x.mean(0) and ((x - mean) ** 2).sum(0) without numpy's Python wrappers (the same sums, the same
        # division): this runs at every env step.
        mean = np.add.reduce(x, 0) / n
        dev = x - mean
        self._pending = merge_moments(self._pending, Moments(np.float64(n), mean, np.add.reduce(dev * dev, 0)))
        self._refresh(merge_moments(self._shared, self._pending))

    def pending(self) -> Moments:
        """What this peer observed since the last `update`, as float64 tensors."""
        c, m, m2 = self._pending
        return Moments(torch.tensor(float(c), dtype=torch.float64), torch.from_numpy(np.array(m)),
                       torch.from_numpy(np.array(m2)))

    def update(self, merged: Moments) -> None:
        """Fold every peer's merged pending moments into the shared statistics (on every peer alike)."""
        self.stats = merge_moments(self.stats, merged)
        self._set_shared()

    def _set_shared(self) -> None:
        self._shared = Moments(np.float64(float(self.stats.count)), self.stats.mean.numpy().copy(),
                               self.stats.m2.numpy().copy())
        self._pending = _empty(self.d)
        self._refresh(self._shared)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.mean) / self.std if self.center else x / self.std
        return y.clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"count": self.stats.count, "mean": self.stats.mean, "m2": self.stats.m2}

    def load_state_dict(self, state: dict) -> None:
        self.stats = Moments(state["count"], state["mean"], state["m2"])
        self._set_shared()

    @classmethod
    def saved(cls, shape: tuple[int, ...], state: dict | None) -> "RunningNormalizer | None":
        """The normalizer a checkpoint saved (`state_dict()`), or None where it saved none."""
        if state is None:
            return None
        norm = cls(shape)
        norm.load_state_dict(state)
        return norm


class ReturnScaler:
    """norm_reward, as SB3's VecNormalize: rewards divided by the running std of each env's discounted
    return, whose statistics include the current step; `clip` (or None) bounds the result.

    `norm` holds the statistics, merged over the peers like any `RunningNormalizer`'s; `returns` (N,),
    each env's discounted return under way, is this peer's own (reset where an episode ends).
    """

    def __init__(self, num_envs: int, gamma: float, clip: float | None) -> None:
        self.norm = RunningNormalizer((1,), center=False)
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.gamma, self.clip = gamma, clip

    def __call__(self, reward: np.ndarray, valid: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Scaled rewards (N,) float32 from rewards (N,) float64; `valid`, `done`: (N,) bool."""
        self.returns = self.returns * self.gamma + reward
        self.norm.observe(self.returns[valid, None])
        scaled = reward / self.norm.std.item()
        self.returns[done] = 0.0
        return (scaled if self.clip is None else np.clip(scaled, -self.clip, self.clip)).astype(np.float32)
