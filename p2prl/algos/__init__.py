"""Algorithms, built by `algo.name`. Each exposes iteration(progress) -> IterationResult."""
from __future__ import annotations

from typing import NamedTuple

from p2prl.metrics import Episode


class IterationResult(NamedTuple):
    """What one iteration of an algorithm did on this peer."""

    steps: int  # local env steps (num_envs x vector steps)
    episodes: list[Episode]  # episodes that finished during the iteration
    logs: dict  # scalars for metrics.jsonl (already averaged over peers where it matters)
