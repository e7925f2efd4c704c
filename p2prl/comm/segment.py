"""The shared-memory segment the peers of one node sum through (`p2prl.comm.shm`): its layout, its
creation, how the peers attach to it, and its end.

Layout: one header line (LINE bytes) per peer, then one for the result sequence number, padded to a
page; then two slots of SLOT_BYTES per peer, then two result slots. A peer's header holds int64
words: its sequence number (SEQ), its pid (PID), then per slot what it holds (META, META + 1).

The segment has no name anywhere: rank 0 creates it with memfd_create and the other peers open it
through /proc/<pid>/fd/<fd>. Rank 0 holds the descriptor open until every peer has mapped it (or
failed to); then only the mappings keep it alive, and it is freed with the last of them, so no file
outlives the job, whatever is killed when (kill -9 included).
"""
from __future__ import annotations

import mmap
import os
import platform
from typing import Callable, Optional

LINE = 64  # one cache line per peer's header: no false sharing
WORDS = LINE // 8
# A peer's header, in int64 words: sequence number, pid, then per slot what it holds.
SEQ, PID, META = 0, 1, 2
SLOT_BYTES = 1 << 20  # per slot; a larger tensor is summed in slot-sized pieces, one call each


def supported() -> bool:
    """Whether this machine orders memory the way the sums need (x86-64), and has memfd_create."""
    return platform.machine().lower() in ("x86_64", "amd64") and hasattr(os, "memfd_create")


def header_bytes(world_size: int) -> int:
    return -(-LINE * (world_size + 1) // 4096) * 4096


def segment_bytes(world_size: int) -> int:
    return header_bytes(world_size) + (world_size + 1) * 2 * SLOT_BYTES


def open_segment(rank: int, world_size: int, all_gather: Callable[[object], list]) -> Optional[mmap.mmap]:
    """Map one segment on every peer, this peer's pid in its header (a collective: every peer calls
    it); None on every peer if any of them could not (no memory, another pid namespace,
    /proc/<pid>/fd not readable), and the peers keep to gloo."""
    size = segment_bytes(world_size)
    fd = _create(size) if rank == 0 else None
    try:
        where = all_gather(None if fd is None else (os.getpid(), fd))[0]
        mm = _attach(where, size) if where is not None else None
        if mm is not None:
            words = memoryview(mm)[:header_bytes(world_size)].cast("q")
            words[rank * WORDS + PID] = os.getpid()
            words.release()
        pids = all_gather(None if mm is None else os.getpid())
    finally:
        if fd is not None:
            os.close(fd)
    ok = all(p is not None and alive(p) for p in pids)
    # One verdict for all: a peer summing here while another uses gloo would hang both.
    if all(all_gather(ok)):
        return mm
    if mm is not None:
        mm.close()
    return None


def _create(size: int) -> Optional[int]:
    """An anonymous memory file of `size` bytes (reserved now: running out later would be a SIGBUS)."""
    try:
        fd = os.memfd_create("p2prl-sum", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
        return fd
    except OSError:
        os.close(fd)
        return None


def _attach(where: tuple[int, int], size: int) -> Optional[mmap.mmap]:
    """Map the memory file that process `pid` holds open as descriptor `fd` (`where`)."""
    pid, fd = where
    try:
        own = os.dup(fd) if pid == os.getpid() else os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            return mmap.mmap(own, size)
        finally:
            os.close(own)
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not); True when it cannot be told."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
