"""A fresh start in a run dir that holds an earlier run: the earlier run's files move to previous/<time>/.

Without this, a run started afresh (`train.resume=never`, or `auto` finding no complete checkpoint)
writes its checkpoints beside the earlier run's: pruning keeps the highest steps, so its own newest
checkpoints were deleted, `p2prl evaluate` scored the earlier model, and a later `train.resume=auto`
silently continued the earlier run. Moving (never deleting) keeps the earlier run whole for whoever
wants it back. Hydra's own files (.hydra/, the log file) stay: they already belong to this run.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from p2prl.comm import Communicator

log = logging.getLogger(__name__)
PREVIOUS = "previous"
# What a run (or p2prl evaluate / plot on it) writes; checkpoints/ holds best.pt, interrupted.pt and rank dirs.
EARLIER = ("checkpoints", "metrics.jsonl", "summary.json", "tb", "wandb", "eval.json", "videos", "returns.png",
           "profile")


def _stamp(previous: Path) -> str:
    """The start time, made unique among previous/'s entries (two fresh starts within a second)."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    n = 1
    while (previous / (stamp if n == 1 else f"{stamp}_{n}")).exists():
        n += 1
    return stamp if n == 1 else f"{stamp}_{n}"


def set_aside_earlier_run(comm: Communicator, run_dir: Path) -> Optional[Path]:
    """Move an earlier run's files in `run_dir` to `run_dir/previous/<time>/`; a collective, before
    anything of this run opens a file there. Returns where they went (None: nothing to move here).

    Rank 0 chooses the time and moves everything it sees; then each other rank moves its own
    checkpoints/rank<R>/ if it is still there (nodes without a shared filesystem keep rank files on
    each node) into the same previous/<time>/.
    """
    dest: Optional[Path] = None
    stamp = None
    if comm.rank == 0:
        stamp = _stamp(run_dir / PREVIOUS)
        found = [name for name in EARLIER if (run_dir / name).exists()]
        if found:
            dest = run_dir / PREVIOUS / stamp
            dest.mkdir(parents=True)
            for name in found:
                shutil.move(run_dir / name, dest / name)
            log.info("this run starts afresh: moved the earlier run's %s to %s", ", ".join(found), dest)
    stamp = comm.broadcast_object(stamp)  # also: rank 0 has moved before the others look
    own = run_dir / "checkpoints" / f"rank{comm.rank}"
    if comm.rank != 0 and own.is_dir():
        dest = run_dir / PREVIOUS / stamp
        (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.move(own, dest / "checkpoints" / own.name)
        log.info("this run starts afresh: moved the earlier run's %s to %s", own, dest)
    return dest
