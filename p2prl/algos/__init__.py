"""Algorithms, built by `algo.name` (see `p2prl.runner.build_algorithm`).

Every algorithm implements the `Algorithm` protocol below. Its constructor is a collective: it makes
the shared state (network parameters, Q table) identical on every peer by broadcasting rank 0's copy.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from p2prl.metrics import Episode


class IterationResult(NamedTuple):
    """What one iteration of an algorithm did on this peer."""

    steps: int  # local env steps (num_envs x vector steps)
    episodes: list[Episode]  # episodes that finished during the iteration
    logs: dict  # scalars for metrics.jsonl (already averaged over peers where it matters)


class Algorithm(Protocol):
    num_envs: int  # envs per peer: one vector step = num_envs local env steps

    def iteration(self, progress: float) -> IterationResult:
        """Sample and learn for one iteration (a collective); progress in [0, 1] drives schedules."""

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be bit-identical on every peer (checked every comm.check_every)."""

    def state_dict(self) -> dict:
        """Rank 0's checkpoint contents: tensors and plain values only (loaded with weights_only)."""
