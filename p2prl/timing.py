"""Where a peer's training time goes: a stopwatch with one bucket per part of the loop.

The parts are disjoint by construction. The collector times env stepping (`env`); an algorithm wraps
its policy's forward when acting (`inference`), its writes of each step into its rollout or replay
buffer (`storage`) and its loss computation (`forward`: minibatch gathering, advantages or TD
targets, the network's forward); the learner times `backward` and
`optimizer` (clipping, the optimizer step and the strategy's own work on the gradient besides the
transport); the runner times `checkpoint`, `eval` and `log`. `comm` is the time inside collectives
(`Communicator.seconds`) plus what the parts time as communication themselves (the straggler cut's
store reads); every timer subtracts the collectives that ran inside it, so no second counts twice.
`rest` is the loop's time minus all of them: the unattributed share.

A timer is two `perf_counter` calls and two reads of the communicator's seconds; its object is made
once per part, so timing allocates nothing per step. On a GPU, kernels run asynchronously: their time
counts where the CPU waits for them (a `.cpu()`, a collective).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

PARTS = ("env", "inference", "storage", "forward", "backward", "optimizer", "comm", "checkpoint", "eval", "log")
SHORT = {"env": "env", "inference": "inf", "storage": "store", "forward": "fwd", "backward": "bwd", "optimizer": "opt",
         "comm": "comm", "checkpoint": "ckpt", "eval": "eval", "log": "log", "rest": "rest"}


class _NoComm:
    seconds = 0.0


class _Timer:
    """`with clock("env"): ...` adds the block's seconds, less the collectives inside it, to its part."""

    __slots__ = ("watch", "part", "t0", "c0", "record")

    def __init__(self, watch: "Stopwatch", part: str) -> None:
        self.watch, self.part, self.record = watch, part, None

    def __enter__(self) -> None:
        w = self.watch
        # A part timed inside another would count twice (the parts must add up to the loop's time).
        assert w.active is None, f"the stopwatch's part {self.part!r} was started inside {w.active!r}"
        w.active = self.part
        if w.profiling:  # the part as a named range in the profiler's trace
            import torch
            self.record = torch.profiler.record_function(self.part)
            self.record.__enter__()
        self.c0 = w.comm.seconds
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        w = self.watch
        w.seconds[self.part] += time.perf_counter() - self.t0 - (w.comm.seconds - self.c0)
        w.active = None
        if self.record is not None:
            self.record.__exit__(*exc)
            self.record = None


class Stopwatch:
    """Seconds per part (PARTS) of one peer's loop. `comm`: anything with a `seconds` counter of the
    time spent inside collectives (a `Communicator`); none: no collectives to subtract."""

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm if comm is not None else _NoComm()
        self.profiling = False
        self.active: Optional[str] = None  # the part being timed now
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._timers = {part: _Timer(self, part) for part in PARTS}
        self.start()

    def __call__(self, part: str) -> _Timer:
        return self._timers[part]

    def start(self) -> None:
        """Zero every part; the loop's time counts from now."""
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.t0, self.comm0 = time.perf_counter(), self.comm.seconds

    def totals(self) -> dict[str, float]:
        """Seconds per part since `start`, `rest` and the whole `loop`; the parts and rest add up to loop."""
        loop = time.perf_counter() - self.t0
        out = dict(self.seconds)
        out["comm"] += self.comm.seconds - self.comm0
        out["rest"] = loop - sum(out.values())
        out["loop"] = loop
        return out


def since(now: dict[str, float], before: Optional[dict[str, float]]) -> dict[str, float]:
    """The seconds of each part between two `totals` (all of `now` when `before` is None)."""
    return dict(now) if before is None else {k: v - before.get(k, 0.0) for k, v in now.items()}


def shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each part's share (and rest's) of `seconds["loop"]`."""
    loop = max(seconds["loop"], 1e-12)
    return {k: v / loop for k, v in seconds.items() if k != "loop"}


def shares_line(share: dict[str, float]) -> str:
    """The progress line's compact form: `env 41% inf 20% ... rest 4%` (parts under 0.5% left out)."""
    return " ".join(f"{SHORT.get(k, k)} {100 * v:.0f}%" for k, v in share.items() if round(100 * v) >= 1
                    or k == "rest")


class IterationProfiler:
    """`train.profile_iterations=N`: torch.profiler records N iterations after WARMUP warm-up ones and
    writes a Chrome trace to `path` (open it in chrome://tracing or Perfetto). The stopwatch's parts
    appear in it as named ranges."""

    WARMUP = 3  # iterations before recording: allocator, caches and the first collectives settle

    def __init__(self, iterations: Optional[int], path: Path, clock: Stopwatch) -> None:
        self.iterations, self.path, self.clock = iterations or 0, path, clock
        self.seen, self.profile = 0, None

    def step(self) -> None:
        """Call at every iteration boundary (before the first iteration too)."""
        if not self.iterations:
            return
        if self.seen == self.WARMUP:
            import torch
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()
            self.clock.profiling = True
        elif self.seen == self.WARMUP + self.iterations:
            self.close()
        self.seen += 1

    def close(self) -> None:
        """Stop recording and write the trace (also when the run ends before N iterations)."""
        if self.profile is None:
            return
        from p2prl.atomic import move_atomic
        profile, self.profile, self.iterations = self.profile, None, 0
        self.clock.profiling = False
        profile.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        profile.export_chrome_trace(str(tmp))
        move_atomic(tmp, self.path)
