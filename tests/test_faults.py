"""Faults with real processes: a frozen peer, a dead torchrun agent, stop signals, non-finite losses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torchrun
from peers import run_peers
from p2prl import checkpoint
from p2prl.algos.ppo import PPO
from p2prl.comm import open_comm
from p2prl.comm.peers import parameter_digest
from p2prl.config import CheckpointConfig, CommConfig, EnvConfig, PPOConfig, RunConfig, TrainConfig
from p2prl.faults import NonFiniteUpdates
from p2prl.runner import build_algorithm, run

pytestmark = pytest.mark.timeout(120)
ENDLESS = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
           "train.total_steps=100000000", "train.log_every_steps=256", "train.target_return=null"]


@pytest.fixture
def jobs():
    started: list[subprocess.Popen] = []
    yield started
    for job in started:
        torchrun.kill_job(job)


def test_frozen_peer_is_named_and_the_job_ends(tmp_path, jobs):
    timeout_s, run_dir = 4, tmp_path / "run"
    job = torchrun.start([*ENDLESS, f"comm.timeout_s={timeout_s}", f"hydra.run.dir={run_dir}"])
    jobs.append(job)
    torchrun.wait_until(lambda: torchrun.metrics_rows(run_dir) >= 2, 90, "training to start")
    frozen = torchrun.workers(job.pid)[1]
    os.kill(frozen, signal.SIGSTOP)
    t0 = time.monotonic()
    reports = []
    for line in job.stdout:  # ends when torchrun exits
        if "stopped responding" in line:
            reports.append((time.monotonic() - t0, line.strip()))
    job.wait()
    ended = time.monotonic() - t0
    assert reports, "no peer reported the frozen one"
    seconds, message = reports[0]
    assert "peer rank 1 (in " in message and "rank 0 (in" not in message, message
    assert any(f"(in {phase})" in message for phase in ("sampling", "update", "check", "checkpoint")), message
    assert seconds <= timeout_s + 10, (seconds, message)
    assert ended <= timeout_s + 45 and job.returncode != 0


def test_workers_exit_when_the_torchrun_agent_is_killed(tmp_path, jobs):
    run_dir = tmp_path / "run"
    job = torchrun.start([*ENDLESS, f"hydra.run.dir={run_dir}"])
    jobs.append(job)
    torchrun.wait_until(lambda: torchrun.metrics_rows(run_dir) >= 1, 90, "training to start")
    pids = torchrun.workers(job.pid)
    assert len(pids) == 2
    job.kill()
    torchrun.wait_until(lambda: not any(torchrun.alive(p) for p in pids.values()), 10, "the orphaned workers to exit")
    saved = checkpoint.load(run_dir / "checkpoints" / "interrupted.pt")
    assert saved is not None and "model" in saved and "SIGTERM" in saved["interrupted_by"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_the_model_without_peers_and_exits_128_plus_signum(signum, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "p2prl.train", *ENDLESS, f"hydra.run.dir={run_dir}"],
                            cwd=torchrun.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        torchrun.wait_until(lambda: torchrun.metrics_rows(run_dir) >= 1, 60, "training to start")
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, out[-2000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "interrupted.pt")
    assert saved is not None and saved["step"] > 0 and "model" in saved


# -- non-finite losses ----------------------------------------------------------------------------
def small_config(**train) -> RunConfig:
    algo = PPOConfig(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=2, lr=1e-3)
    return RunConfig(seed=3, algo=algo, env=EnvConfig(), train=TrainConfig(log_every_steps=64, **train),
                     comm=CommConfig(timeout_s=30), checkpoint=CheckpointConfig(every_steps=64))


def _poison(algo_or_class, bad) -> None:
    """Make the loss non-finite where `bad(ppo)` holds: NaN, or +inf (whose gradient is finite)."""
    real = algo_or_class._loss

    def poisoned(self, *args):
        extras, loss = real(self, *args)
        if bad(self):
            loss = loss * float("nan") if self.learner.skipped % 2 == 0 else loss + float("inf")
        return extras, loss
    algo_or_class._loss = poisoned


def _skip_on_rank1(rank: int, n_bad: int):
    cfg = small_config()
    algo = build_algorithm(cfg, open_comm(cfg.comm))
    if rank == 1:
        _poison(PPO, lambda ppo: ppo.learner.updates == 4 and ppo.learner.skipped < n_bad)
    for i in range(3):
        algo.iteration(progress=i / 3)
    return algo.learner.skipped, algo.learner.updates, parameter_digest(list(algo.model.parameters()))


def test_non_finite_loss_on_one_peer_makes_both_skip():
    (s0, u0, d0), (s1, u1, d1) = run_peers(_skip_on_rank1, 2, 2)
    assert s0 == s1 == 2, "a NaN and an inf loss on rank 1 must each be skipped by both peers"
    assert u0 == u1 == 3 * 2 * 2 - 2
    assert d0 == d1, "parameters diverged"


def _nan_forever_on_rank1(rank: int, run_dir: Path):
    if rank == 1:
        _poison(PPO, lambda ppo: ppo.learner.updates >= 20)  # from the 6th iteration (step 384) on
    try:
        run(small_config(total_steps=100_000, max_skipped_updates=6), run_dir)
    except NonFiniteUpdates as e:
        return str(e)
    return "no error"


def test_consecutive_non_finite_updates_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    errors = run_peers(_nan_forever_on_rank1, 2, run_dir)
    assert all("train.max_skipped_updates=6" in e for e in errors), errors
    steps = checkpoint.list_steps(run_dir / "checkpoints")
    assert steps[-1] == 320, steps  # the last iteration without skips
    last = checkpoint.load(checkpoint.shared_path(run_dir / "checkpoints", 320))
    assert last is not None and last["skipped_in_a_row"] == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_updates"] >= 4 and rows[0]["skipped_updates"] == 0
