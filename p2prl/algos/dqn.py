"""DQN / double DQN with a replay buffer per peer (Ape-X-style per-peer exploration).

Every peer steps its own envs with its own epsilon, stores into its OWN replay buffer and samples its
own minibatch; the learner averages the gradients of every update across peers, so all peers keep the
same online network. Counters that schedule updates (vector steps, updates) advance in lockstep on
every peer, so each peer makes the same number of updates and syncs its target network on the same
update: no peer ever waits in a collective another one skipped. Like ppo.py, the file reads top to
bottom as the whole algorithm (config, sampling through the collector into either replay buffer,
losses, checkpoint state, its policy for evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from p2prl import checks as check
from p2prl.algos.base import ActFn, Algorithm, Peer, epsilon_greedy
from p2prl.algos.returns import td_targets
from p2prl.algos.schedules import decayed_epsilon, peer_epsilon
from p2prl.algos.transitions import ReplayConfig, TransitionWriter
from p2prl.collect import Collector
from p2prl.data import ReplayBatch, ReplayBuffer
from p2prl.frame_replay import FrameReplay
from p2prl.nets import ENCODERS, QNetwork, resolve_encoder
from p2prl.sync.optim import FlatAdam

TERMS = ("loss_td", "q_mean")


@dataclass
class DQNConfig(ReplayConfig):
    """The `algo` section of dqn (conf/algo/dqn.yaml: the defaults, commented)."""

    lr: float
    target_update_interval: int
    double_dqn: bool
    n_step: int
    eps_start: float
    eps_end: float
    exploration_fraction: float
    apex_alpha: Optional[float]
    max_grad_norm: Optional[float]
    encoder: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check.fields(self, "algo.", positive=("lr",), positive_int=("target_update_interval", "n_step"),
                     unit=("eps_start", "eps_end", "exploration_fraction"), optional_nonneg=("apex_alpha",),
                     optional_positive=("max_grad_norm",), boolean=("double_dqn",))
        check.choice("algo.encoder", self.encoder, ENCODERS)


class DQN(Algorithm):
    def __init__(self, cfg: DQNConfig, collector: Collector, peer: Peer) -> None:
        self.cfg, self.collector, self.peer, self.clock = cfg, collector, peer, peer.clock
        obs_space = collector.observation_space
        self.n_actions = int(collector.action_space.n)
        dev = peer.device
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
            k = collector.frame_stack
            least = (k + cfg.n_step + cfg.train_freq) * cfg.num_envs  # the frames a stored transition reaches
            if cfg.buffer_size < least:
                raise check.ConfigError("algo.buffer_size", cfg.buffer_size, f"must hold at least {least} frames "
                                        "here (frame stack + n_step + train_freq vector steps of every env)")
            self.buffer = FrameReplay(cfg.buffer_size, obs_space.shape, cfg.num_envs, k, self.rng)
        else:
            self.buffer = ReplayBuffer(cfg.buffer_size, obs_space.shape, self.rng)
        self.num_envs = cfg.num_envs
        self.writer = TransitionWriter(self.buffer, self.obs, cfg.num_envs, cfg.n_step, cfg.gamma)
        self.vector_steps = 0  # identical on every peer
        # Vector step from which learning_starts counts: moves to the resume point when the replay
        # buffers were not restored, so no peer ever samples an empty or nearly empty buffer.
        self.fill_from = 0
        self.epsilon = cfg.eps_start

    def shared_tensors(self) -> list[torch.Tensor]:
        return list(self.q.parameters()) + list(self.target.parameters())

    # -- acting ----------------------------------------------------------------------------------
    @property
    def obs(self) -> np.ndarray:
        """The collector's current observations (N, *obs_shape) in the network's dtype."""
        return np.asarray(self.collector.obs, dtype=self.obs_dtype)

    @torch.inference_mode()
    def _act(self) -> np.ndarray:
        explore = self.rng.random(self.num_envs) < self.epsilon
        random = self.rng.integers(0, self.n_actions, self.num_envs)
        if explore.all():  # no greedy action is taken: skip the network (most steps early on, as SB3 does)
            return random
        greedy = self.q(torch.from_numpy(self.obs).to(self.peer.device)).argmax(1).cpu().numpy()
        return np.where(explore, random, greedy)

    def collect(self, vector_steps: int) -> None:
        for _ in self.collector.rollout(vector_steps):
            with self.clock("inference"):
                actions = self._act()
            s = self.collector.step(actions)
            with self.clock("storage"):
                next_obs = np.asarray(s.next_obs, dtype=self.obs_dtype)
                self.writer.add(actions, np.asarray(s.rewards, dtype=np.float32), next_obs, s.terminated, s.truncated,
                                s.valid)
        self.vector_steps += vector_steps

    def sample(self, progress: float) -> None:
        c = self.cfg
        eps = decayed_epsilon(c.eps_start, c.eps_end, c.exploration_fraction, progress)
        self.epsilon = peer_epsilon(eps, self.peer.rank, self.peer.world_size, c.apex_alpha)
        self.collect(c.train_freq)

    # -- learning --------------------------------------------------------------------------------
    def loss(self, b: ReplayBatch) -> tuple[torch.Tensor, dict]:
        dev = self.peer.device
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
            with torch.no_grad(), self.clock("optimizer"):
                for t, p in zip(self.target.parameters(), self.q.parameters()):
                    t.copy_(p) if tau >= 1.0 else t.lerp_(p, tau)

    def learn(self, progress: float) -> dict[str, float]:
        c = self.cfg
        logs = {"epsilon": self.epsilon, "buffer_size": self.buffer.size}
        filled = self.vector_steps - self.fill_from  # agreed on every peer
        # n_step + 1 vector steps guarantee every peer has stored a transition, whatever the resets.
        if filled * self.num_envs * self.peer.world_size >= c.learning_starts and filled > c.n_step:
            for _ in range(c.gradient_steps):
                with self.clock("forward"):  # the replay minibatch, its TD targets and Q values
                    loss, terms = self.loss(self.buffer.sample(c.batch_size))
                if self.learner.step(loss, terms) is not None:
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
        """This peer's own state: exploration RNG, n-step windows, replay if asked."""
        s = {"explore_rng": self.rng.bit_generator.state, **self.writer.state_dict(keys=replay)}
        return {**s, "replay": self.buffer.state_dict()} if replay else s

    def load_rank_state_dict(self, s: dict) -> None:
        """Restore what rank_state_dict saved; where the collector started fresh episodes (envs whose
        state cannot be restored) the replay is kept, the n-step windows are not."""
        self.rng.bit_generator.state = s["explore_rng"]
        if "replay" in s:  # checkpoint.replay is a config value: the same branch on every peer
            self.buffer.load_state_dict(s["replay"])  # global frame indices (keys) stay valid
            self.fill_from = 0
        self.writer.load_state_dict(s, self.obs, continued=self.collector.continued)


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
