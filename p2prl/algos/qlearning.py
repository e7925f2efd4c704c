"""Exact distributed tabular Q-learning for Discrete observation and action spaces.

Every peer explores its own env copies with its own epsilon-greedy policy (own RNG, optional Ape-X
per-peer epsilon). One iteration is `sync_every` vector steps.

`sync=sum` (default) is synchronous, batched Q-learning. During an iteration the shared table Q is
held fixed; each peer records its transitions and afterwards computes every TD error
    delta = r + gamma * (1 - terminated) * max_a' Q(s', a') - Q(s, a)
against that same Q (truncated transitions bootstrap, terminated ones do not; the reset step that
follows an episode end under next-step autoreset is no transition and is dropped). Per (s, a) the peer
sums its deltas and counts its visits; ONE all-reduce sums both over the peers, and every peer applies
    Q[s, a] += alpha * sum(delta) / sum(n)    wherever sum(n) > 0.
This is exact: because Q is fixed while deltas are computed, a delta depends only on its transition
and Q, never on which peer sampled it, so the update equals a single learner's update on the union of
all peers' transitions (up to floating-point summation order). It keeps the tables bit-identical: the
all-reduce leaves the same sums on every peer, the counts are small integers (exact in float64), and
every peer then runs the same deterministic arithmetic on the same inputs.

`sync=average` is classic online Q-learning per peer (Q[s, a] += alpha * delta after every step) with
the peers' tables averaged every `sync_every` steps: not exact, but each peer learns between syncs.

The table is float64 numpy (the hot loop is numpy; one vector step costs a few small array ops
besides `env.step`); `shared_tensors` and the checkpoint see it through a zero-copy torch view.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch

from p2prl import checks as check
from p2prl.algos.base import ActFn, Algorithm, Peer, epsilon_greedy
from p2prl.algos.schedules import decayed_epsilon, linear, peer_epsilon
from p2prl.collect import Collector


@dataclass
class QLearningConfig:
    """The `algo` section of qlearning (conf/algo/qlearning.yaml: the defaults, commented)."""

    name: str
    alpha: float
    alpha_end: float
    gamma: float
    num_envs: int
    sync: str
    sync_every: int
    eps_start: float
    eps_end: float
    exploration_fraction: float
    apex_alpha: Optional[float]

    def __post_init__(self) -> None:
        check.fields(self, "algo.", unit_open=("alpha", "alpha_end", "gamma"), positive_int=("num_envs", "sync_every"),
                     unit=("eps_start", "eps_end", "exploration_fraction"), optional_nonneg=("apex_alpha",))
        check.choice("algo.sync", self.sync, ("sum", "average"))


def apply_td_sums(q: np.ndarray, delta_sum: np.ndarray, counts: np.ndarray, alpha: float) -> np.ndarray:
    """Q[s, a] += alpha * delta_sum[s, a] / counts[s, a] where counts > 0, in place; returns q.

    q, delta_sum, counts: (S, A) (or any equal shapes). Unvisited pairs are left untouched.
    """
    seen = counts > 0
    q[seen] += alpha * delta_sum[seen] / counts[seen]
    return q


def td_errors(q: np.ndarray, s: np.ndarray, a: np.ndarray, r: np.ndarray, s2: np.ndarray,
              terminated: np.ndarray, gamma: float) -> np.ndarray:
    """delta = r + gamma * (1 - terminated) * max_a' Q(s2, a') - Q(s, a); all inputs (B,), q (S, A)."""
    bootstrap = np.where(terminated, 0.0, q[s2].max(1))
    return r + gamma * bootstrap - q[s, a]


class QLearning(Algorithm):
    """Tabular Q-learning; the table is `q` (n_states, n_actions)."""

    def __init__(self, cfg: QLearningConfig, collector: Collector, peer: Peer) -> None:
        self.cfg, self.collector, self.peer, self.clock = cfg, collector, peer, peer.clock
        self.n_states = int(collector.observation_space.n)
        self.n_actions = int(collector.action_space.n)
        self.num_envs = cfg.num_envs
        self.rng = peer.rng("explore")  # this peer's exploration only
        self.q = np.zeros((self.n_states, self.n_actions), dtype=np.float64)
        self.q_view = torch.from_numpy(self.q)  # shares memory: rank 0's table is copied into self.q
        sa = self.n_states * self.n_actions
        # sum mode: [delta sums (S*A) | visit counts (S*A) | sum |delta|]; average mode: [Q | sum |delta| | n].
        self.sums = peer.table_sums(self.q_view, 2 * sa + 1 if cfg.sync == "sum" else sa + 2)
        T, E = cfg.sync_every, cfg.num_envs
        self.s, self.a, self.s2 = (np.zeros((T, E), dtype=np.int64) for _ in range(3))
        self.r = np.zeros((T, E), dtype=np.float64)
        self.term = np.zeros((T, E), dtype=bool)
        self.valid = np.zeros((T, E), dtype=bool)
        self.epsilon = cfg.eps_start
        self._abs_sum = 0.0  # average mode: this peer's sum |delta| over the last sample

    def shared_tensors(self) -> list[torch.Tensor]:
        return [self.q_view]

    # -- acting ----------------------------------------------------------------------------------
    def _actions(self, obs: np.ndarray, explore: np.ndarray, random_a: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Epsilon-greedy actions (E,) in states `obs` (E,); `noise` (E, A) breaks argmax ties uniformly at random."""
        rows = self.q[obs]
        greedy = np.where(rows == rows.max(1, keepdims=True), noise, -1.0).argmax(1)
        return np.where(explore, random_a, greedy)

    def _sample(self, alpha: float) -> float:
        """Step the envs `sync_every` times, recording transitions; returns this peer's sum |delta|
        in average mode (online updates), 0 in sum mode (deltas are computed after sampling)."""
        cfg, T, E = self.cfg, self.cfg.sync_every, self.num_envs
        # One RNG call per kind for the whole iteration keeps the per-step overhead small.
        explore = self.rng.random((T, E)) < self.epsilon
        random_a = self.rng.integers(0, self.n_actions, (T, E))
        noise = self.rng.random((T, E, self.n_actions))
        online = cfg.sync == "average"
        abs_sum, c = 0.0, self.collector
        for t in c.rollout(T):
            obs = np.asarray(c.obs, dtype=np.int64)
            with self.clock("inference"):
                actions = self._actions(obs, explore[t], random_a[t], noise[t])
            step = c.step(actions)
            valid = step.valid
            with self.clock("storage"):
                self.s[t], self.a[t], self.r[t], self.s2[t] = obs, actions, step.rewards, step.next_obs
                self.term[t], self.valid[t] = step.terminated, valid
            if online and valid.any():
                with self.clock("optimizer"):  # the online update: TD errors, then the table's step
                    s, a = obs[valid], actions[valid]
                    delta = td_errors(self.q, s, a, self.r[t, valid], self.s2[t, valid], step.terminated[valid],
                                      cfg.gamma)
                    np.add.at(self.q, (s, a), alpha * delta)  # two envs in the same (s, a) both count
                    abs_sum += float(np.abs(delta).sum())
        return abs_sum

    # -- learning: the transitions recorded in self.s, a, r, s2, term, valid (sync_every, num_envs) -----
    def _sync_sum(self, alpha: float) -> tuple[float, float]:
        """One all-reduce of per-(s, a) delta sums and counts, then the identical update everywhere."""
        m = self.valid
        delta = td_errors(self.q, self.s[m], self.a[m], self.r[m], self.s2[m], self.term[m],
                          self.cfg.gamma)
        idx = self.s[m] * self.n_actions + self.a[m]
        sa = self.q.size
        buf = self.sums.buffer  # filling it fills what is summed
        buf[:sa] = np.bincount(idx, weights=delta, minlength=sa)
        buf[sa:2 * sa] = np.bincount(idx, minlength=sa)
        buf[-1] = np.abs(delta).sum()
        self.sums.sum()
        counts = buf[sa:2 * sa]
        apply_td_sums(self.q.reshape(-1), buf[:sa], counts, alpha)
        return float(buf[-1]), float(counts.sum())

    def _sync_average(self, abs_sum: float) -> tuple[float, float]:
        """Average the peers' tables (one all-reduce, with the |delta| statistics riding along)."""
        sa = self.q.size
        buf = self.sums.buffer
        buf[:sa] = self.q.reshape(-1)
        buf[sa], buf[sa + 1] = abs_sum, self.valid.sum()
        self.sums.sum()
        self.q.reshape(-1)[:] = buf[:sa] / self.peer.world_size  # same arithmetic on every peer
        return float(buf[sa]), float(buf[sa + 1])

    def _schedules(self, progress: float) -> tuple[float, float]:
        """(this peer's epsilon, alpha) at `progress`."""
        cfg = self.cfg
        eps = decayed_epsilon(cfg.eps_start, cfg.eps_end, cfg.exploration_fraction, progress)
        return peer_epsilon(eps, self.peer.rank, self.peer.world_size, cfg.apex_alpha), \
            linear(cfg.alpha, cfg.alpha_end, progress)

    def sample(self, progress: float) -> None:
        self.epsilon, alpha = self._schedules(progress)
        self._abs_sum = self._sample(alpha)

    def learn(self, progress: float) -> dict[str, float]:
        cfg = self.cfg
        _, alpha = self._schedules(progress)
        with self.clock("optimizer"):  # the table's update (its collective counts as comm)
            abs_total, n = self._sync_sum(alpha) if cfg.sync == "sum" else self._sync_average(self._abs_sum)
        eps = decayed_epsilon(cfg.eps_start, cfg.eps_end, cfg.exploration_fraction, progress)
        return {"epsilon": eps, "alpha": alpha, "td_abs_mean": abs_total / max(n, 1.0)}

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"q_table": self.q_view.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.q[...] = state["q_table"].to(torch.float64).numpy()  # in place: q_view stays shared

    def rank_state_dict(self, replay: bool = False) -> dict:
        """This peer's own state: its exploration RNG (the collector saves the envs)."""
        return {"explore_rng": self.rng.bit_generator.state}

    def load_rank_state_dict(self, s: dict) -> None:
        self.rng.bit_generator.state = s["explore_rng"]


def policy(cfg: QLearningConfig, state: dict, obs_space: gym.Space, act_space: gym.Space,
           device: torch.device = torch.device("cpu")) -> ActFn:
    """argmax Q of a checkpoint's table (ties to the lowest action); not deterministic: epsilon-greedy
    with the exploration rate training ends with (`algo.eps_end`)."""
    table = state["q_table"].numpy()

    def act(obs: np.ndarray, deterministic: bool, rng: np.random.Generator) -> np.ndarray:
        return epsilon_greedy(table[np.asarray(obs, dtype=np.int64)], deterministic, cfg.eps_end, rng)
    return act
