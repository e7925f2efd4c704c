"""Batches and storage: typed containers, no algorithm math (image replay: `p2prl.frame_replay`)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Rollout(NamedTuple):
    """One peer's rollout of T vector steps over N envs.

    obs: (T, N, *obs_shape) as the policy saw it (normalized if enabled); raw_obs: same, unnormalized (obs
    itself without normalization);
    actions: (T, N, *act_shape); logprobs, values, rewards: (T, N); terminated, dones: (T, N) bool,
    dones = terminated | truncated; valid: (T, N) bool, False on reset steps (next-step autoreset),
    whose transitions cross an episode boundary and are never learned from.
    """

    obs: torch.Tensor
    raw_obs: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    dones: torch.Tensor
    valid: torch.Tensor


def allocate_rollout(T: int, N: int, obs_shape: tuple, act_shape: tuple, act_dtype: torch.dtype,
                     obs_dtype: torch.dtype = torch.float32, raw: bool = True, channels_last: bool = False) -> Rollout:
    """Preallocated rollout storage, reused every iteration (no per-step allocation). Observations
    keep `obs_dtype` (uint8 frames stay bytes); without `raw` (no normalization) raw_obs is obs.
    `channels_last`: obs (T, N, C, H, W) laid out with C innermost, the layout the CNN computes in, so
    that minibatches of it (indexing keeps the strides) reach the convolutions without a transposing copy."""
    f = dict(dtype=torch.float32)
    if channels_last:
        c, h, w = obs_shape
        obs = torch.zeros((T, N, h, w, c), dtype=obs_dtype).permute(0, 1, 4, 2, 3)
    else:
        obs = torch.zeros((T, N, *obs_shape), dtype=obs_dtype)
    return Rollout(
        obs=obs, raw_obs=torch.zeros_like(obs) if raw else obs,
        actions=torch.zeros((T, N, *act_shape), dtype=act_dtype), logprobs=torch.zeros((T, N), **f),
        values=torch.zeros((T, N), **f), rewards=torch.zeros((T, N), **f),
        terminated=torch.zeros((T, N), dtype=torch.bool), dones=torch.zeros((T, N), dtype=torch.bool),
        valid=torch.zeros((T, N), dtype=torch.bool))


class ReplayBatch(NamedTuple):
    """A minibatch of transitions. obs, next_obs: (B, *obs_shape); actions: (B,) int64 (discrete), or
    (B, *action_shape) float32 (continuous, scaled to [-1, 1]); rewards: (B,) (n-step discounted sums);
    discounts: (B,) = gamma**k for the k rewards summed; terminated: (B,)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    discounts: torch.Tensor
    terminated: torch.Tensor


class ReplayBuffer:
    """One peer's own ring buffer of transitions (numpy storage, uniform sampling with its own RNG).

    The sampler hands it observations through `begin` (first observations) and `observe` (each step's
    next observations), which return the keys it then stores transitions by: here the observations
    themselves. `FrameReplay` keys by frame index instead.
    """

    def __init__(self, capacity: int, obs_shape: tuple, rng: np.random.Generator, action_shape: tuple = (),
                 action_dtype: type = np.int64) -> None:
        self.capacity, self.rng = capacity, rng
        self.obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0

    def begin(self, obs: np.ndarray) -> np.ndarray:
        return obs

    def observe(self, next_obs: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return next_obs

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            discounts: np.ndarray, terminated: np.ndarray) -> None:
        """Append B transitions (arrays with a leading B dimension)."""
        n = len(actions)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.discounts[idx], self.terminated[idx] = next_obs, discounts, terminated
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> ReplayBatch:
        assert self.size > 0, "sampling from an empty replay buffer"
        idx = self.rng.integers(0, self.size, size=batch_size)
        return ReplayBatch(*(torch.from_numpy(a[idx]) for a in (
            self.obs, self.actions, self.rewards, self.next_obs, self.discounts, self.terminated)))

    ARRAYS = ("obs", "next_obs", "actions", "rewards", "discounts", "terminated")

    def state_dict(self) -> dict:
        n = self.size
        return {**{k: torch.from_numpy(getattr(self, k)[:n].copy()) for k in self.ARRAYS}, "pos": self.pos, "size": n}

    def load_state_dict(self, s: dict) -> None:
        """A buffer saved with any capacity. Saved slots [0, size) as written: a wrapped ring holds its
        oldest at `pos`. A full one of this capacity keeps every slot where it was (a resumed run then
        samples the slots the uninterrupted one would); otherwise the newest transitions that fit go to
        slots [0, n) oldest first, so that no unwritten slot is ever sampled and adds overwrite the oldest."""
        n, pos = int(s["size"]), int(s["pos"])
        if n == self.capacity:
            keep, self.pos = np.arange(n), pos % n
        else:
            keep = ((pos + np.arange(n)) % max(n, 1))[-self.capacity:]  # oldest first; pos == n: never wrapped
            self.pos = len(keep) % self.capacity
        for k in self.ARRAYS:
            getattr(self, k)[:len(keep)] = s[k].numpy()[keep]
        self.size = len(keep)
