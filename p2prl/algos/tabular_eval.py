"""Exact planning and evaluation for tabular gymnasium envs (Taxi, FrozenLake, CliffWalking).

These envs expose their model as `env.unwrapped.P[s][a] = [(prob, next_state, reward, terminated)]`
and their start distribution as `env.unwrapped.initial_state_distrib`. From them we compute the
optimal values by value iteration and evaluate any deterministic policy *exactly* under a time limit,
so learned Q tables can be judged against the true optimum without Monte-Carlo noise.
"""
from __future__ import annotations

from typing import NamedTuple

import gymnasium as gym
import numpy as np


class TabularModel(NamedTuple):
    """Dense model: `cont[s, a, s']` probability of moving to s' *without* terminating (S, A, S);
    `reward[s, a]` expected immediate reward (S, A); `init[s]` start distribution (S,)."""

    cont: np.ndarray
    reward: np.ndarray
    init: np.ndarray


def tabular_model(env: gym.Env) -> TabularModel:
    """The dense model of a toy-text env (wrappers are looked through)."""
    u = env.unwrapped
    n_s, n_a = int(u.observation_space.n), int(u.action_space.n)
    cont = np.zeros((n_s, n_a, n_s))
    reward = np.zeros((n_s, n_a))
    for s in range(n_s):
        for a in range(n_a):
            for p, s2, r, terminated in u.P[s][a]:
                reward[s, a] += p * r
                if not terminated:  # a terminating transition contributes no future value
                    cont[s, a, int(s2)] += p
    return TabularModel(cont, reward, np.asarray(u.initial_state_distrib, dtype=np.float64))


def value_iteration(model: TabularModel, gamma: float, tol: float = 1e-10,
                    max_iters: int = 100_000) -> np.ndarray:
    """Optimal action values Q* (S, A) for discount `gamma` (gamma = 1 needs every policy's
    values to be bounded, as in Taxi and CliffWalking where loops only cost reward)."""
    q = np.zeros_like(model.reward)
    for _ in range(max_iters):
        new = model.reward + gamma * model.cont @ q.max(1)
        if np.abs(new - q).max() < tol:
            return new
        q = new
    raise RuntimeError(f"value iteration did not converge in {max_iters} sweeps")


def greedy(q: np.ndarray) -> np.ndarray:
    """The greedy policy (S,) of a Q table (S, A); ties go to the lowest action index."""
    return np.asarray(q).argmax(1)


def policy_return(model: TabularModel, policy: np.ndarray, horizon: int) -> float:
    """Exact expected undiscounted return of a deterministic policy from the start distribution,
    for episodes cut off after `horizon` steps (the env's time limit)."""
    states = np.arange(len(policy))
    cont, reward = model.cont[states, policy], model.reward[states, policy]  # (S, S), (S,)
    v = np.zeros(len(policy))
    for _ in range(horizon):  # v_k = expected return of the next k steps
        v = reward + cont @ v
    return float(model.init @ v)


def rollout_returns(env: gym.Env, policy: np.ndarray, episodes: int, seed: int) -> np.ndarray:
    """Monte-Carlo returns (episodes,) of a deterministic policy in a time-limited env."""
    out = np.zeros(episodes)
    obs, _ = env.reset(seed=seed)
    for i in range(episodes):
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(int(policy[obs]))
            out[i] += r
            done = term or trunc
        obs, _ = env.reset()
    return out
