"""What code ran a run, for summary.json: package versions and, from a git checkout, the commit."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root when p2prl runs from a checkout


def versions() -> dict:
    """p2prl's, Python's, torch's, gymnasium's and numpy's versions."""
    import gymnasium
    import numpy
    import torch

    import p2prl
    return {"p2prl": p2prl.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "gymnasium": gymnasium.__version__, "numpy": numpy.__version__}


def git_state(root: Path = CHECKOUT) -> Optional[dict]:
    """{"commit": HEAD's hash, "dirty": whether tracked files differ from it} when `root` is a git
    checkout (a worktree too) and git runs; None otherwise (an installed package)."""
    if not (root / ".git").exists():
        return None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(changes)}


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()


def provenance() -> dict:
    """summary.json's record of the code: {"versions": ..., "git": ... or None}."""
    return {"versions": versions(), "git": git_state()}
