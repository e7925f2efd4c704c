"""Where every random stream of a peer comes from.

- The model: `torch.manual_seed(seed)` on every peer (rank 0's weights are broadcast anyway).
- Env `i` of rank `r`: `seed + r * num_envs + i` (gymnasium seeds its own numpy generator with it).
- Rank `r`'s torch sampling (actions, minibatch order): `torch.manual_seed(seed + r)`.
- Rank `r`'s numpy streams (exploration, replay sampling): `peer_rng(seed, r, purpose)`.

`seed + r` identifies a peer's exploration, but a numpy generator seeded with the integer `seed + r`
would draw exactly the stream of the env seeded `seed + r` (both are PCG64 from SeedSequence(seed + r)).
`peer_rng` hashes (seed, rank, purpose) instead: a SeedSequence of three words whose last word is a
non-zero purpose code, which no integer env seed below 2**64 spells, so it cannot coincide with any env's
stream, another rank's, or another purpose's.
"""
from __future__ import annotations

import zlib

import numpy as np


def env_seed(seed: int, rank: int, num_envs: int) -> int:
    """The seed of rank `rank`'s first env; env i gets this + i."""
    return seed + rank * num_envs


def purpose_code(purpose: str) -> int:
    """A stable non-zero 32-bit code for a stream's purpose ("explore", "replay", ...)."""
    return zlib.crc32(purpose.encode()) | 1


def peer_rng(seed: int, rank: int, purpose: str) -> np.random.Generator:
    """Rank `rank`'s numpy generator for `purpose`: never the stream of an env or of another peer."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, purpose_code(purpose)]))
