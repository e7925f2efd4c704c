"""Where the seconds before the first env step and after the last one go: `python -m p2prl.bench --startup`.

Each probe is a whole command timed from launch to exit, `repeats` times, interleaved (every probe once,
then again), on an otherwise idle machine:

- `python`: the interpreter alone (`python -c pass`);
- `import torch`, `import p2prl.train`: what every peer (and torchrun's agent) imports;
- `torchrun alone`: torchrun's agent with 2 workers that do nothing (`--no-python true`): its own imports,
  the rendezvous, starting and watching the workers and shutting down, the fixed cost of any torchrun job;
- `p2prl 1 peer`, `p2prl 2 peers`: CartPole PPO for 256 global steps (one or two iterations); the
  seconds inside the training loop (summary.json's `loop_s`) are subtracted, leaving start-up and
  shut-down.

The gap between the two p2prl probes is what 2 peers pay over 1 before and after training; next to
`torchrun alone` less `python`, it says how much of that gap is torchrun's own.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

TINY = ["algo=ppo", "env=cartpole", "train.total_steps=256", "train.target_return=null", "checkpoint.every_steps=null"]


def probes(p2prl_cmd: Callable[[int, list[str]], list[str]], run_dir: Path) -> dict[str, list[str]]:
    """{probe: command}; the p2prl probes write their run dir under `run_dir`."""
    py = sys.executable
    torchrun = p2prl_cmd(2, [])
    torchrun = torchrun[:torchrun.index("-m", 3)] + ["--no-python", "true"]
    return {"python": [py, "-c", "pass"],
            "import torch": [py, "-c", "import torch"],
            "import p2prl.train": [py, "-c", "import p2prl.train"],
            "torchrun alone": torchrun,
            "p2prl 1 peer": p2prl_cmd(1, [*TINY, f"hydra.run.dir={run_dir / 'p1'}"]),
            "p2prl 2 peers": p2prl_cmd(2, [*TINY, f"hydra.run.dir={run_dir / 'p2'}"])}


def loop_seconds(run_dir: Path) -> float:
    """The training loop's seconds of a finished run (0 when it wrote no summary)."""
    try:
        return float(json.loads((run_dir / "summary.json").read_text())["loop_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


def measure(execute: Callable[[list[str], Path, float], tuple[int, float, bool]],
            p2prl_cmd: Callable[[int, list[str]], list[str]], out: Path, repeats: int,
            prepare: Callable[[list[str]], list[str]] = lambda c: c) -> dict[str, Any]:
    """{"repeats", "rows": [{"probe", "seconds": [...], "median", "loop_s"}], "derived": {...}}.
    `execute(cmd, log, timeout)` runs one command; `prepare` fills in its port."""
    seconds: dict[str, list[float]] = {}
    loops: dict[str, list[float]] = {}
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for name, cmd in probes(p2prl_cmd, Path(tmp)).items():
                rc, s, _ = execute(prepare(cmd), out / "logs" / f"startup_{name.replace(' ', '_')}_{i}.log", 120.0)
                if rc != 0:
                    raise RuntimeError(f"startup probe {name!r} exited {rc}: see {out / 'logs'}")
                loop = loop_seconds(Path(tmp) / ("p1" if "1 peer" in name else "p2")) if name.startswith("p2prl") else 0.0
                seconds.setdefault(name, []).append(s - loop)
                loops.setdefault(name, []).append(loop)
    rows = [{"probe": name, "seconds": v, "median": statistics.median(v), "loop_s": statistics.median(loops[name])}
            for name, v in seconds.items()]
    med = {r["probe"]: r["median"] for r in rows}
    derived = {"two_peers_extra_s": med["p2prl 2 peers"] - med["p2prl 1 peer"],
               "torchrun_own_s": med["torchrun alone"] - med["python"]}
    return {"repeats": repeats, "rows": rows, "derived": derived}


def format_startup(m: dict[str, Any]) -> str:
    from p2prl.bench.tables import table
    body = table(("probe", "launch->exit s, median", "min-max", "training loop s"),
                 [(r["probe"], f"{r['median']:.2f}", f"{min(r['seconds']):.2f}-{max(r['seconds']):.2f}",
                   f"{r['loop_s']:.2f}" if r["loop_s"] else "-") for r in m["rows"]])
    d = m["derived"]
    return (f"{m['repeats']} repeats, start-up and shut-down only (the p2prl rows less their training loop):\n{body}\n"
            f"2 peers over 1 peer: {d['two_peers_extra_s']:+.2f} s; torchrun's own cost (torchrun alone - python): "
            f"{d['torchrun_own_s']:.2f} s")
