"""One peer's training loop in named steps: sample -> learn -> check -> evaluate / log / checkpoint ->
agree to stop (`Loop.iteration`), with what the run sets up before it and writes after it.

The loop marks the phases (`comm.phase`: a frozen peer's survivors name the phase it was in); the
algorithms never do. It also times what is its own (checkpoints, evaluations, rows) on the peer's
stopwatch, whose other parts the collector, the algorithm and the learner fill (`p2prl.timing`), and
reports the breakdown in metrics.jsonl, summary.json, TensorBoard and the progress line.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from p2prl.algos import Algorithm
from p2prl.checkpointer import Checkpointer
from p2prl.comm import Communicator, check_identical
from p2prl.config import RunConfig
from p2prl.faults import NonFiniteUpdates
from p2prl.metrics import MetricsWriter, ReturnWindow, peak_rss_mb
from p2prl.periodic_eval import PeriodicEval
from p2prl.provenance import provenance
from p2prl.resume import Progress, restore
from p2prl.rundir import set_aside_earlier_run
from p2prl.timing import PARTS, IterationProfiler, Stopwatch, shares, since
from p2prl.trackers import open_trackers

log = logging.getLogger(__name__)
COLUMNS = (*PARTS, "rest", "loop")  # of a breakdown gathered from every rank


class Loop:
    """Everything one peer's loop carries from iteration to iteration, for `algo` (built with `clock`).
    Building it is collective: the resume (`checked`: the checkpoint the precheck found), the run dir
    set aside."""

    def __init__(self, cfg: RunConfig, run_dir: Path, comm: Communicator, algo: Algorithm, clock: Stopwatch,
                 checked: Optional[Path]) -> None:
        self.cfg, self.run_dir, self.comm, self.algo, self.clock = cfg, run_dir, comm, algo, clock
        self.is_main = comm.rank == 0
        self.learner = algo.learner
        # local_sgd and gossip keep the peers' parameters apart on purpose: nothing to check there.
        self.identical = self.learner is None or not self.learner.strategy.differs
        self.window = ReturnWindow(cfg.train.return_window)
        comm.phase = "resume"
        self.p, self.resumed_from = restore(comm, cfg, run_dir, self.algo, self.window, checked)
        own = (run_dir / "checkpoints").resolve()
        if self.resumed_from is None or own not in Path(self.resumed_from).resolve().parents:
            # A fresh start, or one from another run's checkpoint: whatever this dir holds belongs to an
            # earlier run. Before any writer opens a file here.
            set_aside_earlier_run(comm, run_dir)
        self.start = Progress(self.p.step, self.p.iteration, self.p.time_s)  # where this attempt started
        self.saver = Checkpointer(comm, cfg, run_dir, self.algo, self.window)
        # W&B may take seconds to start on rank 0 while the others wait in the next collective: within half
        # of comm.timeout_s, or the run goes on without it.
        trackers = open_trackers(cfg.logger, run_dir, cfg.flat(), cfg.comm.timeout_s / 2) if self.is_main else []
        self.writer = MetricsWriter(run_dir, cfg.train.total_steps, enabled=self.is_main, start_step=self.p.step,
                                    trackers=trackers)
        self.evaluator = PeriodicEval(cfg, comm, self.saver, resumed=self.resumed_from is not None)
        self.code = provenance() if self.is_main else {}  # the code that starts the run, not the tree at its end
        self.profiler = IterationProfiler(cfg.train.profile_iterations,
                                          run_dir / "profile" / f"rank{comm.rank}.json", self.clock)
        log_every = cfg.train.log_every_steps
        self.next_log = (self.p.step // log_every + 1) * log_every
        # Every peer holds the same window, so decisions derived from it are already collective.
        self.reached = self._reached()
        self.to_target = (self.p.step, self.p.time_s) if self.reached else (None, None)
        self.steps_by_rank = [0] * comm.world_size  # this attempt's
        self.logged: Optional[dict] = None  # the stopwatch's totals at the last row

    def _reached(self) -> bool:
        target, mean = self.cfg.train.target_return, self.window.mean
        return target is not None and mean is not None and mean >= target

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, t_start: float) -> None:
        """Iterate until the target return or the global step budget."""
        # Everything built so far (torch, Hydra, envs, model) lives for the whole run: keep it out of the
        # garbage collector's full passes, which otherwise stall one peer at a time for milliseconds
        # while the others wait for it in the next collective.
        gc.collect()
        gc.freeze()
        self.t_start, self.comm0 = t_start, (self.comm.seconds, self.comm.bytes, self.comm.calls)
        self.clock.start()
        with self.clock("checkpoint"):
            self.saver.mark_boundary(self.p)
        while self.p.step < self.cfg.train.total_steps and not self.reached:
            self.profiler.step()
            self.iteration()
        self.totals = self.clock.totals()  # the loop's, its parts adding up to its time
        self.loop_s = self.totals["loop"]
        self.profiler.close()

    def iteration(self) -> None:
        p, comm, total = self.p, self.comm, self.cfg.train.total_steps
        start_step, progress = p.step, p.step / total
        comm.phase = "sampling"
        self.algo.sample(progress)  # no collective
        sample = self.algo.collector.take()
        table = self.window.local_table(comm.rank, comm.world_size, start_step, self.algo.collector.num_envs,
                                        sample.episodes, sample.steps)
        comm.sum_with_next(table)  # rides in the algorithm's first collective of the same dtype
        comm.phase = "update"
        logs = self.algo.learn(progress)
        comm.settle()
        steps = self.window.merge(table)  # every peer's own steps: they differ when stragglers are cut short
        self.steps_by_rank = [a + b for a, b in zip(self.steps_by_rank, steps)]
        p.step += sum(steps)
        p.iteration += 1
        self.reached = self._reached()
        streak = self.check()
        done = self.reached or p.step >= total
        p.time_s = self.start.time_s + time.perf_counter() - self.t_start  # run time over all attempts
        evals = self.evaluate(start_step)
        if p.step >= self.next_log or done or evals:
            self.log(logs, evals)
        self.checkpoint(start_step, done, streak)
        if self.reached:
            self.to_target = (p.step, p.time_s)

    def check(self) -> int:
        """Stop on a run of non-finite updates; compare the parameters every comm.check_every
        iterations. Returns the non-finite streak (the same on every peer)."""
        cfg, learner = self.cfg, self.learner
        streak = learner.skipped_in_a_row if learner is not None else 0
        if streak >= cfg.train.max_skipped_updates:  # the same counter on every peer
            raise NonFiniteUpdates(
                f"{streak} updates in a row were skipped because a loss or gradient was NaN or infinite on "
                f"some peer (train.max_skipped_updates={cfg.train.max_skipped_updates}); stopping. The last "
                f"good checkpoint is the newest in {self.run_dir / 'checkpoints'}")
        if self.identical and self.p.iteration % cfg.comm.check_every == 0:
            self.comm.phase = "check"
            check_identical(self.comm, self.algo.shared_tensors())
        return streak

    def evaluate(self, start_step: int) -> dict[str, float]:
        """A greedy evaluation when the iteration crossed a multiple of train.eval_every_steps (a
        collective, at global steps); the row's eval keys."""
        if not self.evaluator.due(start_step, self.p.step):
            return {}
        self.comm.phase = "eval"
        with self.clock("eval"):
            return self.evaluator(self.p)

    def log(self, logs: dict, evals: dict) -> None:
        """A metrics row (rank 0 writes it); every peer gathers its time breakdown (a collective)."""
        p, comm, every = self.p, self.comm, self.cfg.train.log_every_steps
        self.next_log = (p.step // every + 1) * every
        now = self.clock.totals()
        mine, self.logged = since(now, self.logged), now
        comm.phase = "log"
        with self.clock("log"):
            times = gather_times(comm, mine)
            if self.learner is not None:  # a collective for some strategies; every peer logs the same rows
                logs.update(self.learner.strategy.logs(), skipped_updates=self.learner.skipped)
            elapsed = max(now["loop"], 1e-9)
            self.writer.write({"step": p.step, "time_s": p.time_s, "episode_return_mean": self.window.mean,
                               "episodes": self.window.episodes, "sps": (p.step - self.start.step) / elapsed,
                               "comm_frac": (comm.seconds - self.comm0[0]) / elapsed, **logs, **evals,
                               **{f"time/{k}": v for k, v in shares(times[0]).items()}, "time_by_rank": times})

    def checkpoint(self, start_step: int, done: bool, streak: int) -> None:
        """At a rollout boundary, when the global step crosses a multiple of checkpoint.every_steps;
        never while updates are being skipped, so that the checkpoints before a run of NaNs are kept."""
        every = self.cfg.checkpoint.every_steps
        with self.clock("checkpoint"):
            if every is not None and self.p.step // every > start_step // every and not done and streak == 0:
                self.comm.phase = "checkpoint"
                self.saver.save(self.p)
            self.saver.mark_boundary(self.p)

    # -- after the loop ----------------------------------------------------------------------------
    def finish(self) -> None:
        """The last parameter check and checkpoint; every rank's peak memory and time breakdown."""
        comm = self.comm
        self.comm_s = comm.seconds - self.comm0[0]
        self.comm_bytes, self.comm_calls = comm.bytes - self.comm0[1], comm.calls - self.comm0[2]
        if self.identical:
            comm.phase = "check"
            check_identical(comm, self.algo.shared_tensors())
        if self.saver.saved_step != self.p.step:
            comm.phase = "checkpoint"
            self.saver.save(self.p)
        comm.phase = "log"
        gathered = comm.all_gather_object((peak_rss_mb(), self.totals))  # every rank's
        self.max_rss_mb, self.times = [g[0] for g in gathered], [g[1] for g in gathered]

    def summary(self) -> dict:
        p, learner, loop_s = self.p, self.learner, max(self.loop_s, 1e-9)
        steps_to_target, time_to_target = self.to_target
        updates = learner.updates if learner is not None else p.iteration - self.start.iteration
        return {
            "reached": steps_to_target is not None, "steps_to_target": steps_to_target,
            "time_to_target_s": time_to_target, "final_step": p.step, "world_size": self.comm.world_size,
            "wall_s": time.perf_counter() - self.t_start, "loop_s": self.loop_s, "comm_s": self.comm_s,
            "comm_frac": self.comm_s / loop_s, "comm_calls": self.comm_calls, "comm_bytes": self.comm_bytes,
            "updates": updates,
            "comm_bytes_per_update": self.comm_bytes / updates if updates else None,  # what a comm.compress form saves
            "sps": (p.step - self.start.step) / loop_s, "steps_by_rank": self.steps_by_rank,
            "time": self.times, "max_rss_mb": self.max_rss_mb, "episodes": self.window.episodes,
            "episode_return_mean": self.window.mean, "run_dir": str(self.run_dir),
            "resumed_from": None if self.resumed_from is None else str(self.resumed_from),
            "resumed_at_step": self.start.step if self.resumed_from is not None else None,
            **self.code, "config": self.cfg.to_dict(),
        }

    def close(self) -> None:
        """The writers (after the last collective: W&B's upload on rank 0 may outlast comm.timeout_s)."""
        self.writer.close()
        self.evaluator.close()


def gather_times(comm: Communicator, seconds: dict[str, float]) -> list[dict[str, float]]:
    """Every rank's breakdown (COLUMNS), by rank, in one collective (rows are disjoint: a sum gathers)."""
    table = torch.zeros(comm.world_size, len(COLUMNS), dtype=torch.float64)
    table[comm.rank] = torch.tensor([seconds[k] for k in COLUMNS], dtype=torch.float64)
    comm.all_reduce_sum(table)
    return [dict(zip(COLUMNS, row)) for row in table.tolist()]
