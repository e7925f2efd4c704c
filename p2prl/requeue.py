"""A submitit job signalled before its time limit (or preempted): an agreed checkpoint, then submitit
requeues the job, which resumes from it.

submitit has SLURM signal a job's tasks (SIGUSR2 unless `SUBMITIT_PREEMPT_SIGNAL` says otherwise) some
time before the time limit and when it is preempted, and its own handler then resubmits the job at
once: the peers would go before saving anything. Within a submitit job p2prl's handler only notes the
signal (`on_preemption`). At the next iteration boundary the peers find out together whether some peer
was signalled (`Checkpointer.mark_boundary`: the vote rides in the iteration's first sum, so it costs no
collective of its own; no peer decides alone, since saving is collective), every peer writes its part
of a checkpoint set there, and `Requeue` ends the run on every peer. Rank 0 then calls submitit's
handler (`hand_over`), which resubmits the job as it was (its checkpoint hook: the launcher with the
same overrides, so the same job dir) and exits; the requeued job resumes from that checkpoint
(`train.resume=auto`). SLURM sends SIGTERM along with the signal on preemption: submitit ignores it,
and so does p2prl within a submitit job (p2prl.faults stops on SIGINT only there).
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

_SIGNAL: list[int] = []  # submitit's preemption signal, while a run in a submitit job notes it
_REQUESTED = threading.Event()


class Requeue(BaseException):
    """The peers saved a checkpoint at `step` because the job was signalled; submitit requeues it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"the job was signalled: checkpoint at step {step}; submitit requeues it")
        self.step = step


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _preemption_signal() -> Optional[int]:
    try:
        from submitit import JobEnvironment
    except ImportError:
        return None
    return JobEnvironment._usr_sig()  # submitit's own choice (SUBMITIT_PREEMPT_SIGNAL, USR2 by default)


@contextmanager
def on_preemption() -> Iterator[None]:
    """Within a submitit job's task (on the main thread): its preemption signal is noted, not acted on."""
    signum = _preemption_signal() if in_submitit_job() else None
    if signum is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, lambda *_: _REQUESTED.set())
    _SIGNAL[:] = [signum]
    try:
        yield
    finally:
        signal.signal(signum, previous)  # submitit's handler again, for `hand_over`
        _SIGNAL.clear()


def armed() -> bool:
    """Whether a signal may ask for a checkpoint (a run within a submitit job)."""
    return bool(_SIGNAL)


def requested() -> bool:
    return _REQUESTED.is_set()


def hand_over() -> None:
    """Rank 0, after the agreed checkpoint: submitit's handler resubmits the job and exits (SystemExit)."""
    signum = _preemption_signal()
    handler = signal.getsignal(signum) if signum is not None else None
    if callable(handler):
        handler(signum, None)
