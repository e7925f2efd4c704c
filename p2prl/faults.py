"""How a peer stops on faults it cannot repair: signals, a dead torchrun agent, non-finite updates.

SIGTERM (what torchrun sends the survivors when a peer dies, and what schedulers send before a kill)
and SIGINT become an `Interrupted` exception in the main thread. The runner then saves what needs no
collective (rank 0's model at the last iteration boundary) and the entry point exits with 128 + signum.
A peer whose torchrun agent died must not train on as an orphan: a watcher thread notices the new
parent and interrupts the peer the same way; if the peer does not stop within seconds (stuck in a
collective), the watcher calls the entry point's `hard_exit`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ORPHAN_GRACE_S = 5.0  # after the agent died: time to save and exit before the watcher ends the process


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NonFiniteUpdates(RuntimeError):
    """Too many consecutive updates were skipped because a loss or gradient was NaN or infinite."""


def _watch_parent(parent: int, stop: threading.Event, hard_exit: Callable[[int], None]) -> None:
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.error("torchrun's agent (pid %d) is gone: stopping this peer", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            if not stop.wait(ORPHAN_GRACE_S):
                hard_exit(128 + signal.SIGTERM)  # stuck (e.g. in a collective): never an orphan
            return


@contextmanager
def stop_on_signals(hard_exit: Callable[[int], None], signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Within the block: `signals` (SIGTERM/SIGINT) raise `Interrupted` (once); under torchrun, the
    agent's death too, and `hard_exit(code)` ends the process if it does not stop within ORPHAN_GRACE_S."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a caller on another thread keeps its own
        return
    fired = []

    def handler(signum: int, frame) -> None:
        if not fired:  # a second signal must not interrupt the save the first one started
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    stop = threading.Event()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        threading.Thread(target=_watch_parent, args=(os.getppid(), stop, hard_exit), name="p2prl-parent-watch",
                         daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)
