"""Writing checkpoint sets at rollout boundaries: rank 0's shared file, every rank's own (see p2prl.resume,
which reads them back, for what each holds)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from p2prl import algos, requeue
from p2prl.checkpoint import prune, rank_path, remove_partial_writes, rng_state, save_atomic, shared_path
from p2prl.comm import Communicator
from p2prl.config import RunConfig, config_hash
from p2prl.metrics import ReturnWindow
from p2prl.resume import FORMAT, Progress

log = logging.getLogger(__name__)
# Copying the state at every iteration boundary cost algorithms of one-step iterations (SAC: one env
# step and its updates) a tenth of their time: a boundary is kept only once MARK_COST times the last
# copy's time has passed since that copy began (at most ~5% of the time copying), and at least once
# every MARK_EVERY_S. Where copies are cheap (PPO's rollouts) every boundary is still kept, so an
# interruption saves the model of the last iteration.
MARK_EVERY_S = 1.0
MARK_COST = 20.0


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


class Checkpointer:
    """Writes checkpoint sets; on rank 0 also keeps the shared state of the last iteration boundary, so
    an interrupted peer can save the model without any collective (parameters are identical everywhere)."""

    def __init__(self, comm: Communicator, cfg: RunConfig, run_dir: Path, algo: algos.Algorithm,
                 window: ReturnWindow) -> None:
        self.comm, self.algo, self.window = comm, algo, window
        self.folder = run_dir / "checkpoints"
        self.keep, self.replay = cfg.checkpoint.keep, cfg.checkpoint.replay
        self.config = cfg.to_dict()
        self.hash = config_hash(self.config)
        self.boundary: Optional[dict] = None
        self._marked, self._copy_s = -math.inf, 0.0  # when the last kept copy began, how long it took
        self.saved_step: Optional[int] = None
        self._vote: Optional[torch.Tensor] = None  # whether some peer's job was signalled (p2prl.requeue)
        # A peer killed while writing leaves a temp file beside the checkpoints: each peer removes its own.
        own = [self.folder / f"rank{comm.rank}", *([self.folder] if comm.rank == 0 else [])]
        for path in (p for folder in own for p in remove_partial_writes(folder)):
            log.info("removed %s, the part of a checkpoint whose writer was killed", path)

    def _shared(self, p: Progress, mean: Optional[torch.Tensor] = None) -> dict:
        """Rank 0's checkpoint contents; with `mean`, the peers' mean parameters stand in for its own."""
        learner = self.algo.learner
        if mean is not None:
            own = learner.bucket.flat_param.detach().clone()
            with torch.no_grad():
                learner.bucket.flat_param.copy_(mean)
            try:
                return _clone(self._shared(p))  # the model's tensors are views of the parameters
            finally:
                with torch.no_grad():
                    learner.bucket.flat_param.copy_(own)
        return {"format": FORMAT, "step": p.step, "iteration": p.iteration, "time_s": p.time_s,
                "world_size": self.comm.world_size,
                "config": self.config, "config_hash": self.hash, "return_window": self.window.state_dict(),
                **({} if learner is None else {"learner": learner.state_dict()}), **self.algo.state_dict()}

    def shared_state(self, p: Progress) -> dict:
        """The shared checkpoint's contents, on every peer. No collective, but where the peers'
        parameters differ (local_sgd, gossip): their mean then stands in for each one's own (one
        all-reduce: every peer calls this at the same steps)."""
        learner = self.algo.learner
        return self._shared(p, learner.strategy.average_parameters() if learner is not None else None)

    def save(self, p: Progress) -> None:
        """Every rank writes its own file, rank 0 also the shared one (`shared_state`: where the
        peers' parameters differ, their average) and each rank's file its own."""
        rank, learner = self.comm.rank, self.algo.learner
        own_state = {**self.algo.rank_state_dict(self.replay), "collector": self.algo.collector.state_dict()}
        if learner is not None:
            own_state["learner"] = learner.rank_state_dict()
        own = {"step": p.step, "rank": rank, "world_size": self.comm.world_size, "rng": rng_state()}
        assert not own.keys() & own_state.keys(), f"{own.keys() & own_state.keys()} would replace the process RNG or counters"
        own.update(own_state)
        save_atomic(own, rank_path(self.folder, rank, p.step))
        prune(self.folder / f"rank{rank}", self.keep)
        shared = self.shared_state(p)
        if rank == 0:
            save_atomic(shared, shared_path(self.folder, p.step))
            prune(self.folder, self.keep)
            log.info("checkpoint at step %d", p.step)
        self.saved_step = p.step

    def mark_boundary(self, p: Progress) -> None:
        """Called by every peer at every iteration boundary. Rank 0 keeps the shared state of this
        boundary, unless it kept one too recently (MARK_COST): an interruption saves the model of a
        boundary at most MARK_EVERY_S old."""
        now = time.monotonic()
        if self.comm.rank == 0 and now - self._marked >= min(MARK_EVERY_S, MARK_COST * self._copy_s):
            self.boundary = _clone(self._shared(p))
            self._marked, self._copy_s = now, time.monotonic() - now
        if requeue.armed():
            self._requeue_if_signalled(p)

    def _requeue_if_signalled(self, p: Progress) -> None:
        """Within a submitit job: the vote queued at the previous boundary was summed during this
        iteration (in its first sum of float64s, or at its `comm.settle()`); if some peer was signalled,
        every peer saves here and the run ends with `Requeue`. Then this boundary's vote."""
        if self._vote is not None and self._vote.item() > 0:
            if self.saved_step != p.step:
                self.save(p)
            self.comm.agree(False)  # every peer's file is written before rank 0 has the job requeued
            raise requeue.Requeue(p.step)
        self._vote = torch.tensor([1.0 if requeue.requested() else 0.0], dtype=torch.float64)
        self.comm.sum_with_next(self._vote)

    def save_interrupted(self, why: str) -> None:
        """Rank 0: the state of the last kept iteration boundary to checkpoints/interrupted.pt."""
        if self.comm.rank == 0 and self.boundary is not None:
            save_atomic({**self.boundary, "interrupted_by": why}, self.folder / "interrupted.pt")
            log.warning("saved the model of step %d to %s", self.boundary["step"], self.folder / "interrupted.pt")
