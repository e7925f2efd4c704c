"""`env.vectorization`: async steps exactly the trajectories sync does (infos and final observations
included), its envs start afresh on resume, its workers leave the peer's signal handlers alone; EnvPool
where it is installed; the MuJoCo presets train on 2 peers (skipped without the mujoco extra)."""
import dataclasses
import importlib.util
import json
import signal

import numpy as np
import pytest
import torch

from p2prl import checkpoint
from p2prl.envs import make_vec_env
from p2prl.envstate import restorable, stack_size
from p2prl.runner import run

pytestmark = pytest.mark.timeout(180)
HAS_BOX2D = importlib.util.find_spec("Box2D") is not None
HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
HAS_ENVPOOL = importlib.util.find_spec("envpool") is not None
TINY = ["algo.num_steps=32", "algo.num_minibatches=2", "algo.update_epochs=1", "train.log_every_steps=64",
        "train.target_return=null"]


def env_cfg(compose, *overrides: str):
    return compose(*overrides).env


def trajectory(envs, actions: list) -> list:
    """(obs, reward, terminated, truncated, infos) of every step, copied."""
    out = []
    for a in actions:
        obs, rew, term, trunc, infos = envs.step(a)
        out.append((np.array(obs), np.array(rew), np.array(term), np.array(trunc), _plain(infos)))
    envs.close()
    return out


def _plain(infos: dict) -> dict:
    return {k: _plain(v) if isinstance(v, dict) else np.array(v) for k, v in infos.items()}


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b)


# CartPole's own sync path is its native vector env, whose one generator draws every env's state: with
# p2prl's frame stack (a wrapper) sync steps gymnasium copies, as async does. Short time limits make
# episodes both truncate and terminate within the steps.
CASES = [
    pytest.param(("env=cartpole", "env.frame_stack=2", "env.max_episode_steps=20"), id="cartpole-framestack"),
    pytest.param(("env=acrobot", "env.max_episode_steps=25"), id="acrobot"),
    pytest.param(("env=lunarlander", "env.max_episode_steps=60"), id="lunarlander",
                 marks=pytest.mark.skipif(not HAS_BOX2D, reason="needs the box2d extra")),
    pytest.param(("env=hopper", "env.max_episode_steps=40"), id="hopper",
                 marks=pytest.mark.skipif(not HAS_MUJOCO, reason="needs the mujoco extra")),
]


@pytest.mark.parametrize("overrides", CASES)
def test_async_steps_the_same_trajectories_as_sync(overrides, compose):
    sync_cfg = env_cfg(compose, *overrides)
    envs, first = make_vec_env(sync_cfg, 3, seed=11)
    space = envs.single_action_space
    space.seed(5)
    actions = [np.stack([space.sample() for _ in range(3)]) for _ in range(120)]
    want = trajectory(envs, actions)
    other, other_first = make_vec_env(dataclasses.replace(sync_cfg, vectorization="async"), 3, seed=11)
    got = trajectory(other, actions)
    np.testing.assert_array_equal(first, other_first)
    ends = np.array([t[2] | t[3] for t in want])
    assert ends[:-1].any()  # episodes ended before the last step: autoreset steps are compared too
    for w, g in zip(want, got):
        for x, y in zip(w, g):
            assert_same(x, y)


def test_which_envs_resume_exactly_and_the_frame_stack_each_kind_reports(compose):
    cases = {("env=cartpole",): (True, 1), ("env=cartpole", "env.frame_stack=3"): (False, 3),
             ("env=acrobot",): (True, 1), ("env=acrobot", "env.vectorization=async"): (False, 1),
             ("env=cartpole", "env.frame_stack=3", "env.vectorization=async"): (False, 3)}
    for overrides, (exact, k) in cases.items():
        envs, _ = make_vec_env(env_cfg(compose, *overrides), 2, seed=0)
        try:
            assert (restorable(envs), stack_size(envs)) == (exact, k), overrides
        finally:
            envs.close()


def test_async_leaves_the_peers_signal_handlers_in_place(compose):
    def handler(signum, frame):
        raise AssertionError("not called")
    before = signal.signal(signal.SIGTERM, handler)
    try:
        envs, _ = make_vec_env(env_cfg(compose, "env=acrobot", "env.vectorization=async"), 2, seed=0)
        envs.step(np.zeros(2, dtype=np.int64))
        envs.close()
        assert signal.getsignal(signal.SIGTERM) is handler  # the copy AsyncVectorEnv builds here kept it
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_async_run_resumes_with_its_envs_afresh(compose, tmp_path):
    def cfg(total: int):
        return compose("env=acrobot", "env.vectorization=async", "algo.num_envs=2", *TINY,
                       f"train.total_steps={total}", "checkpoint.every_steps=64")
    run_dir = tmp_path / "run"
    first = run(cfg(128), run_dir)
    assert first["final_step"] == 128 and first["config"]["env"]["vectorization"] == "async"
    summary = run(cfg(256), run_dir)
    assert summary["resumed_at_step"] == 128 and summary["final_step"] == 256


# -- EnvPool -------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_ENVPOOL, reason="envpool is not installed")
def test_envpool_autoresets_on_the_next_step_and_hands_out_fresh_arrays(compose):
    envs, first = make_vec_env(env_cfg(compose, "env=cartpole", "env.vectorization=envpool"), 4, seed=3)
    assert first.shape == (4, 4) and len({tuple(o) for o in first}) == 4  # every env seeded apart
    assert not restorable(envs) and stack_size(envs) == 1
    seen, ended = [], np.zeros(4, dtype=bool)
    for _ in range(60):  # always pushing right ends every episode within about ten steps
        obs, rew, term, trunc, _ = envs.step(np.ones(4, dtype=np.int64))
        seen.append((obs, obs.copy()))
        if ended.any():  # the step after an end resets: reward 0, not an end
            assert (rew[ended] == 0).all() and not (term | trunc)[ended].any()
        ended = term | trunc
    assert all(np.array_equal(a, b) for a, b in seen)  # no later step overwrote an earlier one's array
    envs.close()


@pytest.mark.skipif(not HAS_ENVPOOL, reason="envpool is not installed")
def test_ppo_trains_on_envpool_on_two_peers(tmp_path, cli):
    run_dir = tmp_path / "run"
    out = cli(["env=cartpole", "env.vectorization=envpool", "algo.num_envs=2", *TINY, "train.total_steps=256",
               f"hydra.run.dir={run_dir}"], nproc=2, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["final_step"] == 256 and s["config"]["env"]["vectorization"] == "envpool" and s["episodes"] > 0


# -- MuJoCo presets ------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MUJOCO, reason="needs the mujoco extra")
@pytest.mark.parametrize("env,nproc", [("halfcheetah", 2), ("hopper", 2), ("walker2d", 1)])
def test_mujoco_preset_smoke(env, nproc, tmp_path, cli):
    run_dir = tmp_path / "run"
    out = cli([f"env={env}", "algo.num_steps=64", "algo.num_minibatches=4", "algo.update_epochs=1",
               "train.total_steps=256", "train.log_every_steps=128", "train.target_return=null",
               f"hydra.run.dir={run_dir}"], nproc=nproc, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["final_step"] == 256 and s["updates"] > 0 and s["world_size"] == nproc
    assert s["config"]["algo"]["norm_obs"] and s["config"]["algo"]["norm_reward"]
    state = checkpoint.load(checkpoint.shared_path(run_dir / "checkpoints", 256))
    if env == "halfcheetah":  # never ends early: every observation counts, from every peer
        assert float(state["obs_norm"]["count"]) == 256
    assert torch.isfinite(state["obs_norm"]["mean"]).all() and float(state["ret_norm"]["count"]) > 0
