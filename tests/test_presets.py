"""A smoke test of every tuned preset (conf/tuned/<algo>_<env>.yaml): two iterations at the preset's own
shapes and hyperparameters (only the step budget shrunk, and DQN, SAC and TD3 learning from their second iteration), in
one process. Presets whose env needs an extra that is not installed are skipped."""
import importlib.util
import json
import math

import pytest
from omegaconf import OmegaConf

from p2prl.bench.plans import ENV_EXTRAS, EXTRAS
from p2prl.config import conf_dir
from p2prl.runner import run

pytestmark = pytest.mark.timeout(240)
PRESETS = sorted(p.stem for p in (conf_dir() / "tuned").glob("*.yaml"))
EXTRA = {env: EXTRAS[extra] for env, extra in ENV_EXTRAS.items()}  # env preset -> the module its extra installs


def iteration_steps(algo: dict) -> int:
    """Env steps one peer takes per iteration of the algorithm."""
    per_env = {"ppo": "num_steps", "a2c": "num_steps", "dqn": "train_freq", "sac": "train_freq", "td3": "train_freq",
               "qlearning": "sync_every"}[algo["name"]]
    return algo["num_envs"] * algo[per_env]


def test_every_preset_is_covered_here():
    assert len(PRESETS) >= 29 and {"ppo_cartpole", "dqn_cartpole", "ppo_lunarlander", "ppo_halfcheetah",
                                   "qlearning_taxi", "dqn_breakout", "sac_pendulum", "td3_walker2d",
                                   "sac_lunarlandercontinuous"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_smoke(preset, compose, tmp_path):
    algo, env = preset.split("_", 1)
    module = EXTRA.get(env)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"env={env} needs the {module} module's extra")
    tuned = OmegaConf.to_container(OmegaConf.load(conf_dir() / "tuned" / f"{preset}.yaml"))
    cfg = compose(f"algo={algo}", f"env={env}")
    steps = iteration_steps(cfg.to_dict()["algo"])
    overrides = [f"algo={algo}", f"env={env}", f"train.total_steps={2 * steps}", "train.target_return=null",
                 f"train.log_every_steps={steps}"]
    if algo in ("dqn", "sac", "td3"):  # replay: learning from the second iteration on
        overrides.append(f"algo.learning_starts={steps}")
    cfg = compose(*overrides)
    shrunk = {o.split("=")[0] for o in overrides}
    for key, value in tuned["algo"].items():  # the preset's own values, not conf/algo's defaults
        assert f"algo.{key}" in shrunk or cfg.to_dict()["algo"][key] == value, key
    summary = run(cfg, tmp_path / "run")
    assert summary["final_step"] == 2 * steps and summary["world_size"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 2 * steps
    losses = {k: v for k, v in rows[-1].items() if k.startswith("loss_")}
    if algo != "qlearning":  # the gradient algorithms learned in the second iteration, finitely
        assert rows[-1]["updates"] > 0 and losses, rows[-1]
    assert all(math.isfinite(v) for v in losses.values()), losses
