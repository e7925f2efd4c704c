"""DQN / double DQN with a replay buffer per peer (Ape-X-style per-peer exploration).

Every peer steps its own envs with its own epsilon, stores into its OWN replay buffer and samples its
own minibatch; the learner averages the gradients of every update across peers, so all peers keep the
same online network. Counters that schedule updates (vector steps, updates) advance in lockstep on
every peer, so each peer makes the same number of updates and syncs its target network on the same
update: no peer ever waits in a collective another one skipped.
"""
from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from p2prl.algos import IterationResult, load_sampler_state, sampler_state
from p2prl.algos.returns import nstep_return, td_targets
from p2prl.algos.schedules import decayed_epsilon, peer_epsilon
from p2prl.comm import Communicator
from p2prl.config import DQNConfig
from p2prl.data import ReplayBatch, ReplayBuffer
from p2prl.learner import Learner
from p2prl.metrics import EpisodeCounter
from p2prl.nets import QNetwork
from p2prl.optim import FlatAdam

EXTRAS = ("loss_td", "q_mean")


class DQN:
    def __init__(self, cfg: DQNConfig, envs: gym.vector.VectorEnv, first_obs: np.ndarray,
                 comm: Communicator, seed: int) -> None:
        self.cfg, self.envs, self.comm = cfg, envs, comm
        obs_space = envs.single_observation_space
        self.n_actions = int(envs.single_action_space.n)
        self.q = QNetwork(obs_space, self.n_actions, cfg.hidden_sizes, cfg.activation).to(comm.device)
        self.learner = Learner(list(self.q.parameters()), lambda p: FlatAdam(p, lr=cfg.lr), comm,
                               cfg.max_grad_norm, n_extras=len(EXTRAS))
        self.learner.broadcast_parameters()
        self.target = QNetwork(obs_space, self.n_actions, cfg.hidden_sizes, cfg.activation).to(comm.device)
        self.target.load_state_dict(self.q.state_dict())
        self.target.requires_grad_(False)
        self.rng = np.random.default_rng(seed)  # this peer's exploration and replay sampling
        self.buffer = ReplayBuffer(cfg.buffer_size, obs_space.shape, self.rng)
        self.num_envs = cfg.num_envs
        self.obs = np.asarray(first_obs, dtype=np.float32)
        self.next_valid = np.ones(cfg.num_envs, dtype=bool)  # False on next-step autoreset steps
        self.pending = [deque() for _ in range(cfg.num_envs)]  # n-step windows per env
        self.episodes = EpisodeCounter(cfg.num_envs)
        self.vector_steps = 0  # identical on every peer
        # Vector step from which learning_starts counts: moves to the resume point when the replay
        # buffers were not restored, so no peer ever samples an empty or nearly empty buffer.
        self.fill_from = 0
        self.epsilon = cfg.eps_start

    def shared_tensors(self) -> list[torch.Tensor]:
        return list(self.q.parameters()) + list(self.target.parameters())

    # -- acting ----------------------------------------------------------------------------------
    def _schedule_epsilon(self, progress: float) -> float:
        c = self.cfg
        eps = decayed_epsilon(c.eps_start, c.eps_end, c.exploration_fraction, progress)
        return peer_epsilon(eps, self.comm.rank, self.comm.world_size, c.apex_alpha)

    @torch.inference_mode()
    def _act(self) -> np.ndarray:
        greedy = self.q(torch.from_numpy(self.obs).to(self.comm.device)).argmax(1).cpu().numpy()
        explore = self.rng.random(self.num_envs) < self.epsilon
        return np.where(explore, self.rng.integers(0, self.n_actions, self.num_envs), greedy)

    def _store(self, actions, rewards, next_obs, term, trunc, valid) -> None:
        """Store this step's valid transitions (n-step windows if n_step > 1).

        Under next-step autoreset `next_obs` of an ending step is the true final observation, so a
        truncated transition bootstraps from it; the following reset step (valid=False) is dropped.
        """
        c = self.cfg
        if c.n_step == 1:
            v = valid
            self.buffer.add(self.obs[v], actions[v], rewards[v], next_obs[v],
                            np.full(int(v.sum()), c.gamma, dtype=np.float32), term[v].astype(np.float32))
            return
        for i in np.flatnonzero(valid):
            window = self.pending[i]
            window.append((self.obs[i], int(actions[i]), float(rewards[i])))
            if term[i] or trunc[i]:
                while window:  # flush: shorter windows, bootstrap only if truncated
                    self._emit(window, next_obs[i], bool(term[i]))
                    window.popleft()
            elif len(window) == c.n_step:
                self._emit(window, next_obs[i], False)
                window.popleft()

    def _emit(self, window: deque, boot_obs: np.ndarray, terminated: bool) -> None:
        ret, disc = nstep_return([w[2] for w in window], self.cfg.gamma)
        obs, action, _ = window[0]
        self.buffer.add(obs[None], np.array([action]), np.array([ret], dtype=np.float32), boot_obs[None],
                        np.array([disc], dtype=np.float32), np.array([float(terminated)], dtype=np.float32))

    def collect(self, vector_steps: int) -> None:
        self.comm.phase = "sampling"
        for t in range(vector_steps):
            actions = self._act()
            next_obs, rewards, term, trunc, _ = self.envs.step(actions)
            next_obs = np.asarray(next_obs, dtype=np.float32)
            done = term | trunc
            valid = self.next_valid
            self.episodes.step(t, rewards, done, valid)
            self._store(actions, np.asarray(rewards, dtype=np.float32), next_obs, term, trunc, valid)
            self.obs, self.next_valid = next_obs, ~done
        self.vector_steps += vector_steps

    # -- learning --------------------------------------------------------------------------------
    def _loss(self, b: ReplayBatch) -> tuple[torch.Tensor, tuple]:
        dev = self.comm.device
        obs, next_obs = b.obs.to(dev), b.next_obs.to(dev)
        q = self.q(obs).gather(1, b.actions.to(dev)[:, None]).squeeze(1)
        with torch.no_grad():
            next_q = self.target(next_obs)
            if self.cfg.double_dqn:  # the online net picks, the target net evaluates
                best = self.q(next_obs).argmax(1, keepdim=True)
                next_v = next_q.gather(1, best).squeeze(1)
            else:
                next_v = next_q.max(1).values
            # discounts already hold gamma^k for the k rewards summed (n-step, shortened at episode end).
            target = td_targets(b.rewards.to(dev), next_v * b.discounts.to(dev), b.terminated.to(dev), 1.0)
        loss = F.smooth_l1_loss(q, target)
        return loss, (loss.detach(), q.detach().mean())

    def _sync_target(self) -> None:
        tau = self.cfg.tau
        with torch.no_grad():
            for t, p in zip(self.target.parameters(), self.q.parameters()):
                t.copy_(p) if tau >= 1.0 else t.lerp_(p, tau)

    def update(self, progress: float) -> dict:
        self.comm.phase = "update"
        c = self.cfg
        sums = torch.zeros(len(EXTRAS))
        learner = self.learner
        for _ in range(c.gradient_steps):
            loss, extras = self._loss(self.buffer.sample(c.batch_size))
            if learner.overlap:  # comm.overlap: this applies the previous step's averaged gradient
                averaged = learner.backward_overlapped(loss, extras)
                self._after_update(averaged, learner.last_applied, sums)
            else:
                averaged = learner.backward(loss, extras)
                self._after_update(averaged, learner.apply(), sums)
        if learner.overlap:
            averaged = learner.finish()
            self._after_update(averaged, learner.last_applied, sums)
        return {k: float(v) / c.gradient_steps for k, v in zip(EXTRAS, sums)}

    def _after_update(self, averaged: torch.Tensor | None, applied: bool, sums: torch.Tensor) -> None:
        if averaged is None:  # the first overlapped step: nothing finished yet
            return
        if applied:
            sums += averaged.cpu()
        # Counted in finished updates, identical on every peer: targets sync on the same step.
        attempts = self.learner.updates + self.learner.skipped
        if self.cfg.tau < 1.0 or attempts % self.cfg.target_update_interval == 0:
            self._sync_target()

    def iteration(self, progress: float, episode_table=None) -> IterationResult:
        c = self.cfg
        self.epsilon = self._schedule_epsilon(progress)
        self.collect(c.train_freq)
        logs = {"epsilon": self.epsilon, "buffer_size": self.buffer.size}
        filled = self.vector_steps - self.fill_from  # agreed on every peer
        # n_step + 1 vector steps guarantee every peer has stored a transition, whatever the resets.
        if filled * self.num_envs * self.comm.world_size >= c.learning_starts and filled > c.n_step:
            logs.update(self.update(progress))
        logs.update(updates=self.learner.updates, skipped_updates=self.learner.skipped)
        return IterationResult(c.train_freq * self.num_envs, self.episodes.take(), logs)

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.q.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.learner.optimizer.state_dict(), "updates": self.learner.updates,
                "skipped": self.learner.skipped, "skipped_in_a_row": self.learner.skipped_in_a_row,
                "vector_steps": self.vector_steps}

    def load_state_dict(self, s: dict) -> None:
        self.q.load_state_dict(s["model"])
        self.target.load_state_dict(s["target"])
        self.learner.optimizer.load_state_dict(s["optimizer"])
        self.learner.updates, self.learner.skipped = int(s["updates"]), int(s["skipped"])
        self.learner.skipped_in_a_row = int(s.get("skipped_in_a_row", 0))
        self.vector_steps = int(s["vector_steps"])
        self.fill_from = self.vector_steps  # until load_rank_state_dict restores the replay buffers

    def rank_state_dict(self, replay: bool = False) -> dict:
        """This peer's own state: envs, sampler carry-over, n-step windows, RNG, replay if asked."""
        windows = [{"obs": torch.from_numpy(np.stack([w[0] for w in d])) if d else torch.zeros(0),
                    "actions": torch.tensor([w[1] for w in d], dtype=torch.int64),
                    "rewards": torch.tensor([w[2] for w in d], dtype=torch.float64)} for d in self.pending]
        s = {**sampler_state(self), "windows": windows}
        if replay:
            s["replay"] = self.buffer.state_dict()
        return s

    def load_rank_state_dict(self, s: dict) -> None:
        load_sampler_state(self, s)
        for d, w in zip(self.pending, s["windows"]):
            d.clear()
            d.extend((o.numpy().copy(), int(a), float(r)) for o, a, r in zip(w["obs"], w["actions"], w["rewards"]))
        if "replay" in s:  # checkpoint.replay is one config value: the same branch on every peer
            self.buffer.load_state_dict(s["replay"])
            self.fill_from = 0
