"""Where a metrics row goes besides metrics.jsonl: TensorBoard (always) and Weights & Biases
(`logger=wandb`). Rank 0 only.

Every tracker gets every numeric key of the row, under the row's own name, against the global `step`,
so a key an algorithm or the runner adds to the rows reaches TensorBoard and W&B with no change here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Protocol

from p2prl.config import LoggerConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a (jsonable) metrics row but `step`: booleans, nulls and lists are left out."""
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Events under <run_dir>/tb/, one scalar tag per key."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run with the flattened config, writing under <run_dir>/wandb/.

    Every key is plotted against the logged `step` (global env steps) rather than W&B's own call
    counter, so a run resumed from a checkpoint (a new W&B run of the same name) lines up with the
    attempt before it. W&B's console capture is off: p2prl's log lines already go to the run dir.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any], timeout_s: float) -> None:
        import wandb
        run_dir.mkdir(parents=True, exist_ok=True)  # W&B falls back to a temp dir for a missing one
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name or run_dir.name,
                              group=cfg.group, tags=list(cfg.tags), mode=cfg.mode, dir=str(run_dir),
                              config=dict(config), settings=wandb.Settings(console="off", init_timeout=timeout_s))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any], timeout_s: float) -> list[Tracker]:
    """TensorBoard, and W&B with `logger=wandb`. `timeout_s` bounds W&B's start (the other peers wait for
    rank 0 in their next collective meanwhile). A tracker that cannot start is a warning, not the end
    of the run: metrics.jsonl holds every row anyway."""
    trackers: list[Tracker] = []
    try:
        trackers.append(TensorBoard(run_dir))
    except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
        log.warning("tensorboard is not installed: no tb/ events")
    if cfg.name == "wandb":
        try:
            trackers.append(WandB(cfg, run_dir, config, timeout_s))
        except Exception as e:  # wandb raises its own errors (no login, no network); training goes on
            log.error("logger=wandb: W&B did not start (%s); metrics go to metrics.jsonl and TensorBoard only",
                      str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return trackers
