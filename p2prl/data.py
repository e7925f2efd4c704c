"""Batches and storage: typed containers, no algorithm math."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Rollout(NamedTuple):
    """One peer's rollout of T vector steps over N envs.

    obs: (T, N, *obs_shape) as the policy saw it (normalized if enabled); raw_obs: same, unnormalized;
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


def allocate_rollout(T: int, N: int, obs_shape: tuple, act_shape: tuple, act_dtype: torch.dtype) -> Rollout:
    """Preallocated rollout storage, reused every iteration (no per-step allocation)."""
    f = dict(dtype=torch.float32)
    return Rollout(
        obs=torch.zeros((T, N, *obs_shape), **f), raw_obs=torch.zeros((T, N, *obs_shape), **f),
        actions=torch.zeros((T, N, *act_shape), dtype=act_dtype), logprobs=torch.zeros((T, N), **f),
        values=torch.zeros((T, N), **f), rewards=torch.zeros((T, N), **f),
        terminated=torch.zeros((T, N), dtype=torch.bool), dones=torch.zeros((T, N), dtype=torch.bool),
        valid=torch.zeros((T, N), dtype=torch.bool))
