"""Episode accounting, the global return window, and the run's metrics rows (rank 0 writes)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from p2prl.atomic import jsonable, write_atomic
from p2prl.timing import shares_line
from p2prl.trackers import Tracker, scalars

SHARE = "time/"  # a row's keys of rank 0's time shares (p2prl.timing), one per part

log = logging.getLogger(__name__)


class Episode(NamedTuple):
    """A finished training episode: `t` is the vector step (within its iteration) that ended it."""

    t: int
    env: int
    ret: float
    length: int


class EpisodeCounter:
    """Per-env return/length accumulators for one peer's vector env."""

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[Episode] = []

    def step(self, t: int, rewards: np.ndarray, dones: np.ndarray, valid: np.ndarray) -> None:
        """Account one vector step; `valid` is False on reset steps, which belong to no episode."""
        self.returns += rewards
        self.lengths += valid
        if dones.any():
            for i in np.flatnonzero(dones):
                self.finished.append(Episode(t, int(i), float(self.returns[i]), int(self.lengths[i])))
                self.returns[i] = 0.0
                self.lengths[i] = 0

    def take(self) -> list[Episode]:
        out, self.finished = self.finished, []
        return out

    def state_dict(self) -> dict:
        return {"returns": torch.from_numpy(self.returns.copy()), "lengths": torch.from_numpy(self.lengths.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.returns = state["returns"].numpy().copy()
        self.lengths = state["lengths"].numpy().copy()


class ReturnWindow:
    """The `size` most recently finished episodes over all peers, identical on every peer.

    Episodes are ordered by the global step at which they finished, ties by rank then env index.
    Each peer fills its row of `local_table`; once the table is summed over peers (rows are disjoint,
    so the sum gathers them) every peer `merge`s the same rows, so decisions derived from `mean`
    (target reached) need no further agreement.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[int, int, int, float]] = []  # (global step, rank, env, return)
        self.episodes = 0

    def local_table(self, rank: int, world_size: int, start_step: int, num_envs: int,
                    episodes: list[Episode], steps: int) -> torch.Tensor:
        """A float64 (world_size, 2 + 3 * size) table, zero but for this peer's row: its env steps this
        iteration, its episode count and its `size` most recent episodes (global step at the end, env
        index, return)."""
        recent = episodes[-self.size:]
        table = torch.zeros(world_size, 2 + 3 * self.size, dtype=torch.float64)
        row = table[rank]
        row[0], row[1] = steps, len(episodes)
        for j, e in enumerate(recent):
            row[2 + 3 * j: 5 + 3 * j] = torch.tensor(
                [start_step + (e.t + 1) * num_envs * world_size, e.env, e.ret], dtype=torch.float64)
        return table

    def merge(self, table: torch.Tensor) -> list[int]:
        """Add the episodes of a summed table, rank by rank, and keep the `size` most recent; returns
        every rank's env steps of the iteration."""
        for rank in range(table.shape[0]):
            n = int(table[rank, 1])
            self.episodes += n
            for j in range(min(n, self.size)):
                step, env, ret = table[rank, 2 + 3 * j: 5 + 3 * j].tolist()
                self.items.append((int(step), rank, int(env), ret))
        self.items.sort()
        del self.items[:-self.size]
        return [int(x) for x in table[:, 0].tolist()]

    @property
    def mean(self) -> Optional[float]:
        if not self.items:
            return None
        return sum(x[3] for x in self.items) / len(self.items)

    def state_dict(self) -> dict:
        return {"items": torch.tensor([list(x) for x in self.items], dtype=torch.float64).reshape(-1, 4),
                "episodes": self.episodes}

    def load_state_dict(self, state: dict) -> None:
        self.items = [(int(s), int(r), int(e), float(v)) for s, r, e, v in state["items"].tolist()]
        self.episodes = int(state["episodes"])


class MetricsWriter:
    """metrics.jsonl, the trackers (`p2prl.trackers`: TensorBoard, W&B) and a console progress line;
    rank 0 only.

    A run that resumes from step N first drops the rows after N (the interrupted attempt's), so the
    step column stays unique and increasing across restarts.
    """

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, start_step: int = 0,
                 trackers: Sequence[Tracker] = ()) -> None:
        self.enabled = enabled
        self.file = None
        self.trackers = list(trackers)
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_rows_after(run_dir / "metrics.jsonl", start_step)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if sys.stderr.isatty() and not os.environ.get("P2PRL_NO_PROGRESS"):
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, unit="step", unit_scale=True, dynamic_ncols=True)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = jsonable(row)
        self.file.write(json.dumps(row) + "\n")
        numbers = scalars(row)
        for tracker in self.trackers:
            tracker.log(numbers, row["step"])
        ret = row.get("episode_return_mean")
        shown = "n/a" if ret is None else f"{ret:.1f}"
        parts = {k[len(SHARE):]: v for k, v in row.items() if k.startswith(SHARE) and v is not None}
        where = f", {shares_line(parts)}" if parts else ""  # where the time went since the last row
        if self.bar is not None:
            self.bar.n = min(row["step"], self.bar.total)
            self.bar.set_postfix_str(f"return {shown}, {row['sps']:.0f} steps/s{where}", refresh=True)
        else:
            log.info("step %d  return %s  %.0f steps/s%s", row["step"], shown, row["sps"], where)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        if self.file is not None:
            self.file.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of `path` with `step` <= step (and drop a torn last line), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a crash
    write_atomic(path, "".join(kept))


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
