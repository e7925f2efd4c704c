"""DD-PPO's preemption of stragglers: once `comm.straggler_frac` of the peers have finished collecting
their rollout, the others cut theirs short (after at least `comm.min_rollout_frac` of it) and learn
from what they have. The count of finished peers lives in torchrun's store, one key per rollout; a
peer reads it (an atomic add of 0) after each step. Sampling holds no collective, so cutting a
rollout short changes no peer's sequence of collectives.
"""
from __future__ import annotations

import math
from typing import Optional

from p2prl.comm.base import Communicator
from p2prl.comm.store import connect, namespace


class Preemption:
    def __init__(self, comm: Communicator, straggler_frac: float, min_rollout_frac: float, tag: str) -> None:
        self.store = connect()
        assert self.store is not None, "preempting stragglers needs torchrun's store"
        self.need = max(1, math.ceil(straggler_frac * comm.world_size))
        self.min_frac, self.tag = min_rollout_frac, tag
        self.rollouts = 0

    def begin(self) -> None:
        """A new rollout starts (every peer calls it once per rollout, so the keys line up)."""
        self.rollouts += 1
        self._key = f"{namespace()}/preempt/{self.tag}/{self.rollouts}"

    def cut(self, done_steps: int, steps: int) -> bool:
        """Whether to stop after `done_steps` of `steps` vector steps: enough peers have finished."""
        if done_steps >= steps or done_steps < max(1, math.ceil(self.min_frac * steps)):
            return False
        return self.store.add(self._key, 0) >= self.need

    def finished(self) -> None:
        """This peer's rollout is complete (full or cut short)."""
        self.store.add(self._key, 1)


def preemption(comm: Communicator, straggler_frac: Optional[float], min_rollout_frac: float,
               tag: str) -> Optional[Preemption]:
    """A Preemption when stragglers are to be cut short and there are other peers; else None."""
    if straggler_frac is None or comm.world_size == 1:
        return None
    return Preemption(comm, straggler_frac, min_rollout_frac, tag)
