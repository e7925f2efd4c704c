"""A torchrun job's processes, read from Linux's /proc: its workers by rank, a process's descendants.

torchrun starts every worker in a session of its own, so killing the agent's process group misses them:
whoever stops a job finds them here (`kill_tree`). A bench that starts jobs stops them on SIGTERM as on
Ctrl-C (`sigterm_as_interrupt`).
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Iterator, Optional


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block a SIGTERM raises KeyboardInterrupt, as Ctrl-C does: every `finally` and context
    exit on the way kills what it started (network namespaces included)."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _env(pid: int, key: str) -> Optional[str]:
    prefix = key.encode() + b"="
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode()
    return None


def alive(pid: int) -> bool:
    """Whether `pid` runs (or is stopped): not gone, not a zombie."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process now."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = int(_stat(int(p.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return out


def children(parent: int) -> list[int]:
    return [pid for pid, ppid in _parents().items() if ppid == parent]


def workers(agent: int) -> dict[int, int]:
    """{RANK: pid} of a torchrun agent's worker processes (its children with a RANK)."""
    out = {}
    for pid in children(agent):
        try:
            rank = _env(pid, "RANK")
        except OSError:
            continue
        if rank is not None:
            out[int(rank)] = pid
    return out


def restart_count(pid: int) -> Optional[int]:
    """The worker's TORCHELASTIC_RESTART_COUNT: 0 in torchrun's first round, n after n restarts."""
    try:
        value = _env(pid, "TORCHELASTIC_RESTART_COUNT")
    except OSError:
        return None
    return None if value is None else int(value)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children."""
    parents = _parents()
    out, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        below = [p for p, ppid in parents.items() if ppid == parent]
        out += below
        todo += below
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (stopped ones too)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
