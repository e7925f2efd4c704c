"""Env steps per second per core, by `env.vectorization`: `python -m p2prl.bench --stepping [ENV ...]`.

For every env preset and number of envs, this process is pinned to `cores` cores, as a pinned peer is,
so that AsyncVectorEnv's workers and EnvPool's threads (which inherit the affinity) share them; a vector
env of each kind is built by p2prl's own `make_vec_env` (the preset's wrappers included), stepped with
random actions drawn beforehand for `seconds`, and closed. The figure is env steps/s divided by the
cores: what a peer's core yields for stepping alone, without the policy. A kind the env cannot use
(EnvPool not installed, a preset with p2prl's wrappers, a missing extra) gets its one-line reason.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import numpy as np

ENVS = ("cartpole", "lunarlander", "halfcheetah", "breakout")
KINDS = ("sync", "async", "envpool")
NUM_ENVS = (1, 4, 16)


def steps_per_second(env_cfg: Any, num_envs: int, seconds: float) -> float:
    """Env steps/s (all envs) of `num_envs` copies stepped for about `seconds` after one warm-up step."""
    from p2prl.envs import make_vec_env
    envs, _ = make_vec_env(env_cfg, num_envs, seed=0)
    try:
        space = envs.single_action_space
        space.seed(0)
        actions = [np.stack([space.sample() for _ in range(num_envs)]) for _ in range(64)]
        envs.step(actions[0])
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            envs.step(actions[n % len(actions)])
            n += 1
        return n * num_envs / elapsed
    finally:
        envs.close()


def measure(env_names: list[str], num_envs: list[int], seconds: float, cores: int) -> dict[str, Any]:
    """{"cores", "seconds", "rows": [{"env", "num_envs", <kind>: steps/s per core or the reason}]}."""
    from p2prl.checks import ConfigError
    from p2prl.precheck import compose
    allowed = sorted(os.sched_getaffinity(0))
    cores = min(cores, len(allowed))
    os.sched_setaffinity(0, allowed[:cores])
    try:
        rows = []
        for name in env_names:
            base = compose(f"env={name}").env
            for n in num_envs:
                row: dict[str, Any] = {"env": name, "num_envs": n}
                for kind in KINDS:
                    try:
                        row[kind] = steps_per_second(dataclasses.replace(base, vectorization=kind), n, seconds) / cores
                    except ConfigError as e:
                        row[kind] = str(e)
                rows.append(row)
        return {"cores": cores, "seconds": seconds, "rows": rows}
    finally:
        os.sched_setaffinity(0, allowed)


def _cell(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, float) else "-"


def format_stepping(m: dict[str, Any]) -> str:
    """The table (steps/s per core), then each reason a kind was not measured, once."""
    from p2prl.bench.tables import table
    head = table(("env", "num_envs", *(f"{k} steps/s/core" for k in KINDS)),
                 [(r["env"], str(r["num_envs"]), *(_cell(r[k]) for k in KINDS)) for r in m["rows"]])
    reasons: dict[str, Optional[str]] = {}
    for r in m["rows"]:
        for k in KINDS:
            if isinstance(r[k], str):
                reasons.setdefault(f"{r['env']} {k}: {r[k]}")
    notes = "".join(f"\n- {line}" for line in reasons)
    text = f"{m['cores']} core(s), {m['seconds']:g} s per measurement:\n{head}"
    return text + (f"\nnot measured:{notes}" if notes else "")
