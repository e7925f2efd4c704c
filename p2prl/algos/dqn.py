"""DQN / double DQN with a replay buffer per peer (Ape-X-style per-peer exploration).

Every peer steps its own envs with its own epsilon, stores into its OWN replay buffer and samples its
own minibatch; the learner averages the gradients of every update across peers, so all peers keep the
same online network. Counters that schedule updates (vector steps, updates) advance in lockstep on
every peer, so each peer makes the same number of updates and syncs its target network on the same
update: no peer ever waits in a collective another one skipped. Like ppo.py, the file reads top to
bottom as the whole algorithm (config, sampling into either replay buffer, losses, checkpoint state,
its policy for evaluation), a little over 250 lines.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from p2prl import checks as check
from p2prl.algos.base import (ActFn, Algorithm, Peer, Sample, epsilon_greedy, load_sampler_state,
                              sampler_state)
from p2prl.algos.returns import nstep_return, td_targets
from p2prl.algos.schedules import decayed_epsilon, peer_epsilon
from p2prl.data import ReplayBatch, ReplayBuffer
from p2prl.frame_replay import FrameReplay
from p2prl.envstate import restorable, stack_size
from p2prl.metrics import EpisodeCounter
from p2prl.nets import ENCODERS, QNetwork, resolve_encoder
from p2prl.sync.optim import FlatAdam
from p2prl.wrappers import episode_signal

TERMS = ("loss_td", "q_mean")


@dataclass
class DQNConfig:
    """The `algo` section of dqn (conf/algo/dqn.yaml: the defaults, commented)."""

    name: str
    lr: float
    gamma: float
    num_envs: int
    buffer_size: int
    batch_size: int
    learning_starts: int
    train_freq: int
    gradient_steps: int
    target_update_interval: int
    tau: float
    double_dqn: bool
    n_step: int
    eps_start: float
    eps_end: float
    exploration_fraction: float
    apex_alpha: Optional[float]
    max_grad_norm: Optional[float]
    encoder: str
    hidden_sizes: list
    activation: str

    def __post_init__(self) -> None:
        check.fields(self, "algo.", positive=("lr",), unit_open=("gamma", "tau"), nonneg_int=("learning_starts",),
                     positive_int=("num_envs", "buffer_size", "batch_size", "train_freq", "gradient_steps",
                                   "target_update_interval", "n_step"),
                     unit=("eps_start", "eps_end", "exploration_fraction"), optional_nonneg=("apex_alpha",),
                     optional_positive=("max_grad_norm",), boolean=("double_dqn",))
        check.net("algo.", self.hidden_sizes, self.activation)
        check.choice("algo.encoder", self.encoder, ENCODERS)
        if self.batch_size > self.buffer_size:
            raise check.ConfigError("algo.batch_size", self.batch_size, f"must be <= algo.buffer_size={self.buffer_size}")


class DQN(Algorithm):
    def __init__(self, cfg: DQNConfig, envs: gym.vector.VectorEnv, first_obs: np.ndarray, peer: Peer) -> None:
        self.cfg, self.envs, self.comm = cfg, envs, peer.comm
        obs_space = envs.single_observation_space
        self.n_actions = int(envs.single_action_space.n)
        dev = self.comm.device
        encoder = resolve_encoder(cfg.encoder, obs_space)
        self.q = QNetwork(obs_space, self.n_actions, cfg.hidden_sizes, cfg.activation, encoder).to(dev)
        adam = lambda p: FlatAdam(p, lr=cfg.lr, fused=encoder == "cnn")  # noqa: E731
        self.learner = peer.learner(list(self.q.parameters()), adam, cfg.max_grad_norm, TERMS)  # broadcasts rank 0's q
        self.target = QNetwork(obs_space, self.n_actions, cfg.hidden_sizes, cfg.activation, encoder).to(dev)
        self.target.load_state_dict(self.q.state_dict())
        self.target.requires_grad_(False)
        self.rng = peer.rng("explore")  # this peer's exploration and replay sampling
        self.obs_dtype = np.uint8 if encoder == "cnn" else np.float32  # frames stay bytes until the CNN
        # Images: every frame stored once, keyed by index; else the observations themselves.
        if encoder == "cnn":
            k = stack_size(envs)
            least = (k + cfg.n_step + cfg.train_freq) * cfg.num_envs  # the frames a stored transition reaches
            if cfg.buffer_size < least:
                raise check.ConfigError("algo.buffer_size", cfg.buffer_size, f"must hold at least {least} frames "
                                        "here (frame stack + n_step + train_freq vector steps of every env)")
            self.buffer = FrameReplay(cfg.buffer_size, obs_space.shape, cfg.num_envs, k, self.rng)
        else:
            self.buffer = ReplayBuffer(cfg.buffer_size, obs_space.shape, self.rng)
        self.num_envs = cfg.num_envs
        self.obs = np.asarray(first_obs, dtype=self.obs_dtype)
        self.obs_key = self.buffer.begin(self.obs)  # what transitions from self.obs are stored by
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
    @torch.inference_mode()
    def _act(self) -> np.ndarray:
        explore = self.rng.random(self.num_envs) < self.epsilon
        random = self.rng.integers(0, self.n_actions, self.num_envs)
        if explore.all():  # no greedy action is taken: skip the network (most steps early on, as SB3 does)
            return random
        greedy = self.q(torch.from_numpy(self.obs).to(self.comm.device)).argmax(1).cpu().numpy()
        return np.where(explore, random, greedy)

    def _store(self, actions, rewards, next_key, term, trunc, valid) -> None:
        """Store this step's valid transitions (n-step windows if n_step > 1).

        Under next-step autoreset `next_obs` of an ending step is the true final observation, so a
        truncated transition bootstraps from it; the following reset step (valid=False) is dropped.
        """
        c = self.cfg
        if c.n_step == 1:
            v = valid
            self.buffer.add(self.obs_key[v], actions[v], rewards[v], next_key[v],
                            np.full(int(v.sum()), c.gamma, dtype=np.float32), term[v].astype(np.float32))
            return
        for i in np.flatnonzero(valid):
            window = self.pending[i]
            window.append((self.obs_key[i], int(actions[i]), float(rewards[i])))
            if term[i] or trunc[i]:
                while window:  # flush: shorter windows, bootstrap only if truncated
                    self._emit(window, next_key[i], bool(term[i]))
                    window.popleft()
            elif len(window) == c.n_step:
                self._emit(window, next_key[i], False)
                window.popleft()

    def _emit(self, window: deque, boot_key: np.ndarray, terminated: bool) -> None:
        ret, disc = nstep_return([w[2] for w in window], self.cfg.gamma)
        key, action, _ = window[0]
        self.buffer.add(np.asarray(key)[None], np.array([action]), np.array([ret], dtype=np.float32),
                        np.asarray(boot_key)[None],
                        np.array([disc], dtype=np.float32), np.array([float(terminated)], dtype=np.float32))

    def collect(self, vector_steps: int) -> None:
        self.comm.phase = "sampling"
        for t in range(vector_steps):
            actions = self._act()
            next_obs, rewards, term, trunc, infos = self.envs.step(actions)
            next_obs = np.asarray(next_obs, dtype=self.obs_dtype)
            done = term | trunc
            valid = self.next_valid
            self.episodes.step(t, *episode_signal(rewards, done, infos), valid)
            next_key = self.buffer.observe(next_obs, valid)
            self._store(actions, np.asarray(rewards, dtype=np.float32), next_key, term, trunc, valid)
            self.obs, self.obs_key, self.next_valid = next_obs, next_key, ~done
        self.vector_steps += vector_steps

    def sample(self, progress: float) -> Sample:
        c = self.cfg
        eps = decayed_epsilon(c.eps_start, c.eps_end, c.exploration_fraction, progress)
        self.epsilon = peer_epsilon(eps, self.comm.rank, self.comm.world_size, c.apex_alpha)
        self.collect(c.train_freq)
        return Sample(c.train_freq * self.num_envs, self.episodes.take())

    # -- learning --------------------------------------------------------------------------------
    def loss(self, b: ReplayBatch) -> tuple[torch.Tensor, dict]:
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
        return loss, {"loss_td": loss.detach(), "q_mean": q.detach().mean()}

    def _after_update(self) -> None:
        # Counted in finished updates, identical on every peer: targets sync on the same step.
        if self.cfg.tau < 1.0 or self.learner.attempts % self.cfg.target_update_interval == 0:
            tau = self.cfg.tau
            with torch.no_grad():
                for t, p in zip(self.target.parameters(), self.q.parameters()):
                    t.copy_(p) if tau >= 1.0 else t.lerp_(p, tau)

    def learn(self, progress: float) -> dict[str, float]:
        c = self.cfg
        logs = {"epsilon": self.epsilon, "buffer_size": self.buffer.size}
        filled = self.vector_steps - self.fill_from  # agreed on every peer
        # n_step + 1 vector steps guarantee every peer has stored a transition, whatever the resets.
        if filled * self.num_envs * self.comm.world_size >= c.learning_starts and filled > c.n_step:
            self.comm.phase = "update"
            for _ in range(c.gradient_steps):
                if self.learner.step(*self.loss(self.buffer.sample(c.batch_size))) is not None:
                    self._after_update()
            if self.learner.finish() is not None:  # comm.overlap: the last one was still in flight
                self._after_update()
            logs.update(self.learner.take_means())
        return {**logs, "updates": self.learner.updates}

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.q.state_dict(), "target": self.target.state_dict(), "vector_steps": self.vector_steps}

    def load_state_dict(self, s: dict) -> None:
        self.q.load_state_dict(s["model"])
        self.target.load_state_dict(s["target"])
        self.vector_steps = int(s["vector_steps"])
        self.fill_from = self.vector_steps  # until load_rank_state_dict restores the replay buffers

    def rank_state_dict(self, replay: bool = False) -> dict:
        """This peer's own state: envs, sampler carry-over, n-step windows, RNG, replay if asked."""
        windows = [{"obs": torch.from_numpy(np.stack([w[0] for w in d])) if d else torch.zeros(0),
                    "actions": torch.tensor([w[1] for w in d], dtype=torch.int64),
                    "rewards": torch.tensor([w[2] for w in d], dtype=torch.float64)} for d in self.pending]
        s = {**sampler_state(self.envs, self.obs, self.next_valid, self.episodes, self.rng), "windows": windows}
        if replay:
            s["replay"] = self.buffer.state_dict()
            s["obs_key"] = torch.from_numpy(np.asarray(self.obs_key).copy())
        return s

    def load_rank_state_dict(self, s: dict) -> None:
        """Restore what rank_state_dict saved. Envs whose state cannot be restored (`restorable`) start
        fresh episodes instead, their replay kept: no n-step window then spans two episodes."""
        exact = restorable(self.envs)  # if not, the windows stay empty: saved ones end old episodes
        if exact:
            self.obs, self.next_valid = load_sampler_state(self.envs, self.episodes, self.rng, s)
            for d, w in zip(self.pending, s["windows"]):
                d.clear()
                d.extend((o.numpy().copy(), int(a), float(r)) for o, a, r in zip(w["obs"], w["actions"], w["rewards"]))
        else:
            self.rng.bit_generator.state = s["explore_rng"]
        if "replay" in s:  # checkpoint.replay is a config value: the same branch on every peer
            self.buffer.load_state_dict(s["replay"])  # global frame indices (keys) stay valid
            self.fill_from = 0
        if exact and "obs_key" in s:
            self.obs_key = s["obs_key"].numpy().copy()
        else:  # fresh episodes, or a fresh buffer that the windows' frame indices would not point into
            self.obs_key = self.buffer.begin(self.obs)
            if isinstance(self.buffer, FrameReplay):
                for d in self.pending:
                    d.clear()


def policy(cfg: DQNConfig, state: dict, obs_space: gym.Space, act_space: gym.Space,
           device: torch.device = torch.device("cpu")) -> ActFn:
    """argmax Q of a checkpoint's online network; not deterministic: epsilon-greedy with the
    exploration rate training ends with (`algo.eps_end`), as SB3's DQN predicts after training."""
    q = QNetwork(obs_space, int(act_space.n), cfg.hidden_sizes, cfg.activation, resolve_encoder(cfg.encoder, obs_space))
    q.load_state_dict(state["model"])
    q.to(device)

    @torch.inference_mode()
    def act(obs: np.ndarray, deterministic: bool, rng: np.random.Generator) -> np.ndarray:
        values = q(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        return epsilon_greedy(values, deterministic, cfg.eps_end, rng)
    return act
