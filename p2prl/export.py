"""Policies that leave the trainer:
`python -m p2prl.export RUN_DIR --format onnx|pt2|npy [--checkpoint C] [--out FILE]` (or `p2prl export`).

onnx and pt2 hold the greedy policy of a network algorithm (PPO/A2C, DQN; the registry's
`greedy_module`), what `p2prl.load(run).act(obs, deterministic=True)` computes, as one graph: the
observation of `policy.make_env()` (its wrappers included: Atari's stacked 84x84 frames as uint8) in the
observation space's dtype, a batch of any size (B, *obs_shape), goes in as `obs`; `action` comes out,
(B,) int64 argmax indices for Discrete actions, (B, *action_shape) float32 within the bounds for Box
ones. The observation normalization of the checkpoint (`algo.norm_obs`), the scaling of pixels and the
bounds are inside. `pt2` is torch.export's ExportedProgram (`torch.export.load(f).module()`), `onnx` the
same module through torch's dynamo ONNX exporter (the onnx extra; run it with onnxruntime). npy is
tabular Q-learning's Q table (n_states, n_actions): act with `table[obs].argmax()`.

Metadata (algo, env, both spaces, p2prl version, the checkpoint's step) travels inside the file: ONNX
metadata_props (every value a string: numbers and spaces as JSON), pt2 the extra file `p2prl.json`, npy a
sidecar JSON beside it (`<out>` with the suffix .json). The file goes to `--out`, by default
RUN_DIR/export/<checkpoint>.<format> (`step_<N>.onnx`, `best.pt2`); nothing else of the run is touched.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import gymnasium as gym
import numpy as np
import torch

from p2prl import __version__, algos
from p2prl import checkpoint as ckpt
from p2prl.atomic import write_atomic, write_json_atomic
from p2prl.checks import ConfigError
from p2prl.policy import Policy, load, load_run_config

FORMATS = ("onnx", "pt2", "npy")
NETWORK_FORMATS = ("onnx", "pt2")
METADATA = "p2prl.json"  # pt2's extra file
ONNX_MODULES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports; onnxruntime only runs it

EXAMPLE = """examples:
  {prog} outputs/ppo-cartpole/<run> --format onnx                   # -> RUN_DIR/export/step_<N>.onnx
  {prog} outputs/dqn-breakout/<run> --format pt2 --checkpoint best --out breakout.pt2
  {prog} outputs/qlearning-taxi/<run> --format npy                  # the Q table, and step_<N>.json

Acting with the file, outside p2prl (obs: one observation of the run's env, batched as obs[None]):
  onnxruntime.InferenceSession("policy.onnx").run(None, {{"obs": obs[None]}})[0][0]
  torch.export.load("policy.pt2").module()(torch.as_tensor(obs[None]))[0]
  numpy.load("policy.npy")[obs].argmax()"""


def export(run_dir: Union[str, Path], fmt: str, checkpoint: Union[str, Path] = "latest",
           out: Optional[Union[str, Path]] = None) -> tuple[Path, dict]:
    """Write the policy of a run's checkpoint ("latest", "best" or a file) as `fmt` to `out`; its path
    and metadata. Raises ConfigError (one line) for what cannot be exported, before writing anything."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"allowed: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    spec = algos.spec(cfg.algo.name)
    allowed = NETWORK_FORMATS if spec.greedy_module is not None else ("npy",)
    if fmt not in allowed:
        what = "a network" if spec.greedy_module is not None else "a table, not a network"
        raise ConfigError("--format", fmt, f"algo={cfg.algo.name} learns {what}; allowed: {', '.join(allowed)}")
    if fmt == "onnx":
        missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("--format", fmt, f"needs the onnx extra ({', '.join(missing)} missing): "
                                               'pip install -e ".[onnx]"; allowed here: pt2')
    if out is not None and Path(out).is_dir():
        raise ConfigError("--out", str(out), "is a directory; allowed: the path of the file to write")
    policy = load(run_dir, checkpoint)
    state = ckpt.load(policy.checkpoint)
    meta = metadata(policy, state, fmt)
    out = Path(out) if out is not None else run_dir / "export" / f"{policy.checkpoint.stem}.{fmt}"
    if fmt == "npy":
        if "q_table" not in state:
            raise ConfigError("--format", fmt, f"{policy.checkpoint} holds no Q table (algo={cfg.algo.name} names "
                                               "no greedy_module in the registry)")
        write_atomic(out, lambda f: np.save(f, state["q_table"].numpy()))
        write_json_atomic(out.with_suffix(".json"), meta)
        return out, meta
    module = spec.greedy_module(policy.config.algo, state, policy.observation_space, policy.action_space)
    example, dynamic = traced_inputs(policy.observation_space)
    if fmt == "pt2":
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
        write_atomic(out, lambda f: torch.export.save(program, f, extra_files={METADATA: json.dumps(meta)}))
    else:
        write_atomic(out, onnx_bytes(module, example, dynamic, meta))
    return out, meta


def traced_inputs(obs_space: gym.Space) -> tuple[tuple[torch.Tensor], tuple[dict]]:
    """An example batch of observations for torch.export, and its batch axis marked dynamic ("batch")."""
    dtype = torch.from_numpy(np.zeros(0, obs_space.dtype)).dtype
    # A batch of 2: a batch of 1 would be specialized into the graph as a constant.
    return (torch.zeros((2, *obs_space.shape), dtype=dtype),), ({0: torch.export.Dim("batch")},)


def onnx_bytes(module: torch.nn.Module, example: tuple, dynamic: tuple, meta: dict) -> bytes:
    """The ONNX model of `module`, input `obs`, output `action`, with `meta` in its metadata_props.
    torch's dynamo exporter (torch.export, then onnxscript): the default since torch 2.9, where the
    TorchScript-based one (dynamo=False) warns that it is legacy. Given the module rather than an
    ExportedProgram, it names the batch axis after the Dim ("batch") instead of a symbol such as "s79"."""
    import onnx
    with _quiet():
        program = torch.onnx.export(module, example, input_names=["obs"], output_names=["action"],
                                    dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
    model = program.model_proto
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporter logs a warning for each torchvision op it cannot register (torchvision is no
    # dependency of p2prl) and trips deprecation warnings inside torch: none of them is the user's.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def metadata(policy: Policy, state: dict, fmt: str) -> dict:
    """What the file says of itself: the algorithm, the env, both spaces, the version, the step."""
    cfg = policy.config
    return {"format": fmt, "algo": cfg.algo.name, "env": cfg.env.name, "env_id": cfg.env.id,
            "observation_space": describe(policy.observation_space), "action_space": describe(policy.action_space),
            "obs_norm": "obs_norm" in state, "p2prl_version": __version__, "step": state.get("step"),
            "checkpoint": policy.checkpoint.name}


def describe(space: gym.Space) -> dict[str, Any]:
    """A space as JSON: Discrete's n; Box's shape, dtype and bounds (one number where every element has
    the same bound, else nested lists; +-infinity as the strings "inf" and "-inf": JSON has no infinity)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "dtype": "int64"}
    return {"type": type(space).__name__, "shape": list(space.shape), "dtype": str(space.dtype),
            "low": _bound(space.low), "high": _bound(space.high)}


def _bound(a: np.ndarray) -> Any:
    a = np.asarray(a, dtype=np.float64)
    if a.size and (a == a.flat[0]).all():
        a = a.flat[0]
    return _finite(a.tolist())


def _finite(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def main(argv: Optional[list[str]] = None, prog: str = "python -m p2prl.export") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a run's greedy policy as one file that acts without p2prl: ONNX (onnxruntime) or "
                    "torch.export's .pt2 for PPO, A2C and DQN (input: a batch of the env's observations, output: "
                    "the actions), numpy's .npy for tabular Q-learning (the Q table).",
        epilog=EXAMPLE.format(prog=prog))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--format", required=True, metavar="{onnx,pt2,npy}",
                   help="onnx (the onnx extra), pt2 (torch.export) or npy (tabular Q-learning's table)")
    p.add_argument("--checkpoint", default="latest",
                   help="latest (default), best (checkpoints/best.pt, kept by train.eval_every_steps) or a file")
    p.add_argument("--out", type=Path, help="the file to write (default RUN_DIR/export/<checkpoint>.<format>)")
    a = p.parse_args(argv)
    try:
        out, meta = export(a.run_dir, a.format, a.checkpoint, a.out)
    except ConfigError as e:
        print(f"p2prl: error: {e}", file=sys.stderr)
        return 2
    sidecar = f" and {out.with_suffix('.json')}" if a.format == "npy" else ""
    sys.stdout.write(f"{out}{sidecar}: algo={meta['algo']} on {meta['env_id']}, step {meta['step']}; {signature(meta)}\n")
    return 0


def signature(meta: dict) -> str:
    """What goes in and comes out, in words: `obs (B, 4) float32 -> action (B,) int64`."""
    obs, act = meta["observation_space"], meta["action_space"]
    if meta["format"] == "npy":
        return f"Q table ({obs['n']}, {act['n']}): act with table[obs].argmax()"
    dims = ", ".join(map(str, obs["shape"]))
    out = "(B,) int64" if act["type"] == "Discrete" else f"(B, {', '.join(map(str, act['shape']))}) float32"
    return f"obs (B, {dims}) {obs['dtype']} -> action {out}"


if __name__ == "__main__":
    sys.exit(main())
