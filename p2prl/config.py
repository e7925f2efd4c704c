"""Typed run configuration: the schema of the composed Hydra config, and `upgrade` of saved ones.

Every default lives once, in conf/ (each key commented there). The dataclasses below declare each key's
type and check its value (`p2prl.checks`) but hold no default, so a config can only come from composing
conf/ (`p2prl.precheck.compose`), or from a dict that names every key. Each algorithm's section is
declared in its own file (`p2prl.algos`); checks that need a registry run from it, in `p2prl.precheck`.
A little over 250 lines: the five run-wide sections and the upgrade of saved configs read together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from p2prl.checks import ConfigError, choice, fields, is_number, unit


def conf_dir() -> Path:
    """conf/: inside the package when installed (p2prl/conf), next to it in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"p2prl: no conf/config.yaml next to {here}")


# -- the run-wide sections -------------------------------------------------------------------------
OBJECTIVES = ("episode_return_mean", "best_eval_return", "steps_to_target")
@dataclass
class EnvConfig:
    name: str
    id: str
    kwargs: dict
    max_episode_steps: Optional[int]
    target_return: Optional[float]
    wrapper: str
    frame_stack: Optional[int]
    terminal_on_life_loss: bool
    vectorization: str

    def __post_init__(self) -> None:
        if not isinstance(self.kwargs, dict):
            raise ConfigError("env.kwargs", self.kwargs, "must be a mapping of gymnasium.make keyword arguments")
        if self.id == "???":
            raise ConfigError("env.id", self.id, f"env={self.name} needs the gymnasium id to train on, "
                                                 "e.g. env.id=CarRacing-v3 or env.id=module:EnvId")
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError("env.id", self.id, "must be a gymnasium env id such as CartPole-v1")
        fields(self, "env.", optional_positive_int=("max_episode_steps", "frame_stack"),
               boolean=("terminal_on_life_loss",))
        choice("env.wrapper", self.wrapper, ("none", "atari"))
        choice("env.vectorization", self.vectorization, ("sync", "async", "envpool"))
        if self.vectorization == "envpool" and (self.wrapper != "none" or self.frame_stack is not None):
            used = f"env.wrapper={self.wrapper}" if self.wrapper != "none" else f"env.frame_stack={self.frame_stack}"
            raise ConfigError("env.vectorization", "envpool", f"steps EnvPool's own envs, without p2prl's wrappers; "
                                                             f"allowed here ({used}): sync, async")
        if self.terminal_on_life_loss and self.wrapper != "atari":
            raise ConfigError("env.terminal_on_life_loss", True, "needs env.wrapper=atari (lives are an Atari notion); "
                                                                "allowed here: false")


@dataclass
class TrainConfig:
    total_steps: int
    target_return: Optional[float]
    return_window: int
    log_every_steps: int
    torch_threads: int
    pin_cores: bool
    resume: str
    max_skipped_updates: int
    eval_every_steps: Optional[int]  # null or 0: no evaluation during training
    eval_episodes: int
    objective: str  # what a job returns to a sweeper (p2prl.search.objective)
    profile_iterations: Optional[int]  # null: no profiler trace

    def __post_init__(self) -> None:
        fields(self, "train.", boolean=("pin_cores",), optional_nonneg_int=("eval_every_steps",), positive_int=(
            "total_steps", "return_window", "log_every_steps", "torch_threads", "max_skipped_updates",
            "eval_episodes"), optional_positive_int=("profile_iterations",))
        choice("train.objective", self.objective, OBJECTIVES)
        if self.objective == "best_eval_return" and not self.eval_every_steps:
            raise ConfigError("train.objective", self.objective, "needs evaluations during training "
                                                                 "(train.eval_every_steps); allowed here: "
                                                                 "episode_return_mean, steps_to_target")
        if self.objective == "steps_to_target" and self.target_return is None:
            raise ConfigError("train.objective", self.objective, "needs a train.target_return; allowed here: "
                                                                 "episode_return_mean, best_eval_return")
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ConfigError("train.resume", self.resume, "allowed: auto, never, or the path of a run dir "
                                                           "or checkpoint")
        if self.target_return is not None and not is_number(self.target_return, False):
            raise ConfigError("train.target_return", self.target_return, "must be a number or null")


@dataclass
class CommConfig:
    strategy: str
    backend: str
    timeout_s: float
    check_every: int
    overlap: bool
    topology: str
    graph: str
    compress: str
    compress_rank: int
    average_every: int
    outer_lr: float
    outer_momentum: float
    straggler_frac: Optional[float]
    min_rollout_frac: float

    def __post_init__(self) -> None:
        fields(self, "comm.", boolean=("overlap",), positive=("timeout_s", "outer_lr"),
               positive_int=("check_every", "average_every", "compress_rank"), unit_open=("min_rollout_frac",))
        choice("comm.backend", self.backend, ("auto", "gloo", "nccl"))
        choice("comm.topology", self.topology, ("auto", "flat", "hierarchical"))
        if not is_number(self.outer_momentum, False) or not 0 <= self.outer_momentum < 1:
            raise ConfigError("comm.outer_momentum", self.outer_momentum, "must be in [0, 1)")
        if self.straggler_frac is not None:
            unit("comm.straggler_frac", self.straggler_frac, low_open=True)
        # What depends on the strategy (its name, overlap, compress, graph): p2prl.sync.table's checks.


@dataclass
class CheckpointConfig:
    every_steps: Optional[int]
    keep: int
    replay: bool

    def __post_init__(self) -> None:
        fields(self, "checkpoint.", optional_positive_int=("every_steps",), boolean=("replay",))
        if not is_number(self.keep, True) or self.keep < 2:
            # Rank 0 prunes without waiting for the other ranks' files of the newest set: keeping one
            # more guarantees a complete set survives a crash during a save.
            raise ConfigError("checkpoint.keep", self.keep, "must be an integer >= 2")


@dataclass
class LoggerConfig:
    name: str  # tensorboard | wandb (metrics.jsonl and TensorBoard are always written)
    project: str
    entity: Optional[str]
    run_name: Optional[str]
    group: Optional[str]
    tags: list
    mode: Optional[str]

    def __post_init__(self) -> None:
        choice("logger.name", self.name, ("tensorboard", "wandb"))
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError("logger.project", self.project, "must be a W&B project name")
        for key in ("entity", "run_name", "group"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"logger.{key}", value, "must be a name or null")
        if not isinstance(self.tags, list) or not all(isinstance(t, str) and t for t in self.tags):
            raise ConfigError("logger.tags", self.tags, "must be a list of names, e.g. [baseline,cartpole]")
        if self.mode is not None:
            choice("logger.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class RunConfig:
    seed: int
    device: str  # auto | cpu | cuda
    algo: Any  # the algorithm's own section, by algo.name (see p2prl.algos.REGISTRY)
    env: EnvConfig
    train: TrainConfig
    comm: CommConfig
    checkpoint: CheckpointConfig
    logger: LoggerConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())


SECTIONS = {"env": EnvConfig, "train": TrainConfig, "comm": CommConfig, "checkpoint": CheckpointConfig,
            "logger": LoggerConfig}


def section(cls: type, key: str, values: Any) -> Any:
    """A section's dataclass from its mapping: every key known, every key present."""
    if not isinstance(values, dict):
        raise ConfigError(key, values, "must be a config section")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if k not in names:
            raise ConfigError(f"{key}.{k}", values[k], f"unknown key; allowed: {', '.join(sorted(names))}")
    missing = [k for k in names if k not in values]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}", None, f"missing; every key of conf/ must be set "
                                                       f"(missing: {', '.join(missing)})")
    return cls(**values)


# Keys added to conf/ after runs were saved, with the value that behaves as those runs did: a saved
# config (summary.json, a checkpoint's) without them means that value (an algorithm's: its spec's
# `added_keys`). A section in ADDED_SECTIONS came later as a whole: all of its ADDED_KEYS.
ADDED_KEYS = {"env": {"wrapper": "none", "frame_stack": None, "terminal_on_life_loss": False,
                      "vectorization": "sync"},
              "train": {"eval_every_steps": None, "eval_episodes": 10, "objective": "episode_return_mean",
                        "profile_iterations": None},
              "comm": {"graph": "ring", "compress_rank": 4},
              "logger": {"name": "tensorboard", "project": "p2prl", "entity": None, "run_name": None, "group": None,
                         "tags": [], "mode": None}}
ADDED_SECTIONS = ("logger",)
# Before `comm.graph`, gossip's graph was `comm.topology`: a saved topology of ring or hypercube (values
# only gossip took) is its graph, and its transport's topology the default, auto.
OLD_GRAPHS = ("ring", "hypercube")


def upgrade(raw: Mapping[str, Any], algo_sections: Mapping[str, type],
            algo_added: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`raw` with the added keys its sections lack (where the schema has them; `algo_added`: each
    algorithm's, `p2prl.algos.added_keys()`), and an OLD_GRAPHS topology moved to `comm.graph`."""
    out = dict(raw)
    comm = out.get("comm")
    if isinstance(comm, dict) and "graph" not in comm and comm.get("topology") in OLD_GRAPHS:
        out["comm"] = {**comm, "graph": comm["topology"], "topology": "auto"}
    algo = raw.get("algo")
    name = algo.get("name") if isinstance(algo, dict) else None
    schemas = {**SECTIONS, "algo": algo_sections.get(name)}
    for key, added in {**ADDED_KEYS, "algo": algo_added.get(name, {})}.items():
        section, schema = out.get(key, {} if key in ADDED_SECTIONS else None), schemas[key]
        if isinstance(section, dict) and schema is not None:
            names = {f.name for f in dataclasses.fields(schema)}
            out[key] = {**{k: v for k, v in added.items() if k in names}, **section}
    return out


def build_config(raw: Mapping[str, Any], algo_sections: Mapping[str, type]) -> RunConfig:
    """The typed config of a resolved config dict (no `hydra` key); `algo_sections` maps each
    algorithm name to its section's dataclass (`p2prl.algos.algo_sections()`)."""
    seed = raw.get("seed")
    if not is_number(seed, True) or not 0 <= seed < 2 ** 31:
        # numpy's legacy seeding takes < 2**32, and peers add rank and env offsets to the seed.
        raise ConfigError("seed", seed, "must be an integer in [0, 2**31)")
    algo = raw.get("algo") or {}
    name = algo.get("name") if isinstance(algo, dict) else None
    choice("algo.name", name, tuple(sorted(algo_sections)))
    unknown = sorted(set(raw) - {"seed", "device", "algo", *SECTIONS})
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], f"unknown key; allowed: seed, device, algo, {', '.join(SECTIONS)}")
    choice("device", raw.get("device"), ("auto", "cpu", "cuda"))
    return RunConfig(seed=seed, device=raw["device"], algo=section(algo_sections[name], "algo", algo),
                     **{k: section(cls, k, raw.get(k)) for k, cls in SECTIONS.items()})


# -- the one flattening and hash of a config -------------------------------------------------------
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; empty mappings stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """16 hex digits identifying a config; `train.resume` (where to resume from) does not count."""
    flat = {k: v for k, v in flatten(config).items() if k != "train.resume"}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]
