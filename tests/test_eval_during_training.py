"""Evaluation during training (`train.eval_every_steps`): eval rows in metrics.jsonl and TensorBoard,
checkpoints/best.pt kept for the best of them (surviving a resume), `evaluate --checkpoint best`
replaying that evaluation, every algorithm and comm strategy, and training left unchanged by it."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import gymnasium
import pytest
import torch

import p2prl
from p2prl import checkpoint
from p2prl.runner import run

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
PPO = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2", "algo.lr=1e-3"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "eval_return_mean" in r]


def best_of(run_dir: Path) -> dict:
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")  # weights_only=True
    assert best is not None
    return best


def assert_best_is_the_best_eval(run_dir: Path) -> dict:
    """best.pt holds the first evaluation with the highest mean; returns it."""
    evals, best = eval_rows(run_dir), best_of(run_dir)
    top = max(r["eval_return_mean"] for r in evals)
    first = next(r for r in evals if r["eval_return_mean"] == top)
    assert best["eval"]["return_mean"] == top and best["eval"]["step"] == first["step"] == best["step"]
    return best


def test_two_peers_write_eval_rows_and_keep_the_best_checkpoint(tmp_path, cli):
    run_dir = tmp_path / "run"
    p = cli([*PPO, "train.total_steps=1024", "train.log_every_steps=512", "train.target_return=null",
             "train.eval_every_steps=256", "train.eval_episodes=3", "checkpoint.every_steps=256", "checkpoint.keep=10",
             f"hydra.run.dir={run_dir}"], nproc=2, timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    # 2 peers x 2 envs x 16 steps = 64 global steps per iteration: an evaluation at every multiple of 256.
    evals = eval_rows(run_dir)
    assert [r["step"] for r in evals] == [256, 512, 768, 1024]
    assert all(r["eval_return_std"] >= 0 and r["episode_return_mean"] is not None for r in evals)
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == sorted(set(steps))  # an eval row is the step's one row
    best = assert_best_is_the_best_eval(run_dir)
    # best.pt is the shared checkpoint of that step, plus the evaluation.
    same_step = checkpoint.load(checkpoint.shared_path(run_dir / "checkpoints", best["step"]))
    for k, v in same_step["model"].items():
        assert torch.equal(best["model"][k], v), k
    assert len(best["eval"]["returns"]) == 3
    # evaluate --checkpoint best replays it: the same seeds, the same returns, though played by 2 peers.
    e = subprocess.run([sys.executable, "-m", "p2prl.evaluate", str(run_dir), "--checkpoint", "best", "--episodes", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert e.returncode == 0, e.stderr
    res = json.loads((run_dir / "eval.json").read_text())
    assert res["checkpoint"].endswith("best.pt") and res["returns"] == best["eval"]["returns"]
    assert res["mean_return"] == pytest.approx(best["eval"]["return_mean"], rel=1e-12)
    # TensorBoard has the evaluations too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval_return_mean")] == [256, 512, 768, 1024]
    # summary.json says what code ran.
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["versions"] == {"p2prl": p2prl.__version__, "python": platform.python_version(), "torch": torch.__version__,
                             "gymnasium": gymnasium.__version__, "numpy": __import__("numpy").__version__}
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert s["git"]["commit"] == head and isinstance(s["git"]["dirty"], bool)
    else:
        assert s["git"] is None


def _run(rank: int, cfg, run_dir):
    return run(cfg, run_dir)


# Every algorithm and every comm strategy, each at least once.
CASES = [("ppo", "local_sgd", PPO + ["comm.average_every=3"]), ("a2c", "param_server", ["algo.num_envs=2"]),
         ("dqn", "gossip", ["algo.learning_starts=64", "algo.batch_size=16", "algo.buffer_size=500"]),
         ("qlearning", "allreduce", ["env=taxi", "algo.num_envs=2", "algo.sync_every=16"])]


@pytest.mark.parametrize("algo,comm,extra", CASES, ids=[f"{a}-{c}" for a, c, _ in CASES])
def test_every_algorithm_and_strategy_evaluates_the_shared_policy(algo, comm, extra, tmp_path, compose, peers):
    cfg = compose(f"algo={algo}", f"comm={comm}", *extra, "train.total_steps=512", "train.log_every_steps=512",
                  "train.target_return=null", "train.eval_every_steps=128", "train.eval_episodes=2",
                  "checkpoint.every_steps=128", "checkpoint.keep=10", "comm.timeout_s=60")
    run_dir = tmp_path / "run"
    peers(_run, 2, cfg, run_dir, timeout=200)
    # One evaluation at the first iteration boundary past each multiple of 128 (iterations are shorter).
    assert [r["step"] // 128 for r in eval_rows(run_dir)] == [1, 2, 3, 4]
    best = assert_best_is_the_best_eval(run_dir)
    folder = run_dir / "checkpoints"
    if comm in ("local_sgd", "gossip"):  # the peers' parameters differ: best.pt holds their mean
        own = [checkpoint.load(checkpoint.rank_path(folder, r, best["step"]))["learner"]["params"] for r in range(2)]
        flat = torch.cat([t.reshape(-1) for t in best["model"].values()])
        torch.testing.assert_close(flat, (own[0] + own[1]) / 2)
    shared = checkpoint.load(checkpoint.shared_path(folder, best["step"]))
    key = "q_table" if algo == "qlearning" else "model"
    assert torch.equal(torch.cat([t.reshape(-1) for t in _tensors(best[key])]),
                       torch.cat([t.reshape(-1) for t in _tensors(shared[key])]))


def _tensors(x):
    return [x] if isinstance(x, torch.Tensor) else list(x.values())


def test_best_checkpoint_survives_a_resume_and_training_is_unchanged_by_evaluation(tmp_path, compose):
    def small(total: int, *more: str):
        return compose("seed=3", *PPO, f"train.total_steps={total}", "train.log_every_steps=64",
                       "train.target_return=null", "checkpoint.every_steps=128", *more)
    run_dir, plain = tmp_path / "run", tmp_path / "plain"
    run(small(512, "train.eval_every_steps=128", "train.eval_episodes=2"), run_dir)
    assert [r["step"] for r in eval_rows(run_dir)] == [128, 256, 384, 512]
    assert_best_is_the_best_eval(run_dir)
    # Evaluation draws from none of training's random streams: the same parameters as without it.
    run(small(512), plain)
    ours, theirs = (checkpoint.load(checkpoint.shared_path(d / "checkpoints", 512))["model"] for d in (run_dir, plain))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not (plain / "checkpoints" / "best.pt").exists() and not eval_rows(plain)
    # An earlier attempt's best that nothing beats stays best.pt after a resume...
    path = run_dir / "checkpoints" / "best.pt"
    best = best_of(run_dir)
    checkpoint.save_atomic({**best, "eval": {**best["eval"], "return_mean": 1e9}}, path)
    before = path.read_bytes()
    summary = run(small(768, "train.eval_every_steps=128", "train.eval_episodes=2"), run_dir)
    assert summary["resumed_at_step"] == 512 and [r["step"] for r in eval_rows(run_dir)][-2:] == [640, 768]
    assert path.read_bytes() == before
    # ...but a run started afresh in the same dir keeps its own.
    run(small(256, "train.eval_every_steps=128", "train.eval_episodes=2", "train.resume=never"), run_dir)
    assert best_of(run_dir)["eval"]["return_mean"] < 1e9 and best_of(run_dir)["step"] <= 256
    # ...and a fresh start without evaluation leaves no earlier attempt's best.pt for `--checkpoint best`.
    run(small(128, "train.resume=never"), run_dir)
    assert not path.exists()


def test_evaluate_without_a_best_checkpoint_is_one_line_and_exit_2(tmp_path, compose):
    run_dir = tmp_path / "run"
    run(compose(*PPO, "train.total_steps=64", "train.log_every_steps=64", "train.target_return=null"), run_dir)
    for which, text in (("best", "checkpoint=best: "), (str(tmp_path / "no_such.pt"), "is missing; allowed: latest, best")):
        e = subprocess.run([sys.executable, "-m", "p2prl.evaluate", str(run_dir), "--checkpoint", which], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert e.returncode == 2 and e.stderr.count("\n") == 1 and text in e.stderr, e.stderr
        assert "Traceback" not in e.stderr
