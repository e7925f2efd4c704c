"""Tabular Q-learning: the exact summed update by hand, identical tables on real gloo peers, and
learning to the optimum that value iteration computes from the env's own model."""
import json
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

from p2prl.algos import Peer
from p2prl.collect import Collector
from p2prl.algos.qlearning import QLearning, apply_td_sums, td_errors
from p2prl.algos.schedules import decayed_epsilon, peer_epsilon
from p2prl.algos.tabular_eval import greedy, policy_return, rollout_returns, tabular_model, value_iteration
from p2prl.comm import LocalComm, open_comm
from p2prl.config import EnvConfig
from p2prl.envs import make_single_env
from p2prl.precheck import compose
from p2prl.runner import build_algorithm

pytestmark = pytest.mark.timeout(240)
GAMMA = 0.9


def test_apply_td_sums_hand_computed():
    q = np.array([[1.0, 2.0], [3.0, 4.0]])
    delta_sum = np.array([[0.6, 0.0], [-2.0, 5.0]])
    counts = np.array([[3.0, 0.0], [4.0, 1.0]])
    apply_td_sums(q, delta_sum, counts, alpha=0.5)
    # 1 + 0.5 * 0.6/3, untouched (never visited), 3 + 0.5 * -2/4, 4 + 0.5 * 5/1
    assert np.allclose(q, [[1.1, 2.0], [2.75, 6.5]], atol=1e-12)


def test_td_errors_terminated_do_not_bootstrap():
    q = np.array([[1.0, 0.0], [2.0, 5.0]])
    s, a, r, s2 = np.array([0, 0]), np.array([0, 1]), np.array([1.0, 1.0]), np.array([1, 1])
    delta = td_errors(q, s, a, r, s2, np.array([False, True]), GAMMA)
    assert np.allclose(delta, [1.0 + GAMMA * 5.0 - 1.0, 1.0 - 0.0])


def test_apex_epsilon_per_peer():
    assert peer_epsilon(0.4, 0, 1, 7.0) == 0.4  # one peer: eps itself
    assert peer_epsilon(0.4, 0, 3, None) == peer_epsilon(0.4, 2, 3, None) == 0.4
    assert peer_epsilon(0.4, 0, 3, 7.0) == 0.4 and np.isclose(peer_epsilon(0.4, 2, 3, 7.0), 0.4 ** 8)
    assert np.isclose(peer_epsilon(0.4, 1, 3, 7.0), 0.4 ** 4.5)


def test_epsilon_decays_over_the_exploration_fraction():
    assert decayed_epsilon(1.0, 0.1, 0.5, 0.0) == 1.0
    assert np.isclose(decayed_epsilon(1.0, 0.1, 0.5, 0.25), 0.55)
    assert decayed_epsilon(1.0, 0.1, 0.5, 0.75) == decayed_epsilon(1.0, 0.1, 0.0, 0.0) == 0.1


# -- the summed update on a chain with known transitions -------------------------------------------
class Chain(gym.Env):
    """0 -> 1 (reward 0) -> 2 (reward 1, terminated); one action, so exploration plays no part."""

    observation_space = gym.spaces.Discrete(3)
    action_space = gym.spaces.Discrete(1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = 0
        return self.state, {}

    def step(self, action):
        self.state += 1
        return self.state, float(self.state == 2), self.state == 2, False, {}


def iterate(algo, progress: float):
    algo.sample(progress)
    sample = algo.collector.take()
    return sample, algo.learn(progress)


def _chain_tables(rank: int, limits_by_rank: list[list[int]]) -> list[np.ndarray]:
    """Two iterations of 3 vector steps on Chain copies with this rank's time limits; the table after each."""
    limits = limits_by_rank[rank]
    cfg = compose("algo=qlearning", "env=frozenlake", "algo.alpha=0.5", "algo.alpha_end=0.5", f"algo.gamma={GAMMA}",
                  f"algo.num_envs={len(limits)}", "algo.sync_every=3", "comm.timeout_s=30")
    comm = open_comm(cfg.comm, "gloo") if len(limits_by_rank) > 1 else LocalComm()
    envs = gym.vector.SyncVectorEnv([partial(gym.wrappers.TimeLimit, Chain(), n) for n in limits])
    obs, _ = envs.reset(seed=0)
    algo = QLearning(cfg.algo, Collector(envs, obs), Peer(comm, seed=rank, sync=cfg.comm))
    return [(iterate(algo, 0.0), algo.q.copy())[1] for _ in range(2)]


# Rank 0 runs whole episodes (0 -> 1 -> 2); rank 1's time limit of 1 truncates every episode at 0 -> 1.
# Iteration 1 (Q = 0): rank 0 (0,1): delta 0, (1,2): delta 1, then a reset step (not a transition);
#   rank 1 (0,1) truncated: delta 0 + g max Q(1) = 0, reset step, (0,1): 0. Summed: Q(0) += 0.5 * 0/3,
#   Q(1) += 0.5 * 1/1 -> Q = [0, 0.5, 0] on BOTH peers (rank 1 never saw state 1's reward).
# Iteration 2: rank 0 (0,1): g*0.5, (1,2): 1 - 0.5, reset; rank 1: reset, (0,1) truncated: g*0.5
#   (bootstraps), reset. Q(0) = 0.5 * (2 * 0.45)/2 = 0.225, Q(1) = 0.5 + 0.5 * 0.5/1 = 0.75.
EXPECTED = [np.array([[0.0], [0.5], [0.0]]), np.array([[GAMMA * 0.25], [0.75], [0.0]])]


def test_two_peers_sum_known_transitions_to_hand_computed_table(peers):
    tables = peers(_chain_tables, 2, [[3], [1]])
    for rank_tables in tables:
        for got, want in zip(rank_tables, EXPECTED):
            assert np.allclose(got, want, atol=1e-12), (got.ravel(), want.ravel())


def test_one_peer_with_both_envs_equals_two_peers():
    # Exactness: the summed update does not depend on which peer sampled a transition.
    for got, want in zip(_chain_tables(0, [[3, 1]]), EXPECTED):
        assert np.allclose(got, want, atol=1e-12), (got.ravel(), want.ravel())


# -- real training on 2 peers --------------------------------------------------------------------
def _frozenlake(rank: int, cfg, iterations: int) -> dict:
    algo = build_algorithm(cfg, open_comm(cfg.comm, "gloo"))
    tables, episodes, logs = [], [], []
    for i in range(iterations):
        sample, learned = iterate(algo, i / iterations)
        tables.append(algo.state_dict()["q_table"])
        episodes += [(e.t, e.env, e.ret, e.length) for e in sample.episodes]
        logs.append(learned)
    return {"tables": tables, "episodes": episodes, "logs": logs}


@pytest.mark.parametrize("sync", ["sum", "average"])
def test_tables_identical_on_two_peers_exploring_differently(sync, peers):
    cfg = compose("algo=qlearning", "env=frozenlake", "seed=5", "algo.num_envs=4", "algo.sync_every=16",
                  f"algo.sync={sync}", "comm.timeout_s=30")
    a, b = peers(_frozenlake, 2, cfg, 30)
    for i, (ta, tb) in enumerate(zip(a["tables"], b["tables"])):
        assert torch.equal(ta, tb), f"tables differ after sync {i}"
    assert a["tables"][-1].abs().sum() > 0, "nothing was learned"
    assert not torch.equal(a["tables"][0], a["tables"][-1])
    assert a["episodes"] and b["episodes"] and a["episodes"] != b["episodes"]
    assert a["logs"] == b["logs"], "logged scalars (epsilon, alpha, mean |delta|) must be global"
    assert a["logs"][-1]["epsilon"] < a["logs"][0]["epsilon"] == 1.0
    assert a["logs"][-1]["alpha"] < a["logs"][0]["alpha"] and a["logs"][-1]["td_abs_mean"] > 0


def test_cartpole_is_refused_with_one_line(tmp_path, cli):
    p = cli(["algo=qlearning", "env=cartpole", f"hydra.run.dir={tmp_path / 'run'}"], timeout=60)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "algo=qlearning" in lines[0] and "Discrete observations" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


# -- learning to the optimum (value iteration on the env's own model) ------------------------------
def _learned_vs_optimal(env_name: str, run_dir, cli) -> tuple:
    """Train the preset on 2 peers; (env, its model, learned Q, value-iteration Q*, time limit)."""
    p = cli(["algo=qlearning", f"env={env_name}", f"hydra.run.dir={run_dir}"], nproc=2, timeout=220)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_step"] >= s["config"]["train"]["total_steps"]
    q = torch.load(run_dir / "checkpoints" / f"step_{s['final_step']}.pt", weights_only=True)["q_table"]
    env = make_single_env(EnvConfig(**s["config"]["env"]))
    model = tabular_model(env)
    q_star = value_iteration(model, s["config"]["algo"]["gamma"])
    return env, model, q.numpy(), q_star, env.spec.max_episode_steps


@pytest.mark.slow
def test_taxi_reaches_the_optimal_return(run_dir, cli):
    env, model, q, q_star, horizon = _learned_vs_optimal("taxi", run_dir, cli)
    optimum = policy_return(model, greedy(q_star), horizon)
    assert abs(optimum - 7.93) < 0.01  # Taxi-v4's optimal expected return from its start distribution
    assert policy_return(model, greedy(q), horizon) > optimum - 0.5  # exact expectation
    assert abs(rollout_returns(env, greedy(q), 100, seed=0).mean() - optimum) < 0.5


@pytest.mark.slow
def test_frozenlake8x8_success_rate_close_to_value_iteration(run_dir, cli):
    _, model, q, q_star, horizon = _learned_vs_optimal("frozenlake8x8", run_dir, cli)
    # Exact success probabilities within the 100-step limit (no Monte-Carlo noise).
    optimum = policy_return(model, greedy(q_star), horizon)
    assert 0.6 < optimum < 0.66
    assert policy_return(model, greedy(q), horizon) > optimum - 0.05


@pytest.mark.slow
def test_cliffwalking_takes_the_shortest_path(run_dir, cli):
    env, _, q, _, _ = _learned_vs_optimal("cliffwalking", run_dir, cli)
    assert rollout_returns(env, greedy(q), 1, seed=0)[0] == -13


def test_checkpointed_state_resumes_bit_for_bit():
    import io

    cfg = compose("algo=qlearning", "env=taxi", "seed=1", "algo.num_envs=4", "algo.sync_every=8")
    a = build_algorithm(cfg, LocalComm())
    for i in range(5):
        iterate(a, i / 10)
    buf = io.BytesIO()
    torch.save({"shared": a.state_dict(), "own": a.rank_state_dict(), "collector": a.collector.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = build_algorithm(cfg, LocalComm())
    b.load_state_dict(saved["shared"])
    b.collector.load_state_dict(saved["collector"])
    b.load_rank_state_dict(saved["own"])
    for x in (a, b):
        iterate(x, 0.6)
        iterate(x, 0.7)
    assert a.q.any() and np.array_equal(a.q, b.q)
