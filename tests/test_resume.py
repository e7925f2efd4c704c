"""Checkpoints and resuming: env/RNG state round trips, a truncated newest checkpoint, another number of
peers, a peer killed with SIGKILL under `torchrun --max-restarts` ending bit-identical to a run
that was never interrupted, and a fresh start in a used run dir moving the earlier run to previous/."""
import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from p2prl import checkpoint
from p2prl.envs import make_vec_env
from p2prl.comm import LocalComm
from p2prl.envstate import load_vec_env_state, restorable, vec_env_state
from p2prl.metrics import drop_rows_after
from p2prl.runner import build_algorithm, run

pytestmark = pytest.mark.timeout(180)
PPO = ("algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2", "algo.lr=1e-3")
DQN = ("algo=dqn", "algo.num_envs=2", "algo.buffer_size=500", "algo.batch_size=16", "algo.learning_starts=32",
       "algo.target_update_interval=20")
MUJOCO = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs the mujoco extra")
BOX2D = pytest.mark.skipif(importlib.util.find_spec("Box2D") is None, reason="needs the box2d extra")


@pytest.fixture
def small(compose):
    """A small run's config: `small(total_steps, *overrides)` (PPO unless the overrides say dqn)."""
    def make(total_steps: int, *overrides: str):
        return compose("seed=1", *(overrides or PPO), f"train.total_steps={total_steps}", "train.log_every_steps=64",
                       "train.target_return=null", "checkpoint.every_steps=64", "comm.timeout_s=30")
    return make


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Ant reads body positions that MuJoCo computed before its last substep (not part of the integration state).
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "Pendulum-v1",
                                    pytest.param("HalfCheetah-v5", marks=MUJOCO), pytest.param("Ant-v5", marks=MUJOCO)])
def test_env_state_round_trip_continues_the_same_episodes(env_id, tmp_path, compose):
    cfg = dataclasses.replace(compose().env, id=env_id)
    envs, _ = make_vec_env(cfg, 3, seed=5)
    assert restorable(envs)
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


@BOX2D
@pytest.mark.parametrize("algo", [PPO, DQN], ids=["ppo", "dqn"])
def test_box2d_envs_resume_fresh_episodes_that_continue_the_random_stream(algo, compose):
    # LunarLander's world cannot be saved: its counters and prev_shaping restored onto a fresh world made
    # the first reward after a resume shaping(new episode) - prev_shaping(old episode). Fresh episodes
    # from the seeds would replay the run's first ones; they continue each env's generator instead.
    cfg = compose("seed=1", "env=lunarlander", *algo)
    a = build_algorithm(cfg, LocalComm())
    assert a.collector.not_restorable is not None
    for _ in range(3):
        a.sample(0.0)  # its envs mid-episode
    state = io.BytesIO()
    torch.save({"own": a.rank_state_dict(replay=True), "collector": a.collector.state_dict()}, state)
    state.seek(0)
    saved = torch.load(state, weights_only=True)
    resumed, fresh = build_algorithm(cfg, LocalComm()), build_algorithm(cfg, LocalComm())
    resumed.collector.load_state_dict(saved["collector"])
    resumed.load_rank_state_dict(saved["own"])
    assert not resumed.collector.continued
    mid = np.array(a.collector.obs)
    following, _ = a.collector.envs.reset()  # the episodes the saved envs' generators begin next
    got = resumed.collector.obs
    assert np.array_equal(got, following) and not np.array_equal(got, mid)
    assert not np.array_equal(got, fresh.collector.obs)  # not the run's first episodes again
    if algo is DQN:
        assert not any(resumed.writer.windows) and np.array_equal(resumed.writer.keys, resumed.obs)
    space = fresh.collector.envs.action_space
    space.seed(0)
    for action in [space.sample() for _ in range(60)]:  # the fresh episodes' own transitions
        for want, got in zip(a.collector.envs.step(action)[:4], resumed.collector.envs.step(action)[:4]):
            assert np.array_equal(want, got)


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


QLEARNING = ("algo=qlearning", "env=frozenlake", "algo.num_envs=2")


@pytest.mark.parametrize("algo", [DQN, QLEARNING], ids=["dqn", "qlearning"])
def test_a_sampler_algorithm_resumes_its_own_state_exactly(algo, tmp_path, small):
    """The newest set lost: the run resumes from the one before on the same peers, its process RNG and
    its exploration generator both restored (the latter once replaced the former in the rank file), and
    ends where it had ended."""
    run_dir = tmp_path / "run"
    first = run(small(512, *algo, "checkpoint.replay=true"), run_dir)
    folder = run_dir / "checkpoints"
    ended = checkpoint.load(checkpoint.shared_path(folder, first["final_step"]))
    checkpoint.shared_path(folder, first["final_step"]).unlink()
    again = run(small(512, *algo, "checkpoint.replay=true"), run_dir)
    assert again["resumed_at_step"] == checkpoint.list_steps(folder)[0] < first["final_step"] == again["final_step"]
    redone = checkpoint.load(checkpoint.shared_path(folder, again["final_step"]))
    key = "model" if "model" in ended else "q_table"
    assert _tensors(redone[key]) and all(torch.equal(a, b) for a, b in zip(_tensors(redone[key]), _tensors(ended[key])))


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


@MUJOCO
def test_a_halfcheetah_run_resumed_from_a_middle_checkpoint_ends_bit_identical(tmp_path, small, caplog):
    cfg = small(256, "env=halfcheetah", *PPO, "checkpoint.keep=10")  # norm_obs and norm_reward on
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    run(cfg, ref_dir)
    shutil.copytree(ref_dir, run_dir)
    for path in (run_dir / "checkpoints").rglob("step_*.pt"):
        if checkpoint.step_of(path) > 128:  # as if the run had died after its checkpoint at step 128
            path.unlink()
    with caplog.at_level(logging.INFO):
        summary = run(cfg, run_dir)
    assert summary["resumed_at_step"] == 128 and "fresh episode" not in caplog.text
    (_, c_ref), (_, c) = _final(ref_dir), _final(run_dir)
    for key in ("model", "learner", "obs_norm", "ret_norm"):
        assert _tensors(c[key]) and len(_tensors(c[key])) == len(_tensors(c_ref[key]))
        for a, b in zip(_tensors(c[key]), _tensors(c_ref[key])):
            assert torch.equal(a, b), f"{key} differs from the uninterrupted run"
    assert [r["step"] for r in rows(run_dir)] == [r["step"] for r in rows(ref_dir)]


@BOX2D
def test_a_box2d_run_says_once_that_its_envs_resume_fresh_episodes(tmp_path, small, caplog):
    run_dir = tmp_path / "run"
    run(small(64, "env=lunarlander", *PPO), run_dir)
    with caplog.at_level(logging.INFO):
        summary = run(small(128, "env=lunarlander", *PPO), run_dir)
    assert summary["resumed_at_step"] == 64
    assert caplog.text.count("Box2D world, which cannot be saved): every env starts a fresh episode") == 1


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


# -- a fresh start in a run dir that holds an earlier run -------------------------------------------
def _earlier_then_fresh_then_auto(rank: int, earlier, fresh, auto, run_dir: Path):
    """Three runs in one dir on the same peers: a long one, a fresh start (resume=never), then resume=auto."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("p2prl").addHandler(handler)
    logging.getLogger("p2prl").setLevel(logging.INFO)
    first = run(earlier, run_dir)
    nothing_before = not (run_dir / "previous").exists()
    if rank == 0:  # as `p2prl evaluate` and Hydra leave them
        for name in ("eval.json", ".hydra/config.yaml", "train.log"):
            (run_dir / name).parent.mkdir(exist_ok=True)
            (run_dir / name).write_text(name)
    second = run(fresh, run_dir)
    moved = [m for m in records if "moved the earlier run's" in m]
    third = run(auto, run_dir)
    return nothing_before, first, second, third, moved


def test_a_fresh_start_moves_the_earlier_run_aside_and_auto_then_continues_the_new_one(tmp_path, small, peers):
    run_dir = tmp_path / "run"
    earlier, fresh, auto = small(512), small(256, *PPO, "train.resume=never"), small(384)
    (empty0, first, second, third, moved0), (empty1, *_, moved1) = peers(
        _earlier_then_fresh_then_auto, 2, earlier, fresh, auto, run_dir, timeout=150)
    assert empty0 and empty1 and first["final_step"] == 512  # a run dir with nothing to move gets no previous/
    (previous,) = (run_dir / "previous").iterdir()
    assert len(moved0) == 1 and str(previous) in moved0[0] and not moved1, (moved0, moved1)  # one line, rank 0
    # The earlier run, whole: its checkpoints (every rank's), metrics, summary, events and evaluation.
    assert checkpoint.list_steps(previous / "checkpoints") == [448, 512]
    assert all(checkpoint.list_steps(previous / "checkpoints" / f"rank{r}") == [448, 512] for r in (0, 1))
    assert json.loads((previous / "summary.json").read_text())["final_step"] == 512
    assert rows(previous)[-1]["step"] == 512 and (previous / "tb").is_dir() and (previous / "eval.json").is_file()
    # The fresh run's own checkpoints are the ones kept, and resume=auto continues it, not the earlier run.
    assert second["resumed_from"] is None and second["final_step"] == 256
    assert third["resumed_at_step"] == 256 and third["final_step"] == 384
    assert checkpoint.list_steps(run_dir / "checkpoints") == [320, 384]
    assert [r["step"] for r in rows(run_dir)] == list(range(64, 385, 64))
    assert not (run_dir / "eval.json").exists()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()  # Hydra's stay
    assert len(list((run_dir / "previous").iterdir())) == 1  # resuming moves nothing


def test_auto_without_a_complete_checkpoint_moves_the_earlier_run_aside(tmp_path, small, caplog):
    run_dir = tmp_path / "run"
    run(small(64), run_dir)
    (only,) = checkpoint.list_steps(run_dir / "checkpoints")
    newest = checkpoint.shared_path(run_dir / "checkpoints", only)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    corrupt = newest.read_bytes()
    with caplog.at_level(logging.INFO):
        summary = run(small(128), run_dir)
    assert "starting from scratch" in caplog.text and summary["resumed_from"] is None
    (previous,) = (run_dir / "previous").iterdir()
    assert caplog.text.count("moved the earlier run's") == 1 and str(previous) in caplog.text
    assert (previous / "checkpoints" / newest.name).read_bytes() == corrupt  # moved, as it was
    assert checkpoint.list_steps(previous / "checkpoints" / "rank0") == [64]
    assert [r["step"] for r in rows(previous)] == [64] and (previous / "summary.json").is_file()
    assert checkpoint.list_steps(run_dir / "checkpoints") == [64, 128]
    assert [r["step"] for r in rows(run_dir)] == [64, 128]


def _set_aside_on_own_node(rank: int, tmp_path: Path):
    """Every peer sees the run dir at the same path, each on its own node (no shared filesystem)."""
    from p2prl.comm import open_comm
    from p2prl.precheck import compose
    from p2prl.rundir import set_aside_earlier_run
    comm = open_comm(compose("comm.timeout_s=30").comm, "gloo", cores=None)
    run_dir = tmp_path / f"node{rank}" / "run"
    return set_aside_earlier_run(comm, run_dir)


def test_each_rank_moves_its_own_rank_files_where_nodes_share_no_filesystem(tmp_path, peers):
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    for path in (node0 / "checkpoints" / "step_64.pt", node0 / "checkpoints" / "rank0" / "step_64.pt",
                 node0 / "metrics.jsonl", node1 / "checkpoints" / "rank1" / "step_64.pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    dest0, dest1 = peers(_set_aside_on_own_node, 2, tmp_path)
    assert dest0.parent == node0 / "previous" and dest1 == node1 / "previous" / dest0.name  # one time stamp
    assert sorted(str(p.relative_to(dest0)) for p in dest0.rglob("*") if p.is_file()) == [
        "checkpoints/rank0/step_64.pt", "checkpoints/step_64.pt", "metrics.jsonl"]
    assert [str(p.relative_to(dest1)) for p in dest1.rglob("*") if p.is_file()] == ["checkpoints/rank1/step_64.pt"]
    assert not (node0 / "checkpoints").exists() and not (node1 / "checkpoints" / "rank1").exists()


def test_a_run_resumed_from_another_run_sets_aside_what_its_own_dir_held(tmp_path, small):
    source, here = tmp_path / "source", tmp_path / "here"
    run(small(128), source)
    run(small(512), here)  # an unrelated earlier run, at higher steps than the resumed one will reach
    summary = run(small(256, *PPO, f"train.resume={source}"), here)
    assert summary["resumed_at_step"] == 128 and summary["final_step"] == 256
    (previous,) = (here / "previous").iterdir()
    assert checkpoint.list_steps(previous / "checkpoints")[-1] == 512  # kept, aside
    # Only this run's own checkpoints remain, so a later resume=auto continues it, not the earlier run.
    assert checkpoint.list_steps(here / "checkpoints") == [192, 256]
    assert [r["step"] for r in rows(here)] == [192, 256]


def test_the_parts_of_checkpoint_writes_killed_in_an_earlier_attempt_are_removed(tmp_path, small):
    run_dir = tmp_path / "run"
    run(small(128), run_dir)
    parts = [run_dir / "checkpoints" / ".step_192.pt.tmp4242", run_dir / "checkpoints" / "rank0" / ".step_192.pt.tmp4243"]
    for part in parts:
        part.write_bytes(b"half a checkpoint")  # what atomic writes leave when their process is killed
    summary = run(small(256), run_dir)
    assert summary["resumed_at_step"] == 128 and not any(p.exists() for p in parts)
    assert checkpoint.list_steps(run_dir / "checkpoints") == [192, 256]
