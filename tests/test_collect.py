"""The collector by hand: the autoreset mask, truncated transitions' final observations, episode
accounting, the straggler cut, its checkpoint state, and fresh episodes that continue the envs' random
stream where their state cannot be saved."""
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

from p2prl.collect import Collector
from p2prl.envs import make_vec_env
from p2prl.timing import Stopwatch

pytestmark = pytest.mark.timeout(120)


class Counter(gym.Env):
    """Observation = 100 * episode + t; reward t + 1 on step t; terminated after `length` steps."""

    observation_space = gym.spaces.Box(-1e6, 1e6, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int = 3) -> None:
        self.length, self.episode = length, -1

    def _obs(self):
        return np.array([100 * self.episode + self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(self.t), self.t >= self.length, False, {}


def counters(*limits: int, length: int = 3) -> gym.vector.SyncVectorEnv:
    """One Counter per limit: a TimeLimit of `limit` steps (truncating when shorter than `length`)."""
    return gym.vector.SyncVectorEnv([partial(gym.wrappers.TimeLimit, Counter(length), n) for n in limits])


def collector(envs, **kw) -> Collector:
    obs, _ = envs.reset(seed=0)
    return Collector(envs, obs, **kw)


def test_the_step_after_an_episode_end_is_a_reset_and_no_transition():
    c = collector(counters(10, 2))  # env 0 terminates after 3 steps; env 1 is truncated after 2
    steps = [c.step(np.zeros(2, dtype=np.int64)) for _ in range(5)]
    obs = np.stack([s.next_obs[:, 0] for s in steps])
    valid = np.stack([s.valid for s in steps])
    # env 0: 1 2 3(terminated) | reset to 100 | 101; env 1: 1 2(truncated) | reset to 100 | 101 102(truncated)
    assert obs[:, 0].tolist() == [1, 2, 3, 100, 101] and obs[:, 1].tolist() == [1, 2, 100, 101, 102]
    assert valid[:, 0].tolist() == [True, True, True, False, True]
    assert valid[:, 1].tolist() == [True, True, False, True, True]
    assert [bool(s.terminated[0]) for s in steps] == [False, False, True, False, False]
    assert [bool(s.truncated[1]) for s in steps] == [False, True, False, False, True]
    assert [bool(s.done[1]) for s in steps] == [False, True, False, False, True]
    # A truncated step's next observation is its episode's last one, the state to bootstrap from.
    assert steps[1].next_obs[1, 0] == 2 and not steps[1].terminated[1]
    assert np.array_equal(c.obs, steps[-1].next_obs) and c.next_valid.tolist() == [True, False]


def test_episodes_are_counted_once_with_their_returns_lengths_and_steps():
    c = collector(counters(10, 2))
    for _ in range(5):
        c.step(np.zeros(2, dtype=np.int64))
    sample = c.take()
    assert sample.steps == 5 * 2
    got = sorted((e.t, e.env, e.ret, e.length) for e in sample.episodes)
    # env 0: 1+2+3 in 3 steps, ended at vector step 2; env 1: 1+2 at step 1, then 1+2 again at step 4
    assert got == [(1, 1, 3.0, 2), (2, 0, 6.0, 3), (4, 1, 3.0, 2)]
    c.step(np.zeros(2, dtype=np.int64))
    assert c.take().steps == 2 and c.t == 0  # counted from the last take


def test_a_rollout_is_cut_short_when_enough_peers_have_finished():
    class Preempt:
        def __init__(self, finished_at: int) -> None:
            self.finished_at, self.calls = finished_at, []

        def begin(self):
            self.calls.append("begin")

        def cut(self, done, steps):
            return done >= self.finished_at

        def finished(self):
            self.calls.append("finished")
    pre = Preempt(finished_at=3)
    c = collector(counters(10, 10), preempt=pre)
    ts = []
    for t in c.rollout(8):
        ts.append(t)
        c.step(np.zeros(2, dtype=np.int64))
    assert ts == [0, 1, 2] and c.length == 3 and pre.calls == ["begin", "finished"]
    assert list(c.rollout(2)) == [0, 1] and c.length == 2  # without stepping: the loop's indices only


def test_state_round_trip_continues_the_same_episodes():
    a = collector(counters(10, 2))
    for _ in range(4):
        a.step(np.zeros(2, dtype=np.int64))
    a.take()  # at an iteration boundary, as the runner saves
    saved = _round_trip(a.state_dict())
    b = collector(counters(10, 2))
    b.load_state_dict(saved)
    assert b.continued and np.array_equal(a.obs, b.obs) and np.array_equal(a.next_valid, b.next_valid)
    for _ in range(6):
        sa, sb = a.step(np.zeros(2, dtype=np.int64)), b.step(np.zeros(2, dtype=np.int64))
        assert all(np.array_equal(x, y) for x, y in zip(sa[:6], sb[:6]))
    ended = b.take().episodes
    assert ended == a.take().episodes and ended[0] == (0, 1, 3.0, 2)  # env 1's, under way at the save


def test_restored_observations_keep_their_memory_layout():
    """CartPole's native vector env returns column-major batches; a policy's matmul on a row-major copy
    rounds differently, so a resumed run drifted from the uninterrupted one by a bit at its first step."""
    cfg = _cartpole()
    envs, obs = make_vec_env(cfg, 3, seed=1)
    a = Collector(envs, obs)
    assert not a.obs.flags.c_contiguous  # the case this guards
    b = Collector(*make_vec_env(cfg, 3, seed=1))
    b.load_state_dict(_round_trip(a.state_dict()))
    assert b.obs.strides == a.obs.strides and np.array_equal(b.obs, a.obs)


def test_envs_that_cannot_be_restored_start_fresh_episodes_continuing_their_random_stream():
    cfg = _cartpole(vectorization="async")
    a = Collector(*make_vec_env(cfg, 2, seed=7))
    first = np.array(a.obs)  # the run's first episodes (from the seeds)
    try:
        assert a.not_restorable is not None
        for _ in range(30):
            a.step(np.ones(2, dtype=np.int64))
        mid, saved = np.array(a.obs), _round_trip(a.state_dict())
        following, _ = a.envs.reset()  # what the saved generators begin next, without a seed
        b = Collector(*make_vec_env(cfg, 2, seed=7))
        try:
            b.load_state_dict(saved)
            assert not b.continued and b.next_valid.all() and b.take().episodes == []
            assert np.array_equal(b.obs, following)
            assert not np.array_equal(b.obs, first) and not np.array_equal(b.obs, mid)
            for _ in range(40):  # and on: the same fresh episodes, deterministically
                sa, sb = a.step(np.zeros(2, dtype=np.int64)), b.step(np.zeros(2, dtype=np.int64))
                assert all(np.array_equal(x, y) for x, y in zip(sa[:6], sb[:6]))
        finally:
            b.close()
    finally:
        a.close()


def test_stepping_time_is_the_collectors_env_part():
    clock = Stopwatch()
    c = collector(counters(10, 10), clock=clock)
    c.step(np.zeros(2, dtype=np.int64))
    t = clock.totals()
    assert t["env"] > 0 and all(t[k] == 0 for k in ("inference", "forward", "backward", "optimizer"))


def _cartpole(**kw):
    from p2prl.precheck import compose
    return compose("env=cartpole", *(f"env.{k}={v}" for k, v in kw.items())).env


def _round_trip(state: dict) -> dict:
    import io
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return torch.load(f, weights_only=True)
