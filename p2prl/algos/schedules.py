"""Schedules driven by training progress in [0, 1], and Ape-X per-peer exploration."""
from __future__ import annotations

from typing import Optional


def linear(start: float, end: float, frac: float) -> float:
    """start -> end as frac goes 0 -> 1 (clipped to [0, 1]); exactly `end` at 1."""
    f = min(max(frac, 0.0), 1.0)
    return (1.0 - f) * start + f * end


def decayed_epsilon(start: float, end: float, fraction: float, progress: float) -> float:
    """Epsilon decayed linearly from start to end over the first `fraction` of training."""
    return linear(start, end, progress / fraction if fraction > 0 else 1.0)


def peer_epsilon(eps: float, rank: int, world_size: int, apex_alpha: Optional[float]) -> float:
    """Ape-X per-peer epsilon eps^(1 + apex_alpha * i / (N - 1)); eps for one peer or no apex_alpha."""
    if apex_alpha is None or world_size == 1:
        return eps
    return eps ** (1.0 + apex_alpha * rank / (world_size - 1))
