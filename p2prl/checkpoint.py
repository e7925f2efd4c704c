"""Atomic checkpoints: rank 0 writes the shared state, every rank its own; loaded with weights_only."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temp file, fsync, then rename: a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shared_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}.pt"


def rank_path(run_dir: Path, rank: int, step: int) -> Path:
    return run_dir / "checkpoints" / f"rank{rank}" / f"step_{step}.pt"


def list_steps(folder: Path) -> list[int]:
    """Checkpoint steps present in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP.match(p.name)))


def prune(folder: Path, keep: int) -> None:
    for step in list_steps(folder)[:-keep]:
        (folder / f"step_{step}.pt").unlink(missing_ok=True)


def load(path: Path) -> Optional[dict]:
    """A checkpoint's contents, or None (with a warning) if it is truncated or corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip raises several different error types
        log.warning("checkpoint %s is unreadable (%s); skipping it", path, str(e).splitlines()[0][:200])
        return None
