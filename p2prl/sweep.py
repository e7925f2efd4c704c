"""The runs of a sweep and their groups: what `python -m p2prl.plot SWEEP_DIR` draws one band for each.

A sweep dir is any dir with run dirs (dirs holding metrics.jsonl) below it, such as a Hydra multirun's
`multirun/<id>/` with one subdir per job. Runs are grouped by the config keys whose values differ
between them; `seed` does not count, so the seeds of one setting form one group.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from p2prl.checks import show
from p2prl.config import flatten

IGNORED = ("seed", "train.resume")  # keys that tell repeats apart, not settings
NAMED_BY = ("algo.name", "env.name")  # what names the one group of runs that differ in nothing else


class Group(NamedTuple):
    label: str  # "algo.lr=0.001 env.name=cartpole": the group's values of the keys that differ
    runs: list[Path]


def saved_config(run_dir: Path) -> Optional[dict]:
    """The config a run ran with: summary.json's when it finished, else Hydra's saved one; None
    where the dir has neither (or they cannot be read)."""
    summary = run_dir / "summary.json"
    try:
        if summary.is_file():
            return json.loads(summary.read_text())["config"]
        saved = run_dir / ".hydra" / "config.yaml"
        if saved.is_file():
            from omegaconf import OmegaConf
            return OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _natural(path: Path) -> list:
    """Sort key: job 10 after job 9."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(path)) if t]


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Each path that is a run dir, and every run dir below each path that is not, in natural order."""
    runs: list[Path] = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        else:
            runs.extend(sorted((m.parent for m in path.rglob("metrics.jsonl")), key=_natural))
    return list(dict.fromkeys(runs))


def labels(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (run dirs are often all called seed0 or a date)."""
    for k in range(1, max((len(d.parts) for d in run_dirs), default=1) + 1):
        tails = ["/".join(d.parts[-k:]) for d in run_dirs]
        if len(set(tails)) == len(tails):
            return tails
    return [str(d) for d in run_dirs]


_ABSENT = object()


def _value(flat: Mapping[str, Any], key: str) -> str:
    value = flat.get(key, _ABSENT)
    return "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True, default=str)


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The flattened keys ("algo.lr") whose values are not the same in every config, `IGNORED` aside,
    in the order the configs declare them."""
    flats = [flatten(c) for c in configs]
    keys = dict.fromkeys(k for f in flats for k in f)
    return [k for k in keys if k not in IGNORED and len({_value(f, k) for f in flats}) > 1]


def group_runs(run_dirs: Sequence[Path], configs: Sequence[Optional[Mapping[str, Any]]]) -> list[Group]:
    """Runs with equal values of the differing keys, in order of first appearance. A run without a
    config is a group of its own, labelled by its path."""
    known = [c for c in configs if c is not None]
    keys = differing_keys(known) or [k for k in NAMED_BY if known and k in flatten(known[0])]
    tails = labels(run_dirs)
    groups: dict[str, list[Path]] = {}
    for run, config, tail in zip(run_dirs, configs, tails):
        if config is None:
            label = tail
        else:
            flat = flatten(config)
            label = " ".join(f"{k}={show(flat[k]) if k in flat else '<absent>'}" for k in keys)
        groups.setdefault(label, []).append(run)
    return [Group(label, runs) for label, runs in groups.items()]
