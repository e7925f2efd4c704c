"""Soft Actor-Critic: twin Q critics with Polyak-averaged targets, a tanh-squashed Gaussian actor, and
the temperature tuned to a target entropy (Haarnoja et al. 2018, as SB3's SAC).

The loop is the shared off-policy one (`p2prl.algos.offpolicy`: a replay buffer per peer, warm-up,
lockstep counters). One update, ordered as in SB3 and CleanRL (`algo.actor_after_critics`, the
default), is two learner steps on the peer's own minibatch: the critics and the temperature step on
their losses (one all-reduce), then the actor on its loss through the critics' NEW parameters (a
second). With `algo.actor_after_critics=false` it is one `Learner.step` of the
three losses summed, every gradient from the parameters before the update, in one all-reduce: the
actor then reads the critics one step behind, which on Hopper reached 1500 within 150k steps on
fewer seeds (docs/benchmark.md). The losses:
- critics: 0.5 (MSE(q1, y) + MSE(q2, y)), y = r + discount (1 - terminated) (min of the target
  critics at a' ~ pi(s') - alpha log pi(a'|s'));
- actor: alpha log pi(a|s) - min(q1, q2)(s, a), a ~ pi(s) reparameterized, through critics that read
  the online parameters detached (`alias`), so the critics' gradient comes from their loss alone;
- temperature: -log_alpha (log pi(a|s) + target_entropy), the log-probability detached.
Their gradients fill disjoint segments of the one bucket, [critics | log_alpha | actor] (in two parts:
each all-reduce shares its own segments, as many bytes as one) or [actor | critics | log_alpha] (in
one), averaged by all-reduce; each segment steps with its own learning rate. After every applied
update each peer moves the target critics by Polyak averaging, identically everywhere. Every random
draw is the peer's own: exploration noise from its numpy stream, the losses' reparameterization noise
from its torch one.
"""
from __future__ import annotations

import copy
import math
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
from p2prl.nets import SquashedGaussianActor, TwinQ, flat_dim
from p2prl.sync.learner import Update

TERMS = ("loss_critic", "loss_actor", "loss_alpha", "alpha", "entropy", "q_mean")


@dataclass
class SACConfig(OffPolicyConfig):
    """The `algo` section of sac (conf/algo/sac.yaml: the defaults, commented)."""

    alpha_lr: float
    alpha_init: float
    autotune: bool
    target_entropy: Optional[float]

    def __post_init__(self) -> None:
        super().__post_init__()
        check.fields(self, "algo.", positive=("alpha_lr", "alpha_init"), boolean=("autotune",))
        check.optional(check.number, "algo.target_entropy", self.target_entropy)


class SACModel(nn.Module):
    """What a checkpoint's `model` holds: the actor, the twin critics and the log temperature."""

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, cfg: SACConfig) -> None:
        super().__init__()
        obs_dim, act_dim = flat_dim(obs_space), flat_dim(act_space)
        self.actor = SquashedGaussianActor(obs_dim, act_dim, cfg.hidden_sizes, cfg.activation)
        self.critics = TwinQ(obs_dim, act_dim, cfg.hidden_sizes, cfg.activation)
        self.log_alpha = nn.Parameter(torch.tensor([math.log(cfg.alpha_init)]), requires_grad=cfg.autotune)


class SAC(OffPolicy):
    def __init__(self, cfg: SACConfig, collector: Collector, peer: Peer) -> None:
        act_space = collector.action_space
        self.model = SACModel(collector.observation_space, act_space, cfg).to(peer.device)
        m = self.model
        groups = [("critics", list(m.critics.parameters()), cfg.critic_lr)]
        if cfg.autotune:  # a fixed temperature has no segment: nothing to step
            groups.append(("alpha", [m.log_alpha], cfg.alpha_lr))
        actor = ("actor", list(m.actor.parameters()), cfg.actor_lr)
        # Updates in two parts share [critics | log_alpha], then [actor | terms]: the actor last.
        groups = [*groups, actor] if cfg.actor_after_critics else [actor, *groups]
        super().__init__(cfg, collector, peer, groups, TERMS)  # broadcasts rank 0's parameters
        # After the learner: its broadcast made rank 0's parameters every peer's, and the model's
        # parameters views of its flat parameter.
        self.critics_detached = alias(copy.deepcopy(m.critics), m.critics)
        self.target, self.target_flat = flat_copy(m.critics)
        self.target_entropy = -float(flat_dim(act_space)) if cfg.target_entropy is None else cfg.target_entropy

    def shared_tensors(self) -> list[torch.Tensor]:
        return [self.learner.bucket.flat_param, self.model.log_alpha, self.target_flat]

    def explore(self, obs: torch.Tensor) -> np.ndarray:
        noise = torch.from_numpy(self.rng.standard_normal((len(obs), self.act_dim), dtype=np.float32))
        return self.model.actor.sample(obs, noise.to(obs.device))[0].cpu().numpy()

    def critic_loss(self, b: ReplayBatch, noise: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The critics' loss on minibatch `b` and q1's mean; `noise` (B, A): the draw of a' ~ pi(s')."""
        with torch.no_grad():
            next_actions, next_log_prob = self.model.actor.sample(b.next_obs, noise)
            next_v = torch.min(*self.target(b.next_obs, next_actions)) - alpha * next_log_prob
            # discounts hold gamma (one-step transitions); truncated transitions bootstrap, terminated do not.
            y = td_targets(b.rewards, next_v * b.discounts, b.terminated, 1.0)
        q1, q2 = self.model.critics(b.obs, b.actions)
        return 0.5 * (F.mse_loss(q1, y) + F.mse_loss(q2, y)), q1.detach().mean()

    def actor_loss(self, obs: torch.Tensor, actions: torch.Tensor, log_prob: torch.Tensor,
                   alpha: torch.Tensor) -> torch.Tensor:
        """The actor's loss at a ~ pi(s) (`actions`, `log_prob`, with their graph) through the critics as
        they are now, detached."""
        return (alpha * log_prob - torch.min(*self.critics_detached(obs, actions))).mean()

    def alpha_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        return -(self.model.log_alpha * (log_prob.detach() + self.target_entropy)).mean()

    def critics_first(self, b: ReplayBatch, noise: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        """From the parameters before this update: the critics' and temperature's loss (summed), their
        terms (the actor's loss 0), and a ~ pi(s) with its graph, (actions, log_prob, alpha). `noise`: two
        (B, A) standard normal draws, for the actions at s (actor and temperature) and at s' (target)."""
        alpha = self.model.log_alpha.detach().exp()
        loss_critic, q_mean = self.critic_loss(b, noise[1], alpha)
        actions, log_prob = self.model.actor.sample(b.obs, noise[0])
        loss_alpha = self.alpha_loss(log_prob)
        terms = {"loss_critic": loss_critic.detach(), "loss_actor": torch.zeros(()), "loss_alpha": loss_alpha.detach(),
                 "alpha": alpha, "entropy": -log_prob.detach().mean(), "q_mean": q_mean}
        return loss_critic + (loss_alpha if self.cfg.autotune else 0.0), terms, (actions, log_prob, alpha)

    def loss(self, b: ReplayBatch, noise: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The summed losses on minibatch `b` (B transitions) and their named terms, every gradient
        from the parameters before this update (`critics_first`'s, and the actor's through them)."""
        loss, terms, (actions, log_prob, alpha) = self.critics_first(b, noise)
        loss_actor = self.actor_loss(b.obs, actions, log_prob, alpha)
        return loss + loss_actor, {**terms, "loss_actor": loss_actor.detach()}

    def update_in_order(self, b: ReplayBatch, noise: tuple[torch.Tensor, torch.Tensor]) -> Update:
        """One update as SB3 orders it (`OffPolicy.in_order`): the critics and temperature step first, on
        the same losses as `loss`; the actor then steps through the new critics, with the temperature
        and the draw of a ~ pi(s) from before this update. The first step's backward leaves a ~ pi(s)'s
        graph alone (the temperature reads it detached) and moves no actor parameter: the second reuses it."""
        with self.clock("forward"):
            loss, terms, (actions, log_prob, alpha) = self.critics_first(b, noise)
        return self.in_order((loss, terms), lambda: self.actor_loss(b.obs, actions, log_prob, alpha))

    def draw(self, batch: ReplayBatch) -> tuple[ReplayBatch, tuple[torch.Tensor, torch.Tensor]]:
        """`batch` on the device and the update's two noise draws, from this peer's torch stream."""
        b = ReplayBatch(*(t.to(self.device) for t in batch))
        noise = torch.randn((2, len(b.rewards), self.act_dim), device=self.device)
        return b, (noise[0], noise[1])

    def after_update(self, update: Update) -> None:
        if update.applied:
            self.polyak(self.target_flat, self.segments["critics"])


def policy(cfg: SACConfig, state: dict, obs_space: gym.Space, act_space: gym.Space,
           device: torch.device = torch.device("cpu")) -> ActFn:
    """A checkpoint's actor: deterministic, tanh(mean) scaled to the bounds; else a sample of the
    squashed Gaussian, its noise from the policy's generator."""
    model = SACModel(obs_space, act_space, cfg)
    model.load_state_dict(state["model"])

    def sample(obs: torch.Tensor, actor: SquashedGaussianActor, rng: np.random.Generator) -> torch.Tensor:
        noise = torch.from_numpy(rng.standard_normal((len(obs), flat_dim(act_space)), dtype=np.float32))
        return actor.sample(obs, noise.to(obs.device))[0]
    return deterministic_policy(model.actor, act_space, device, sample)


def greedy_module(cfg: SACConfig, state: dict, obs_space: gym.Space, act_space: gym.Space) -> nn.Module:
    """The actor's greedy action, tanh(mean), scaled to the bounds (p2prl.algos.greedy)."""
    model = SACModel(obs_space, act_space, cfg)
    model.load_state_dict(state["model"])
    return frozen(GreedyPolicy(nn.Sequential(model.actor, Scale(act_space)), act_space))
