"""Atomic checkpoint files: rank 0 writes the shared state, every rank its own; loaded with weights_only.

Layout under `<run_dir>/checkpoints/`: `step_<N>.pt` (rank 0: model or q_table, optimizer, normalizers,
counters, config) and `rank<R>/step_<N>.pt` (rank R: RNG states, env and sampler state, replay).
Contents are tensors and plain Python values only, so `torch.load(weights_only=True)` never unpickles
code. What goes in them, and resuming, is `p2prl.resume`'s job.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from p2prl.atomic import write_atomic

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save `obj` to `path` atomically (see p2prl.atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def shared_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step}.pt"


def rank_path(folder: Path, rank: int, step: int) -> Path:
    return folder / f"rank{rank}" / f"step_{step}.pt"


def step_of(path: Path) -> Optional[int]:
    m = _STEP.match(path.name)
    return int(m.group(1)) if m else None


def list_steps(folder: Path) -> list[int]:
    """Checkpoint steps present in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(s for p in folder.iterdir() if (s := step_of(p)) is not None)


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints in `folder`."""
    for step in list_steps(folder)[:-keep]:
        shared_path(folder, step).unlink(missing_ok=True)


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that a killed process left in `folder` (p2prl.atomic
    names them `.step_<N>.pt.tmp<pid>`); returns them. Only at the start of an attempt, when no peer of
    this run writes there: every save comes after collectives that this peer has not yet joined."""
    stale = sorted(folder.glob(".step_*.pt.tmp*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load(path: Path, mmap: bool = False, warn: bool = True) -> Optional[dict]:
    """A checkpoint's contents, or None (with a warning) if it is missing, truncated or corrupt.

    `mmap=True` reads tensors lazily: cheap when only the counters and config are needed.
    """
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated zip raises several different error types
        if warn:
            log.warning("checkpoint %s is unreadable (%s); skipping it", path,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return None


# -- RNG states as plain values ------------------------------------------------------------------
def rng_state() -> dict:
    """This process's global torch (CPU, and this peer's GPU once CUDA is in use), numpy and python
    RNG states."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}
    return {"torch": torch.get_rng_state(), **cuda,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # the current device: this peer's GPU
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
