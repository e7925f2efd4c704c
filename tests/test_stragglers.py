"""Stragglers (comm.straggler_frac, DD-PPO-style preemption): a slowed peer cuts its rollout short and
contributes fewer samples, training still reaches its target, and the gradient average is weighted by
sample counts exactly as a hand computation over the union of the peers' samples."""
import os
import time

import gymnasium as gym
import pytest
import torch

from p2prl.algos.ppo import sample_weights
from p2prl.comm import open_comm
from p2prl.runner import run
from p2prl.sync.learner import Learner
from p2prl.sync.optim import FlatSGD

pytestmark = pytest.mark.timeout(240)


class SlowOnRank1(gym.Wrapper):
    """CartPole whose every step takes 0.5 ms longer on rank 1: a straggler, on purpose."""

    def step(self, action):
        if os.environ.get("RANK") == "1":
            time.sleep(0.0005)
        return self.env.step(action)


gym.register("p2prl-test/SlowCartPole-v1", entry_point=lambda **kw: SlowOnRank1(gym.make("CartPole-v1", **kw)),
             max_episode_steps=500)


def _train(rank: int, cfg, run_dir):
    return run(cfg, run_dir)


def test_a_slowed_peer_contributes_fewer_samples_and_training_still_reaches_475(tmp_path, compose, peers):
    # Long rollouts (16 envs x 32 steps per peer: rank 1 is ~0.26 s slower each) so that the slow peer
    # is the slow one in every rollout, whatever the machine's noise; with them the earlier CartPole preset.
    rollout = ["algo.num_envs=16", "algo.update_epochs=10", "algo.lr=5e-3", "algo.clip_vloss=true",
               "train.total_steps=200000"]
    cfg = compose("algo=ppo", "env=cartpole", "env.id=p2prl-test/SlowCartPole-v1", "comm.straggler_frac=0.5",
                  "comm.min_rollout_frac=0.25", "comm.timeout_s=60", "train.log_every_steps=8192", *rollout)
    full = cfg.algo.num_envs * cfg.algo.num_steps
    summary, _ = peers(_train, 2, cfg, tmp_path / "run", timeout=220)
    fast, slow = summary["steps_by_rank"]
    # Every rollout ends in the same number of averaged updates (target_kl is off), however short it was.
    iterations, rest = divmod(summary["updates"], cfg.algo.update_epochs * cfg.algo.num_minibatches)
    least = cfg.comm.min_rollout_frac
    assert summary["reached"] and summary["steps_to_target"] <= cfg.train.total_steps, summary["episode_return_mean"]
    assert rest == 0 and slow < fast <= iterations * full, (summary["updates"], fast, slow)
    # In every rollout one peer collects all of it and the other is cut, never below min_rollout_frac.
    assert fast + slow >= iterations * full * (1 + least), (iterations, fast, slow)
    # The slowed peer is the one cut: the other was cut in at most a tenth of the rollouts (a busy machine
    # can slow it for one, a deterministic test cannot ask for none).
    assert (iterations * full - fast) / (full * (1 - least)) <= iterations / 10, (iterations, fast, slow)


def _weighted(rank: int, cfg, xs, ys):
    comm = open_comm(cfg, "gloo")
    model = torch.nn.Linear(2, 1, bias=False)
    learner = Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=1.0), comm, None, ("loss",), sync=cfg)
    with torch.no_grad():
        learner.bucket.flat_param.zero_()
    x, y = xs[rank], ys[rank]
    n_valid = sum(len(v) for v in ys)
    w = sample_weights(torch.ones(len(y), dtype=torch.bool), n_valid, 1, comm.world_size)
    loss = (w * (model(x).squeeze(1) - y) ** 2).sum()
    learner.step(loss, {"loss": loss.detach()})
    return -learner.bucket.flat_param.detach().clone()  # lr 1 from 0: minus the averaged gradient


def test_the_average_is_weighted_by_sample_counts(compose, peers):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(7, 2, generator=g), torch.randn(3, 2, generator=g)]  # a full rollout and a cut one
    ys = [torch.randn(7, generator=g), torch.randn(3, generator=g)]
    got = peers(_weighted, 2, compose("comm.timeout_s=30").comm, xs, ys)
    # By hand: the gradient of the mean squared error over all 10 samples at w = 0 is -2/10 sum(x * y).
    x, y = torch.cat(xs), torch.cat(ys)
    want = -2 * (x * y[:, None]).sum(0) / 10
    for grad in got:
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
