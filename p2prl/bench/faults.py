"""Faults injected into a running torchrun job on this machine, for `python -m p2prl.bench --faults K`.

Each kind strikes one peer, chosen at random:
- `kill`: SIGKILL.
- `stop`: SIGSTOP. The other peers time out within comm.timeout_s and torchrun restarts everyone; the
  stopped peer ignores torchrun's SIGTERM, so once another peer has given up it is killed here
  (torchrun would wait 30 s before its own SIGKILL).
- `checkpoint`: SIGKILL while the peer writes a checkpoint file. Seen from outside as the atomic
  writer's temp file `.step_<N>.pt.tmp<pid>` (the pid is the writer's); the writer is stopped first
  and killed only if its temp file is still there, so the kill lands mid-write (else it continues and
  the next write is tried).
After each fault the injector waits for torchrun's restart and the resume, and records the step the
interrupted attempt had reached (rank 0's last progress line), the step it resumed from, and the
seconds from the fault until the run was back at the step it had reached. Rank 0's progress comes
from the job's log (`train.log_every_steps` of one iteration makes it exact to the iteration). Every
wait is bounded in time; a polling loop, also in count.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Optional, TypeVar

from p2prl.bench import procs
from p2prl.checkpoint import list_steps

KINDS = {"kill": "kill -9 of a peer", "stop": "SIGSTOP of a peer", "checkpoint": "kill -9 in a checkpoint write"}
POLL_S = 0.05
WRITE_POLL_S = 0.001  # a CartPole checkpoint takes tens of milliseconds to write and fsync
MAX_WRITE_MISSES = 200  # writes seen but finished before the stop landed, before giving up
_STEP = re.compile(r"^\[([\d-]+ [\d:]+),(\d+)\]\[rank 0\]\[INFO\] step (\d+) ")
_RESUMED = re.compile(r"\[rank 0\]\[INFO\] resumed from \S+ at step (\d+)")
_TEMP = re.compile(r"^\.step_\d+\.pt\.tmp(\d+)$")
T = TypeVar("T")


class FaultError(RuntimeError):
    """The job did not do what a fault run needs (ended early, did not restart in time)."""


class JobLog:
    """Rank 0's progress lines and resumes in a job's log file, read as the file grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.partial = path, 0, b""
        self.step = 0  # of rank 0's last progress line (since the last resume)
        self.stamps: list[datetime] = []  # of the last two progress lines
        self.resumes: list[tuple[int, int]] = []  # (step the attempt before had reached, step resumed from)

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # a line still being written
        for raw in lines:
            line = raw.decode(errors="replace")
            if m := _STEP.search(line):
                self.step = int(m.group(3))
                stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") + timedelta(milliseconds=int(m.group(2)))
                self.stamps = [*self.stamps[-1:], stamp]
            elif m := _RESUMED.search(line):
                self.resumes.append((self.step, int(m.group(1))))
                self.step = int(m.group(1))


    @property
    def iteration_s(self) -> float:
        """Seconds between rank 0's last two progress lines (0 before there are two)."""
        return (self.stamps[1] - self.stamps[0]).total_seconds() if len(self.stamps) == 2 else 0.0


@dataclass
class Fault:
    kind: str
    at_step: int  # planned: not before this global step
    rank: Optional[int] = None
    reached: Optional[int] = None  # the step the interrupted attempt had reached
    resumed: Optional[int] = None  # the step it resumed from
    seconds_lost: Optional[float] = None  # from the fault until the run was back at `reached`

    @property
    def steps_lost(self) -> Optional[int]:
        return None if self.reached is None or self.resumed is None else self.reached - self.resumed


def plan(k: int, budget: int, every: int, iteration: int, rng: random.Random) -> list[Fault]:
    """K faults of random kinds at random steps: one in each of K equal slots after the first (the run
    first makes progress and writes checkpoints), none in the last slot; at least `every` apart."""
    slot = budget // (k + 2)
    assert slot >= 2 * every, f"{budget} steps leave no room for {k} faults every {every} steps"
    out = []
    for i in range(k):
        step = slot * (i + 1) + rng.randrange(0, slot - every + 1)
        out.append(Fault(rng.choice(list(KINDS)), -(-step // iteration) * iteration))
    return out


def wait_until(condition: Callable[[], T], what: str, timeout: float, ended: Callable[[], Optional[str]]) -> T:
    """Poll `condition` until it holds; FaultError after `timeout` s, or as soon as `ended()` says why
    it never will (checked first, so a last update before the end still counts)."""
    deadline = time.monotonic() + timeout
    while True:
        why = ended()
        if value := condition():
            return value
        if why is not None:
            raise FaultError(f"{why} while waiting for {what}")
        if time.monotonic() > deadline:
            raise FaultError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


class Injector:
    """Injects faults into the torchrun job `agent` (nproc workers on this machine), one after another."""

    def __init__(self, agent: subprocess.Popen, log: JobLog, run_dir: Path, nproc: int, rng: random.Random,
                 wait_s: float) -> None:
        self.agent, self.log, self.run_dir, self.nproc, self.rng = agent, log, run_dir, nproc, rng
        self.wait_s = wait_s  # the longest wait for any one thing
        self.restarts = 0  # the highest TORCHELASTIC_RESTART_COUNT seen
        self.stopped: set[int] = set()  # pids this injector stopped and has not killed yet

    def live(self) -> dict[int, int]:
        """{rank: pid} of the job's running workers; counts the restarts seen."""
        out = {r: p for r, p in procs.workers(self.agent.pid).items() if procs.alive(p)}
        counts = [c for p in out.values() if (c := procs.restart_count(p)) is not None]
        self.restarts = max([self.restarts, *counts])
        return out

    def wait(self, condition: Callable[[], T], what: str) -> T:
        def ended() -> Optional[str]:
            self.log.poll()
            return None if self.agent.poll() is None else f"the job ended (exit code {self.agent.returncode})"
        return wait_until(condition, what, self.wait_s, ended)

    def inject(self, f: Fault) -> None:
        """Wait for step `f.at_step` (and a checkpoint to resume from), strike, wait for the recovery."""
        ready = lambda: (self.log.step >= f.at_step and list_steps(self.run_dir / "checkpoints")  # noqa: E731
                         and len(self.live()) == self.nproc)
        self.wait(ready, f"step {f.at_step}")
        before = len(self.log.resumes)
        if f.kind == "checkpoint":
            f.rank, pid = self._kill_in_write()
        else:
            time.sleep(self.rng.uniform(0, min(self.log.iteration_s, 5.0)))  # a random moment of the iteration
            workers = self.live()
            f.rank = self.rng.choice(sorted(workers))
            pid = workers[f.rank]
            os.kill(pid, signal.SIGSTOP if f.kind == "stop" else signal.SIGKILL)
        t_fault = time.monotonic()
        if f.kind == "stop":
            self.stopped.add(pid)
            others = [p for p in workers.values() if p != pid]
            self.wait(lambda: not all(procs.alive(p) for p in others), "the other peers to give up on the stopped one")
            os.kill(pid, signal.SIGKILL)
            self.stopped.discard(pid)
        self.wait(lambda: len(self.log.resumes) > before, "the peers to restart and resume")
        f.reached, f.resumed = self.log.resumes[before]
        self.wait(lambda: self.log.step >= f.reached and self.live(), f"the run to get back to step {f.reached}")
        f.seconds_lost = time.monotonic() - t_fault

    def _kill_in_write(self) -> tuple[int, int]:
        """Catch a peer inside a checkpoint write and SIGKILL it there: (rank, pid)."""
        folders = [self.run_dir / "checkpoints", *(self.run_dir / "checkpoints" / f"rank{r}" for r in range(self.nproc))]
        workers, misses = self.live(), 0
        by_pid = {p: r for r, p in workers.items()}
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and misses < MAX_WRITE_MISSES:
            for folder in folders:
                try:
                    names = os.listdir(folder)
                except FileNotFoundError:
                    continue
                for name in names:
                    m = _TEMP.match(name)
                    if m is None or int(m.group(1)) not in by_pid:
                        continue  # another file, or the leftover of a writer killed before
                    pid = int(m.group(1))
                    os.kill(pid, signal.SIGSTOP)
                    if (folder / name).exists():
                        os.kill(pid, signal.SIGKILL)
                        return by_pid[pid], pid
                    os.kill(pid, signal.SIGCONT)  # the write had finished: wait for the next one
                    misses += 1
            if self.agent.poll() is not None:
                raise FaultError(f"the job ended (exit code {self.agent.returncode}) before a checkpoint write was caught")
            time.sleep(WRITE_POLL_S)
        raise FaultError(f"no checkpoint write caught in {self.wait_s:.0f} s ({misses} finished before the stop landed)")

    def close(self) -> None:
        """Kill the job: its agent, its workers (in sessions of their own), anything this injector stopped."""
        for pid in [*self.live().values(), *self.stopped]:
            procs.kill_tree(pid)
        if self.agent.poll() is None:
            procs.kill_tree(self.agent.pid)
        try:
            self.agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
