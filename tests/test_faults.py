"""Faults with real processes: a frozen peer, a dead torchrun agent, stop signals, non-finite losses."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from p2prl import checkpoint
from p2prl.algos.ppo import PPO
from p2prl.comm import open_comm, parameter_digest
from p2prl.faults import NonFiniteUpdates
from p2prl.runner import build_algorithm, run

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
ENDLESS = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
           "train.total_steps=100000000", "train.log_every_steps=256", "train.target_return=null"]


def test_frozen_peer_is_named_and_the_job_ends(tmp_path, torchrun):
    run_dir = tmp_path / "run"
    job = torchrun.start([*ENDLESS, "comm.timeout_s=4", f"hydra.run.dir={run_dir}"])
    torchrun.wait_until(lambda: torchrun.metrics_rows(run_dir) >= 2, 90, "training to start")
    os.kill(torchrun.workers(job.pid)[1], signal.SIGSTOP)
    reports = [line.strip() for line in job.stdout if "stopped responding" in line]  # until torchrun exits
    job.wait()
    assert reports, "no peer reported the frozen one"
    assert "peer rank 1 (in " in reports[0] and "rank 0 (in" not in reports[0], reports[0]
    # The phase the frozen peer was in: any of a running loop's (a loaded machine may stop it while it logs).
    loop_phases = ("sampling", "update", "check", "checkpoint", "log", "eval")
    assert any(f"(in {phase})" in reports[0] for phase in loop_phases), reports[0]
    assert "comm.timeout_s=4" in reports[0] and job.returncode != 0


def test_workers_exit_when_the_torchrun_agent_is_killed(tmp_path, torchrun):
    run_dir = tmp_path / "run"
    job = torchrun.start([*ENDLESS, f"hydra.run.dir={run_dir}"])
    torchrun.wait_until(lambda: torchrun.metrics_rows(run_dir) >= 1, 90, "training to start")
    pids = torchrun.workers(job.pid)
    assert len(pids) == 2
    job.kill()
    torchrun.wait_until(lambda: not any(torchrun.alive(p) for p in pids.values()), 30, "the orphaned workers to exit")
    saved = checkpoint.load(run_dir / "checkpoints" / "interrupted.pt")
    assert saved is not None and "model" in saved
    # Rank 0 stops on its own SIGTERM, or first notices that rank 1 (which got its own) has gone.
    why = saved["interrupted_by"]
    assert "SIGTERM" in why or "peer rank 1" in why, why


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_the_model_without_peers_and_exits_128_plus_signum(signum, tmp_path, torchrun):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "p2prl.train", *ENDLESS, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        torchrun.wait_until(lambda: torchrun.metrics_rows(run_dir) >= 1, 60, "training to start")
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, out[-2000:]
    assert f"interrupted by {signal.Signals(signum).name}: stopped" in out, out[-2000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "interrupted.pt")
    assert saved is not None and saved["step"] > 0 and "model" in saved


def test_iteration_boundaries_are_kept_unless_copying_them_would_cost_more_than_a_twentieth(tmp_path, compose,
                                                                                             monkeypatch):
    """Rank 0 keeps every boundary where copying is cheap, so an interruption saves the last iteration;
    where a copy takes long next to an iteration (SAC's one-step ones) it keeps one once 20 copies'
    time has passed since the last, and at least one a second."""
    from p2prl import checkpointer
    from p2prl.comm import LocalComm
    from p2prl.metrics import ReturnWindow
    from p2prl.resume import Progress
    cfg = compose(*ENDLESS[:4])
    saver = checkpointer.Checkpointer(LocalComm(), cfg, tmp_path, build_algorithm(cfg, LocalComm()), ReturnWindow(5))
    now, copy_s = [0.0], [0.0]
    monkeypatch.setattr(checkpointer, "time", SimpleNamespace(monotonic=lambda: now[0]))
    shared = saver._shared
    saver._shared = lambda p: (now.__setitem__(0, now[0] + copy_s[0]), shared(p))[1]  # the copy's time

    def kept(steps: range, every_s: float) -> list[int]:
        out = []
        for step in steps:
            before = saver.boundary
            saver.mark_boundary(Progress(step, step, 0.0))
            out += [step] if saver.boundary is not before else []
            now[0] += every_s
        return out
    assert kept(range(1, 6), 0.01) == [1, 2, 3, 4, 5]  # free copies: every boundary
    copy_s[0] = 0.002  # 0.002 s copies at 0.005 s iterations: one in 0.04 s
    assert kept(range(6, 30), 0.005) == [6, 14, 22]
    copy_s[0] = 0.2  # 20 copies would take 4 s: one a second
    assert kept(range(30, 37), 0.3) == [30, 33, 36]  # 0.2 + 3 x 0.3 s
    assert saver.boundary["step"] == 36


# -- non-finite losses ----------------------------------------------------------------------------
SMALL = ("seed=3", "algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
         "algo.lr=1e-3", "train.log_every_steps=64", "checkpoint.every_steps=64", "comm.timeout_s=30")


def _poison(bad) -> None:
    """Make PPO's loss non-finite where `bad(ppo)` holds: NaN, or +inf (whose gradient is finite)."""
    real = PPO.loss

    def poisoned(self, *args):
        loss, terms = real(self, *args)
        if bad(self):
            loss = loss * float("nan") if self.learner.skipped % 2 == 0 else loss + float("inf")
        return loss, terms
    PPO.loss = poisoned


def _skip_on_rank1(rank: int, cfg, n_bad: int):
    algo = build_algorithm(cfg, open_comm(cfg.comm, "gloo"))
    if rank == 1:
        _poison(lambda ppo: ppo.learner.updates == 4 and ppo.learner.skipped < n_bad)
    for i in range(3):
        algo.sample(i / 3)
        algo.learn(i / 3)
    return algo.learner.skipped, algo.learner.updates, parameter_digest(list(algo.model.parameters()))


def test_non_finite_loss_on_one_peer_makes_both_skip(compose, peers):
    cfg = compose(*SMALL)
    (s0, u0, d0), (s1, u1, d1) = peers(_skip_on_rank1, 2, cfg, 2)
    assert s0 == s1 == 2, "a NaN and an inf loss on rank 1 must each be skipped by both peers"
    assert u0 == u1 == 3 * cfg.algo.update_epochs * cfg.algo.num_minibatches - 2
    assert d0 == d1, "parameters diverged"


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", None])
def test_a_gradient_with_one_non_finite_value_and_a_finite_loss_is_skipped(bad, compose):
    """sqrt at 0: a finite loss (0) whose gradient is +inf in one place (-inf negated, NaN times 0).
    A finite gradient, however large, is applied."""
    import torch

    from p2prl.comm import LocalComm
    from p2prl.sync.learner import Learner
    from p2prl.sync.optim import FlatSGD
    p = torch.nn.Parameter(torch.ones(5))
    learner = Learner([p], lambda flat: FlatSGD(flat, lr=1e-3), LocalComm(), None, ("loss",), sync=compose().comm)
    root = torch.sqrt(p[2] - p[2].detach())  # 0, with gradient +inf
    odd = {"inf": root, "-inf": -root, "nan": root * 0.0, None: 1e30 * p[2]}[bad]
    loss = (p ** 2).sum() + odd
    assert torch.isfinite(loss)
    learner.step(loss, {"loss": loss.detach()})
    learner.finish()
    assert (learner.skipped, learner.updates) == ((1, 0) if bad else (0, 1))
    assert torch.equal(p.detach(), torch.ones(5)) == (bad is not None)


def _nan_forever_on_rank1(rank: int, cfg, run_dir: Path):
    if rank == 1:
        _poison(lambda ppo: ppo.learner.updates >= 20)  # from some iteration on, every update
    try:
        run(cfg, run_dir)
    except NonFiniteUpdates as e:
        return str(e)
    return "no error"


def test_consecutive_non_finite_updates_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, compose, peers):
    run_dir = tmp_path / "run"
    cfg = compose(*SMALL, "train.total_steps=100000", "train.max_skipped_updates=6")
    errors = peers(_nan_forever_on_rank1, 2, cfg, run_dir)
    assert all("train.max_skipped_updates=6" in e for e in errors), errors
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clean = [r["step"] for r in rows if r["skipped_updates"] == 0]
    assert rows[-1]["skipped_updates"] >= 4 and clean, rows
    steps = checkpoint.list_steps(run_dir / "checkpoints")
    assert steps[-1] == clean[-1], (steps, clean)  # the last iteration without skips
    last = checkpoint.load(checkpoint.shared_path(run_dir / "checkpoints", steps[-1]))
    assert last is not None and last["learner"]["skipped_in_a_row"] == 0 and last["learner"]["skipped"] == 0
