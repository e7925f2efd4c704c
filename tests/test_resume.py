"""Checkpoints and resuming: env/RNG state round trips, a truncated newest checkpoint, another number of
peers, and a peer killed with SIGKILL under `torchrun --max-restarts` ending bit-identical to a run
that was never interrupted."""
import dataclasses
import json
import logging
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prl import checkpoint
from p2prl.envs import make_vec_env
from p2prl.envstate import load_vec_env_state, vec_env_state
from p2prl.metrics import drop_rows_after
from p2prl.runner import run

pytestmark = pytest.mark.timeout(180)
PPO = ("algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2", "algo.lr=1e-3")
DQN = ("algo=dqn", "algo.num_envs=2", "algo.buffer_size=500", "algo.batch_size=16", "algo.learning_starts=32",
       "algo.target_update_interval=20")


@pytest.fixture
def small(compose):
    """A small run's config: `small(total_steps, *overrides)` (PPO unless the overrides say dqn)."""
    def make(total_steps: int, *overrides: str):
        return compose("seed=1", *(overrides or PPO), f"train.total_steps={total_steps}", "train.log_every_steps=64",
                       "train.target_return=null", "checkpoint.every_steps=64", "comm.timeout_s=30")
    return make


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1"])
def test_env_state_round_trip_continues_the_same_episodes(env_id, tmp_path, compose):
    cfg = dataclasses.replace(compose().env, id=env_id)
    envs, _ = make_vec_env(cfg, 3, seed=5)
    actions = [envs.action_space.sample() for _ in range(400)]
    for a in actions[:200]:
        envs.step(a)
    checkpoint.save_atomic({"env": vec_env_state(envs)}, tmp_path / "env.pt")
    expected = [envs.step(a) for a in actions[200:]]
    other, _ = make_vec_env(cfg, 3, seed=99)
    load_vec_env_state(other, checkpoint.load(tmp_path / "env.pt")["env"])
    for want, got in zip(expected, (other.step(a) for a in actions[200:])):
        for w, g in zip(want[:4], got[:4]):
            assert np.array_equal(w, g)


def test_rng_state_round_trip(tmp_path):
    import random
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_drop_rows_after_keeps_earlier_rows_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 64}\n{"step": 128}\n{"step": 192}\n{"step": 2')
    drop_rows_after(path, 128)
    assert path.read_text() == '{"step": 64}\n{"step": 128}\n'


def test_run_dir_id_is_the_torchrun_agents_start_time_without_a_run_id(monkeypatch):
    import p2prl.host as host
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    ids = []
    for _ in range(2):  # a restarted worker of the same agent computes it afresh
        monkeypatch.setattr(host, "_RUN_ID", None)
        ids.append(host.run_id())
    assert ids[0] == ids[1] == host._agent_started().strftime("%Y-%m-%d_%H-%M-%S_%f")[:-3]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setattr(host, "_RUN_ID", None)
    assert host.run_id() == "job-7"


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, small):
    run_dir = tmp_path / "run"
    first = run(small(256), run_dir)
    kept = checkpoint.list_steps(run_dir / "checkpoints")
    assert len(kept) == 2 and kept[-1] == first["final_step"]  # checkpoint.keep=2
    previous, newest = kept[0], checkpoint.shared_path(run_dir / "checkpoints", kept[1])
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.INFO):
        summary = run(small(320), run_dir)
    assert f"{newest.name} is unreadable" in caplog.text
    assert f"resumed from {checkpoint.shared_path(run_dir / 'checkpoints', previous)} at step {previous}" in caplog.text
    assert summary["resumed_at_step"] == previous and summary["final_step"] == summary["config"]["train"]["total_steps"]
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == summary["final_step"]


def test_a_gossip_checkpoint_saved_before_comm_graph_resumes_and_loads(tmp_path, caplog, small):
    from p2prl.policy import load
    run_dir = tmp_path / "run"
    first = run(small(128, *PPO, "comm=gossip", "comm.graph=hypercube"), run_dir)
    folder, step = run_dir / "checkpoints", first["final_step"]
    for path in (checkpoint.shared_path(folder, step), run_dir / "summary.json"):  # as earlier versions saved them
        saved = checkpoint.load(path) if path.suffix == ".pt" else json.loads(path.read_text())
        comm = saved["config"]["comm"]
        comm["topology"] = comm.pop("graph")
        checkpoint.save_atomic(saved, path) if path.suffix == ".pt" else path.write_text(json.dumps(saved))
    assert load(run_dir).config.comm.graph == "hypercube"
    with caplog.at_level(logging.INFO):
        summary = run(small(256, *PPO, "comm=gossip", "comm.graph=hypercube"), run_dir)
    assert summary["resumed_at_step"] == step and summary["final_step"] == 256
    changed = [r.getMessage() for r in caplog.records if "resuming with a changed config" in r.getMessage()]
    assert changed and "train.total_steps" in changed[0] and "comm." not in changed[0]  # read as this config
    assert "only the shared state carries over" not in caplog.text  # each rank's own state carried over too


def _resume_on_two(rank: int, cfg, run_dir: Path):
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("p2prl").addHandler(handler)
    logging.getLogger("p2prl").setLevel(logging.INFO)
    return run(cfg, run_dir), records


@pytest.mark.parametrize("algo", [PPO, DQN], ids=["ppo", "dqn"])
def test_resume_on_another_number_of_peers(algo, tmp_path, small, peers):
    run_dir = tmp_path / "run"
    first = run(small(256, *algo), run_dir)
    (s0, log0), (s1, _) = peers(_resume_on_two, 2, small(512, *algo), run_dir, timeout=120)
    assert s0["resumed_at_step"] == s1["resumed_at_step"] == first["final_step"]
    assert s0["world_size"] == 2 and s0["final_step"] >= 512
    assert any("resuming a run of 1 peer(s) on 2" in m for m in log0), log0
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == sorted(set(steps))


# -- a peer killed with SIGKILL under torchrun --max-restarts ---------------------------------------
RUN = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
       "train.total_steps=20000", "train.log_every_steps=256", "train.target_return=45",
       "checkpoint.every_steps=256"]


def _final(run_dir: Path) -> tuple[dict, dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, checkpoint.load(checkpoint.shared_path(run_dir / "checkpoints", summary["final_step"]))


def test_killed_peer_resumes_and_ends_bit_identical_to_an_uninterrupted_run(tmp_path, torchrun):
    ref_dir = tmp_path / "uninterrupted"
    ref = torchrun.start([*RUN, f"hydra.run.dir={ref_dir}"])
    torchrun.finish(ref, 120)
    assert ref.returncode == 0
    # The interrupted job uses the default run dir: restarted peers must find the same one again.
    cwd = tmp_path / "job"
    cwd.mkdir()
    job = torchrun.start(RUN, restarts=2, cwd=cwd, launcher=("--standalone",))
    first = torchrun.wait_until(lambda: next(cwd.glob("outputs/ppo-cartpole/*/checkpoints/rank1/step_*.pt"), None),
                                90, "the first checkpoint")
    os.kill(torchrun.workers(job.pid)[1], signal.SIGKILL)
    out = torchrun.finish(job, 150)
    assert job.returncode == 0, out[-3000:]
    (run_dir,) = (cwd / "outputs" / "ppo-cartpole").iterdir()
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    assert len(resumed) == 1 and int(resumed[0][1]) >= checkpoint.step_of(first), out[-3000:]
    (s_ref, c_ref), (s, c) = _final(ref_dir), _final(run_dir)
    assert s["reached"] and s["steps_to_target"] == s_ref["steps_to_target"]
    for key in ("model", "learner"):
        assert _tensors(c[key]) and len(_tensors(c[key])) == len(_tensors(c_ref[key]))
        for a, b in zip(_tensors(c[key]), _tensors(c_ref[key])):
            assert torch.equal(a, b), f"{key} differs from the uninterrupted run"
    got, want = rows(run_dir), rows(ref_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # unique, increasing, none missing
    assert all(a["time_s"] <= b["time_s"] for a, b in zip(got, got[1:]))
    assert [r["episode_return_mean"] for r in got] == [r["episode_return_mean"] for r in want]


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def test_a_changed_learning_rate_holds_after_resume(tmp_path, small):
    # Without annealing the learning rate comes only from the config: the checkpoint's must not win.
    run_dir = tmp_path / "run"
    run(small(128, *PPO, "algo.anneal_lr=false", "algo.lr=1e-3"), run_dir)
    summary = run(small(256, *PPO, "algo.anneal_lr=false", "algo.lr=5e-4"), run_dir)
    assert summary["resumed_at_step"] == 128
    after = [r for r in rows(run_dir) if r["step"] > 128]
    assert after and all(r["lr"] == 5e-4 for r in after), [r["lr"] for r in after]


def test_another_number_of_envs_resumes_the_shared_state_only(tmp_path, small, caplog):
    run_dir = tmp_path / "run"
    run(small(128, *PPO), run_dir)
    with caplog.at_level(logging.INFO):
        summary = run(small(256, *PPO, "algo.num_envs=4"), run_dir)
    assert summary["resumed_at_step"] == 128 and summary["final_step"] == 256
    assert "only the shared state carries over" in caplog.text and "algo.num_envs=4" in caplog.text
