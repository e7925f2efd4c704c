"""A straggler on purpose, for `python -m p2prl.bench --stragglers`: CartPole whose every step takes
P2PRL_BENCH_SLOW_S seconds longer (default 0.0005) on rank 1. Importing this module registers it;
p2prl trains on it with `env=cartpole env.id=p2prl.bench.straggler:SlowCartPole-v1`."""
from __future__ import annotations

import os
import time

import gymnasium as gym

ENV_ID = "p2prl.bench.straggler:SlowCartPole-v1"


class SlowOnRank1(gym.Wrapper):
    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        slow = os.environ.get("RANK") == "1"
        self.delay = float(os.environ.get("P2PRL_BENCH_SLOW_S", "0.0005")) if slow else 0.0

    def step(self, action):
        if self.delay:
            time.sleep(self.delay)
        return self.env.step(action)


gym.register("SlowCartPole-v1", entry_point=lambda **kw: SlowOnRank1(gym.make("CartPole-v1", **kw)),
             max_episode_steps=500)
