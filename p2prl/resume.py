"""Checkpoint sets and resuming: how every peer comes back from what p2prl.checkpointer saved.

A checkpoint at global step N is complete when rank 0's `step_<N>.pt` and every rank's
`rank<R>/step_<N>.pt` load. The peers resume together from the newest complete one (a truncated or
half-written newest falls back to the one before, with a warning), so a restarted run continues the
interrupted one exactly: same parameters, optimizer, normalizers, return window, counters, RNG
states and env states. On a different number of peers (or with a changed `rank_keys` value) only the shared state carries
over; every peer starts its envs and RNGs afresh (with a warning). Keys that fix what the checkpoint
holds (the algorithm, the env, the model's shapes: `fixed_keys`) cannot change on resume; every other
key may, and the run follows the new value (docs/validation.md lists which is which).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from p2prl import algos
from p2prl.checkpoint import list_steps, load, set_rng_state, shared_path, step_of
from p2prl.checks import ConfigError, show
from p2prl.comm import Communicator
from p2prl.config import RunConfig, flatten, upgrade
from p2prl.metrics import ReturnWindow

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The run's counters; `time_s` is the run time so far (all attempts)."""

    step: int = 0
    iteration: int = 0
    time_s: float = 0.0


# A change of these keeps the shared state but restarts every rank's own (envs, windows, replay); so
# does a change of the algorithm's own `rank_keys` (the registry's).
ENV_RANK_KEYS = ("env.max_episode_steps", "env.terminal_on_life_loss", "env.vectorization")
FORMAT = 2  # of the shared checkpoint; 1 (no "format" key): before the learner kept its own state


def rank_keys(algo_name: str) -> tuple[str, ...]:
    """Flat keys whose change restarts every rank's own state: the algorithm's `rank_keys`, the env's."""
    return (*(f"algo.{k}" for k in algos.spec(algo_name).rank_keys), *ENV_RANK_KEYS)


def fixed_keys(algo_name: str) -> tuple[str, ...]:
    """Flat keys a resume may not change: the algorithm, the env, and the algorithm's own
    `fixed_on_resume` keys (the model's shapes, what its optimizer state is)."""
    return ("algo.name", "env.id", "env.kwargs", "env.wrapper", "env.frame_stack",
            *(f"algo.{k}" for k in algos.spec(algo_name).fixed_on_resume))


_MISSING = object()


def _get(config: Any, key: str) -> Any:
    """The value at a dotted key of a nested config dict (_MISSING if absent)."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _identity(config: Any) -> str:
    name, env, env_id = (_get(config, k) for k in ("algo.name", "env.name", "env.id"))
    return " ".join(["algo=" + (name if isinstance(name, str) else "?"),
                     "env=" + (env if isinstance(env, str) else "?"), f"({env_id if isinstance(env_id, str) else '?'})"])


def check_resumable(checkpoint: dict, cfg: RunConfig, where: Path) -> None:
    """A checkpoint of another run (algo, env), of an earlier format, or whose model another config
    would not fit, cannot be resumed: say which key differs and what the checkpoint has."""
    saved_config, now = checkpoint.get("config"), cfg.to_dict()
    if _identity(saved_config) != _identity(now):
        raise ConfigError("train.resume", cfg.train.resume,
                          f"{where} belongs to another run ({_identity(saved_config)}; this run is "
                          f"{_identity(now)}); resume with the same algo and env, or choose another hydra.run.dir")
    if checkpoint.get("format", 1) != FORMAT:
        raise ConfigError("train.resume", cfg.train.resume,
                          f"{where} holds checkpoints of an earlier p2prl version (format {checkpoint.get('format', 1)}, "
                          f"this version reads {FORMAT}); start afresh: train.resume=never or another hydra.run.dir")
    for key in fixed_keys(cfg.algo.name):
        saved = _get(saved_config, key)
        if saved is not _MISSING and saved != _get(now, key):
            raise ConfigError(key, _get(now, key), f"cannot change on resume: {where} was trained with "
                                                   f"{show(saved)}; keep that, or start afresh "
                                                   f"(train.resume=never or another hydra.run.dir)")


def candidates(resume: str, run_dir: Path) -> list[Path]:
    """Shared checkpoint files to try, newest first; [] to start from scratch."""
    if resume == "never":
        return []
    if resume == "auto":
        folder = run_dir / "checkpoints"
        return [shared_path(folder, s) for s in reversed(list_steps(folder))]
    path = Path(resume).expanduser()
    if path.is_file():
        return [path]
    for folder in (path / "checkpoints", path):
        if steps := list_steps(folder):
            return [shared_path(folder, s) for s in reversed(steps)]
    what = "holds no checkpoints/step_<N>.pt" if path.exists() else "is missing"
    raise ConfigError("train.resume", resume, f"{what}; allowed: auto, never, a run dir or a checkpoint file")


def check_source(cfg: RunConfig, run_dir: Path) -> Optional[Path]:
    """Before training, on each peer alone: the checkpoint to resume is readable and fits this config;
    returns it (None: there is none, the run starts afresh)."""
    for path in candidates(cfg.train.resume, run_dir):
        checkpoint = load(path, mmap=True, warn=False)
        if checkpoint is not None:
            check_resumable(checkpoint, cfg, path.parent)
            return path
    if cfg.train.resume not in ("auto", "never"):
        raise ConfigError("train.resume", cfg.train.resume, "no readable checkpoint there (truncated or corrupt)")
    return None


def _rank_file(shared: Path, rank: int) -> Path:
    return shared.parent / f"rank{rank}" / shared.name


def _same_ranks(shared: dict, cfg: RunConfig, world_size: int) -> bool:
    """Whether each rank's own file fits this run: same number of peers, same `rank_keys`."""
    saved, now = flatten(upgrade(shared.get("config", {}), algos.algo_sections(), algos.added_keys())), cfg.flat()
    return shared.get("world_size") == world_size and all(saved.get(k) == now.get(k)
                                                        for k in rank_keys(cfg.algo.name))


def restore(comm: Communicator, cfg: RunConfig, run_dir: Path, algo: algos.Algorithm, window: ReturnWindow,
            checked: Optional[Path] = None) -> tuple[Progress, Optional[Path]]:
    """Load the newest checkpoint every peer can read (a collective); (Progress(), None) if there is none.

    `checked`: the checkpoint `check_source` already found to fit (the precheck's; not checked again).
    """
    paths = comm.broadcast_object([str(p) for p in candidates(cfg.train.resume, run_dir)])
    for path in map(Path, paths):
        shared = load(path)
        # Per-rank files go with step files of the same peers; others resume the shared state only.
        exact = shared is not None and step_of(path) is not None and _same_ranks(shared, cfg, comm.world_size)
        own = load(_rank_file(path, comm.rank)) if exact else None
        if comm.agree(shared is None or (exact and own is None)):
            log.warning("checkpoint %s is incomplete or unreadable on some peer; trying the previous one", path)
            continue
        if checked is None or path.resolve() != Path(checked).resolve():
            check_resumable(shared, cfg, path.parent)
        _load(comm, cfg, algo, window, shared, own)
        progress = Progress(int(shared["step"]), int(shared["iteration"]), float(shared["time_s"]))
        log.info("resumed from %s at step %d", path, progress.step)
        return progress, path
    if paths:
        log.warning("no complete checkpoint in %s; starting from scratch", Path(paths[0]).parent)
    return Progress(), None


def _load(comm: Communicator, cfg: RunConfig, algo: algos.Algorithm, window: ReturnWindow, shared: dict,
          own: Optional[dict]) -> None:
    saved, now = flatten(upgrade(shared.get("config", {}), algos.algo_sections(), algos.added_keys())), cfg.flat()
    changed = sorted(k for k in set(saved) | set(now) if k != "train.resume" and saved.get(k) != now.get(k))
    if changed:
        log.info("resuming with a changed config (the new values hold): %s", ", ".join(changed[:8]))
    algo.load_state_dict(shared)
    if algo.learner is not None:
        algo.learner.load_state_dict(shared["learner"])
    window.load_state_dict(shared["return_window"])
    if own is not None:
        set_rng_state(own["rng"])
        collector = own.get("collector", own)  # rank files of earlier versions kept its state at the top
        algo.collector.load_state_dict(collector)
        algo.load_rank_state_dict(own)
        if (why := algo.collector.not_restorable) is not None and comm.rank == 0:
            how = "its random stream continued" if "env_rngs" in collector else "from its seed"
            log.info("the envs' state cannot be restored (%s): every env starts a fresh episode, %s", why, how)
        if algo.learner is not None:
            algo.learner.load_rank_state_dict(own.get("learner", {}))
    elif comm.rank == 0:
        log.warning("resuming a run of %s peer(s) on %d (%s): only the shared state carries over; every peer's "
                    "envs, RNGs and replay start afresh", shared.get("world_size"), comm.world_size,
                    ", ".join(f"{k}={show(now.get(k))}" for k in rank_keys(cfg.algo.name)
                              if saved.get(k) != now.get(k))
                    or "another number of peers")
