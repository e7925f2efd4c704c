"""TD3: a deterministic actor, twin Q critics, target policy smoothing and delayed actor updates
(Fujimoto et al. 2018, as SB3's TD3).

The loop is the shared off-policy one (`p2prl.algos.offpolicy`: a replay buffer per peer, warm-up,
lockstep counters); each peer explores with Gaussian noise of std `action_noise` from its own stream.
One update is one `Learner.step` on the peer's own minibatch (or, with `algo.actor_after_critics`,
two: the critics', then on the delayed updates the actor's through the critics' new parameters, as SB3
orders them; `p2prl.algos.offpolicy.OffPolicy.in_order`):
- critics: MSE(q1, y) + MSE(q2, y), y = r + discount (1 - terminated) min of the target critics at
  a' = clip(target actor(s') + clip(target_noise x N(0, 1), +-target_noise_clip), -1, 1);
- actor, on every `policy_delay`-th update only: -q1(s, actor(s)), through critics that read the online
  parameters detached (`alias`), so the critics' gradient comes from their loss alone.
Both gradients fill disjoint segments [actor | critics] of one bucket, averaged by ONE all-reduce. The
term `actor_update` (1 on the updates that train the actor, else 0) gates the actor's segment: on the
other updates Adam leaves it alone, moments and step count included, as a separate actor optimizer
that is not stepped would. After each applied actor update every peer moves the target actor and
critics by Polyak averaging (one op: they are laid out as the bucket), identically everywhere.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2prl import checks as check
from p2prl.algos.base import ActFn, Collector, Peer
from p2prl.algos.greedy import GreedyPolicy, Scale, frozen
from p2prl.algos.offpolicy import OffPolicy, OffPolicyConfig, alias, deterministic_policy, flat_copy
from p2prl.algos.returns import td_targets
from p2prl.data import ReplayBatch
from p2prl.nets import DeterministicActor, TwinQ, flat_dim
from p2prl.sync.learner import Update

TERMS = ("loss_critic", "loss_actor", "actor_update", "q_mean")


@dataclass
class TD3Config(OffPolicyConfig):
    """The `algo` section of td3 (conf/algo/td3.yaml: the defaults, commented)."""

    policy_delay: int
    action_noise: float
    target_noise: float
    target_noise_clip: float

    def __post_init__(self) -> None:
        super().__post_init__()
        check.fields(self, "algo.", positive_int=("policy_delay",),
                     nonneg=("action_noise", "target_noise", "target_noise_clip"))


class TD3Model(nn.Module):
    """What a checkpoint's `model` holds: the actor and the twin critics, in the bucket's order."""

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, cfg: TD3Config) -> None:
        super().__init__()
        obs_dim, act_dim = flat_dim(obs_space), flat_dim(act_space)
        self.actor = DeterministicActor(obs_dim, act_dim, cfg.hidden_sizes, cfg.activation)
        self.critics = TwinQ(obs_dim, act_dim, cfg.hidden_sizes, cfg.activation)


class TD3(OffPolicy):
    def __init__(self, cfg: TD3Config, collector: Collector, peer: Peer) -> None:
        self.model = TD3Model(collector.observation_space, collector.action_space, cfg).to(peer.device)
        m = self.model
        groups = [("actor", list(m.actor.parameters()), cfg.actor_lr),
                  ("critics", list(m.critics.parameters()), cfg.critic_lr)]
        super().__init__(cfg, collector, peer, groups, TERMS, gates={"actor": "actor_update"})
        # After the learner: its broadcast made rank 0's parameters every peer's, and the model's
        # parameters views of its flat parameter.
        self.critics_detached = alias(copy.deepcopy(m.critics), m.critics)
        self.target, self.target_flat = flat_copy(m)  # [actor | critics], as the bucket
        self.everything = slice(0, self.segments["critics"].stop)

    def shared_tensors(self) -> list[torch.Tensor]:
        return [self.learner.bucket.flat_param, self.target_flat]

    def explore(self, obs: torch.Tensor) -> np.ndarray:
        noise = self.rng.normal(0.0, self.cfg.action_noise, (len(obs), self.act_dim))
        return np.clip(self.model.actor(obs).cpu().numpy() + noise, -1.0, 1.0).astype(np.float32)

    def critic_loss(self, b: ReplayBatch, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The critics' loss on minibatch `b` and q1's mean; `noise` (B, A): standard normal draws for
        the target policy smoothing."""
        c, m = self.cfg, self.model
        with torch.no_grad():
            smoothing = (noise * c.target_noise).clamp(-c.target_noise_clip, c.target_noise_clip)
            next_actions = (self.target.actor(b.next_obs) + smoothing).clamp(-1.0, 1.0)
            # discounts hold gamma (one-step transitions); truncated transitions bootstrap, terminated do not.
            y = td_targets(b.rewards, torch.min(*self.target.critics(b.next_obs, next_actions)) * b.discounts,
                           b.terminated, 1.0)
        q1, q2 = m.critics(b.obs, b.actions)
        return F.mse_loss(q1, y) + F.mse_loss(q2, y), q1.detach().mean()

    def actor_loss(self, b: ReplayBatch) -> torch.Tensor:
        """-q1(s, actor(s)) through the critics as they are now (detached)."""
        return -self.critics_detached.first(b.obs, self.model.actor(b.obs)).mean()

    @staticmethod
    def terms(loss_critic: torch.Tensor, loss_actor: torch.Tensor, train_actor: bool, q_mean: torch.Tensor) -> dict:
        return {"loss_critic": loss_critic.detach(), "loss_actor": loss_actor.detach(),
                "actor_update": torch.tensor(float(train_actor)), "q_mean": q_mean}

    def loss(self, b: ReplayBatch, noise: torch.Tensor, train_actor: bool) -> tuple[torch.Tensor, dict]:
        """The summed losses on minibatch `b` (B transitions) and their named terms, every gradient from
        the parameters before this update; the actor's loss only if `train_actor`."""
        loss_critic, q_mean = self.critic_loss(b, noise)
        loss_actor = self.actor_loss(b) if train_actor else loss_critic.new_zeros(())
        return loss_critic + loss_actor, self.terms(loss_critic, loss_actor, train_actor, q_mean)

    def update_in_order(self, b: ReplayBatch, noise: torch.Tensor, train_actor: bool) -> Update:
        """One update as SB3 orders it (`OffPolicy.in_order`): the critics step first; on the updates
        that train the actor, it then steps through the new critics."""
        with self.clock("forward"):
            loss_critic, q_mean = self.critic_loss(b, noise)
            terms = self.terms(loss_critic, loss_critic.new_zeros(()), train_actor, q_mean)
        return self.in_order((loss_critic, terms), (lambda: self.actor_loss(b)) if train_actor else None)

    def draw(self, batch: ReplayBatch) -> tuple[ReplayBatch, torch.Tensor, bool]:
        """`batch` on the device, the smoothing noise from this peer's torch stream, and whether this
        update trains the actor (the same decision on every peer: the lockstep update counter)."""
        b = ReplayBatch(*(t.to(self.device) for t in batch))
        noise = torch.randn((len(b.rewards), self.act_dim), device=self.device)
        return b, noise, self.updates_started % self.cfg.policy_delay == 0

    def after_update(self, update: Update) -> None:
        if update.applied and update.terms["actor_update"] != 0.0:
            self.polyak(self.target_flat, self.everything)


def policy(cfg: TD3Config, state: dict, obs_space: gym.Space, act_space: gym.Space,
           device: torch.device = torch.device("cpu")) -> ActFn:
    """A checkpoint's actor scaled to the bounds; not deterministic: with its exploration noise
    (`algo.action_noise`) from the policy's generator."""
    model = TD3Model(obs_space, act_space, cfg)
    model.load_state_dict(state["model"])

    def noisy(obs: torch.Tensor, actor: DeterministicActor, rng: np.random.Generator) -> torch.Tensor:
        noise = torch.from_numpy(rng.normal(0.0, cfg.action_noise, (len(obs), flat_dim(act_space))).astype(np.float32))
        return (actor(obs) + noise.to(obs.device)).clamp(-1.0, 1.0)
    return deterministic_policy(model.actor, act_space, device, noisy)


def greedy_module(cfg: TD3Config, state: dict, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
    """The actor's action scaled to the bounds (p2prl.algos.greedy)."""
    model = TD3Model(obs_space, act_space, cfg)
    model.load_state_dict(state["model"])
    return frozen(GreedyPolicy(nn.Sequential(model.actor, Scale(act_space)), act_space))
