"""Peers' random streams: a peer's exploration never draws the stream of an env, of another peer or of
another purpose (a generator seeded with the integer seed + rank would draw env seed + rank's)."""
import numpy as np
import pytest
from gymnasium.utils.seeding import np_random

from p2prl.comm import LocalComm
from p2prl.runner import build_algorithm
from p2prl.seeding import env_seed, peer_rng


def _draws(rng: np.random.Generator) -> tuple:
    return tuple(rng.integers(0, 2 ** 62, 4))


def test_an_integer_seed_draws_the_env_stream_which_peer_rng_avoids():
    # The pitfall itself: gymnasium seeds an env's generator exactly as default_rng(seed) does.
    assert _draws(np.random.default_rng(7)) == _draws(np_random(7)[0])
    envs = {_draws(np_random(s)[0]) for s in range(256)}
    streams = {_draws(peer_rng(seed, rank, purpose)) for seed in range(16) for rank in range(8)
               for purpose in ("explore", "replay")}
    assert len(streams) == 16 * 8 * 2  # no two peers or purposes share a stream
    assert not streams & envs


@pytest.mark.parametrize("algo, env", [("dqn", "cartpole"), ("qlearning", "taxi")])
def test_exploration_is_not_any_envs_stream(algo, env, compose):
    cfg = compose(f"algo={algo}", f"env={env}", "seed=3", "algo.num_envs=2")
    a = build_algorithm(cfg, LocalComm())
    mine = _draws(a.rng)
    envs = {_draws(np_random(env_seed(cfg.seed, rank, 2) + i)[0]) for rank in range(4) for i in range(2)}
    assert mine not in envs
