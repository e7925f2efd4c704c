"""PPO, and A2C as its one-epoch, one-minibatch, no-clip setting; discrete and continuous actions.

Each peer samples `num_envs x num_steps` transitions from its own vector env, computes GAE, then runs
`update_epochs` epochs of `num_minibatches` minibatches. Every minibatch gradient is averaged across
peers by the learner (one flat all-reduce), so N peers behave like one peer with N times the envs.
The file reads top to bottom as the whole algorithm (config, sampling through the collector,
advantages, losses, checkpoint state, its policy for evaluation and p2prl.load).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch

from p2prl import checks as check
from p2prl.algos.base import ActFn, Algorithm, Peer
from p2prl.algos.returns import gae, sample_weights
from p2prl.collect import Collector
from p2prl.data import Rollout, allocate_rollout
from p2prl.nets import ENCODERS, ActorCritic, resolve_encoder
from p2prl.normalize import ReturnScaler, RunningNormalizer, moments_of
from p2prl.sync.optim import FlatAdam, FlatRMSprop

TERMS = ("approx_kl", "loss_policy", "loss_value", "entropy", "clip_frac")


@dataclass
class PPOConfig:
    """The `algo` section of ppo and a2c (conf/algo/ppo.yaml, a2c.yaml: the defaults, commented)."""

    name: str
    lr: float
    anneal_lr: bool
    gamma: float
    gae_lambda: float
    num_envs: int
    num_steps: int
    num_minibatches: int
    update_epochs: int
    clip_coef: Optional[float]
    anneal_clip: bool
    clip_vloss: bool
    vf_coef: float
    ent_coef: float
    max_grad_norm: Optional[float]
    target_kl: Optional[float]
    norm_adv: bool
    norm_obs: bool
    norm_reward: bool
    clip_reward: Optional[float]
    encoder: str
    hidden_sizes: list
    activation: str
    log_std_init: float
    optimizer: str
    eps: float

    def __post_init__(self) -> None:
        check.fields(self, "algo.", positive=("lr", "eps"), unit_open=("gamma",), unit=("gae_lambda",),
                     positive_int=("num_envs", "num_steps", "num_minibatches", "update_epochs"),
                     optional_positive=("clip_coef", "max_grad_norm", "target_kl", "clip_reward"),
                     nonneg=("vf_coef", "ent_coef"), number=("log_std_init",),
                     boolean=("anneal_lr", "anneal_clip", "clip_vloss", "norm_adv", "norm_obs", "norm_reward"))
        batch = self.num_envs * self.num_steps
        if batch % self.num_minibatches:
            raise check.ConfigError("algo.num_minibatches", self.num_minibatches,
                                    f"must divide the per-peer batch algo.num_envs*algo.num_steps={batch}")
        check.net("algo.", self.hidden_sizes, self.activation)
        check.choice("algo.encoder", self.encoder, ENCODERS)
        check.choice("algo.optimizer", self.optimizer, ("adam", "rmsprop"))


class PPO(Algorithm):
    def __init__(self, cfg: PPOConfig, collector: Collector, peer: Peer) -> None:
        self.cfg, self.collector, self.peer, self.clock = cfg, collector, peer, peer.clock
        obs_space, act_space = collector.observation_space, collector.action_space
        encoder = resolve_encoder(cfg.encoder, obs_space)
        self.model = ActorCritic(obs_space, act_space, cfg.hidden_sizes, cfg.activation, encoder,
                                 cfg.log_std_init).to(peer.device)
        self.obs_dtype = torch.uint8 if encoder == "cnn" else torch.float32  # frames stay bytes until the CNN
        stacked = encoder == "cnn" and not self.model.encoder.cnn.channels_last  # (C, H, W) frames: stored C innermost
        optimizer = (lambda p: FlatAdam(p, lr=cfg.lr, eps=cfg.eps, fused=encoder == "cnn")) \
            if cfg.optimizer == "adam" else (lambda p: FlatRMSprop(p, lr=cfg.lr, alpha=0.99, eps=cfg.eps))
        self.learner = peer.learner(list(self.model.parameters()), optimizer, cfg.max_grad_norm, TERMS)
        self.act_space, self.discrete = act_space, isinstance(act_space, gym.spaces.Discrete)
        self.obs_norm = RunningNormalizer(obs_space.shape) if cfg.norm_obs else None
        self.scale = ReturnScaler(cfg.num_envs, cfg.gamma, cfg.clip_reward) if cfg.norm_reward else None
        self.rollout = allocate_rollout(cfg.num_steps, cfg.num_envs, obs_space.shape,
                                        () if self.discrete else act_space.shape,
                                        torch.int64 if self.discrete else torch.float32, self.obs_dtype,
                                        raw=cfg.norm_obs, channels_last=stacked)

    def shared_tensors(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    # -- sampling --------------------------------------------------------------------------------
    def _policy_input(self, raw: torch.Tensor) -> torch.Tensor:
        return self.obs_norm(raw) if self.obs_norm is not None else raw

    @torch.inference_mode()
    def sample(self, progress: float) -> None:
        """A rollout of num_steps vector steps (fewer when cut short as a straggler: `collector.length`)."""
        r, c, clock = self.rollout, self.collector, self.clock
        for t in c.rollout(self.cfg.num_steps):
            with clock("inference"):
                raw = torch.as_tensor(c.obs, dtype=self.obs_dtype)  # the rollout's dtype (frames stay bytes)
                if self.obs_norm is not None:
                    self.obs_norm.observe(raw.numpy()[c.next_valid])  # statistics first, as VecNormalize
                obs = self._policy_input(raw)
                action, logp, value = self.model.act(obs.to(self.peer.device))
                a = action.cpu().numpy()
                if not self.discrete:
                    a = np.clip(a, self.act_space.low, self.act_space.high)  # the Gaussian is unbounded, the env not
            s = c.step(a)  # `raw` stays this step's: the envs return new arrays
            with clock("storage"):
                r.raw_obs[t], r.obs[t], r.actions[t], r.logprobs[t], r.values[t] = raw, obs, action, logp, value
                reward = np.asarray(s.rewards, dtype=np.float64)
                scaled = self.scale(reward, s.valid, s.done) if self.scale is not None else reward.astype(np.float32)
                r.rewards[t] = torch.from_numpy(scaled)
                r.terminated[t], r.dones[t], r.valid[t] = (torch.from_numpy(x) for x in (s.terminated, s.done, s.valid))

    # -- learning --------------------------------------------------------------------------------
    def _advantages(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor, int]:
        """GAE and returns (T, N); advantage statistics merged across peers in one collective, which
        also merges what the normalizers observed during the rollout."""
        cfg = self.cfg
        with torch.inference_mode():
            last = torch.as_tensor(self.collector.obs, dtype=self.obs_dtype)  # after the rollout's last step
            next_value = self.model.value(self._policy_input(last).to(self.peer.device)).cpu()
        adv = gae(r.rewards, r.values, next_value, r.terminated, r.dones, cfg.gamma, cfg.gae_lambda) * r.valid
        returns = adv + r.values
        norms = list(self._norms().values())
        merged = self.peer.moments(moments_of(adv.reshape(-1, 1)[r.valid.reshape(-1)]), *(n.pending() for n in norms))
        for norm, m in zip(norms, merged[1:]):
            norm.update(m)
        adv_stats, n_valid = merged[0], int(merged[0].count)
        if cfg.norm_adv and n_valid > 1:
            std = torch.sqrt(adv_stats.m2 / (n_valid - 1)).float()
            adv = (adv - adv_stats.mean.float()) / (std + 1e-8) * r.valid
        return adv, returns, n_valid

    def learn(self, progress: float) -> dict[str, float]:
        """Epochs of minibatch updates on this peer's rollout; progress in [0, 1] anneals lr / clip."""
        cfg, learner, clock, length = self.cfg, self.learner, self.clock, self.collector.length
        frac = 1.0 - progress
        if cfg.anneal_lr:
            learner.set_lr(cfg.lr * frac)
        clip = cfg.clip_coef * frac if (cfg.clip_coef is not None and cfg.anneal_clip) else cfg.clip_coef
        B, M = cfg.num_envs * length, cfg.num_minibatches
        with clock("forward"):  # advantages and the flat batch
            r = Rollout(*(x[:length] for x in self.rollout))
            adv, returns, n_valid = self._advantages(r)
            flat = lambda x: x.reshape(B, *x.shape[2:]).to(self.peer.device)  # noqa: E731
            batch = [flat(x) for x in (r.obs, r.actions, r.logprobs, r.values, adv, returns)]
            weight = sample_weights(flat(r.valid), n_valid, M, self.peer.world_size)
        # The KL is averaged over peers before the learner's veto, so every peer stops alike.
        veto = None if cfg.target_kl is None else (lambda t: t["approx_kl"] > 1.5 * cfg.target_kl)
        stopped = False
        # M minibatches per epoch on every peer (the same number of collectives), whatever its rollout's length.
        for idx in (i for _ in range(cfg.update_epochs) for i in torch.tensor_split(torch.randperm(B), M)):
            with clock("forward"):
                loss, terms = self.loss(*(x[idx] for x in batch), weight[idx], clip)
            update = learner.step(loss, terms, veto)
            if update is not None and update.vetoed:
                stopped = True
                break
        last = learner.finish(veto, discard=stopped)  # comm.overlap: the last gradient is still in flight
        stopped = stopped or (last is not None and last.vetoed)
        return {**learner.take_means(), "lr": learner.lr, "early_stop": int(stopped), "updates": learner.updates,
                "rollout_frac": length / cfg.num_steps}

    def loss(self, obs, act, old_logp, old_val, adv, ret, w, clip) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate, value and entropy losses of a minibatch, weighted by `w` (B,)."""
        cfg = self.cfg
        dist, value = self.model.dist_value(obs)
        logp = self.model.log_prob(dist, act)
        logratio = logp - old_logp
        ratio = logratio.exp()
        pg = -adv * ratio
        if clip is not None:
            pg = torch.max(pg, -adv * ratio.clamp(1 - clip, 1 + clip))
        if cfg.clip_vloss and clip is not None:
            v_clipped = old_val + (value - old_val).clamp(-clip, clip)
            vloss = 0.5 * torch.max((value - ret) ** 2, (v_clipped - ret) ** 2)
        else:
            vloss = 0.5 * (value - ret) ** 2
        ent = self.model.entropy(dist)
        loss_pg, loss_v, ent_m = (pg * w).sum(), (vloss * w).sum(), (ent * w).sum()
        loss = loss_pg + cfg.vf_coef * loss_v - cfg.ent_coef * ent_m
        with torch.no_grad():
            kl = (((ratio - 1) - logratio) * w).sum()
            clipped = ((ratio - 1).abs() > clip).float() if clip is not None else torch.zeros_like(ratio)
            terms = {"approx_kl": kl, "loss_policy": loss_pg, "loss_value": loss_v, "entropy": ent_m,
                     "clip_frac": (clipped * w).sum()}
        return loss, terms

    # -- checkpoint state ------------------------------------------------------------------------
    def _norms(self) -> dict[str, RunningNormalizer]:
        ret_norm = self.scale.norm if self.scale is not None else None
        return {k: n for k, n in (("obs_norm", self.obs_norm), ("ret_norm", ret_norm)) if n is not None}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), **{k: n.state_dict() for k, n in self._norms().items()}}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        for key, norm in self._norms().items():
            norm.load_state_dict(s[key])

    def rank_state_dict(self, replay: bool = False) -> dict:
        """The discounted returns under way (norm_reward), at a rollout boundary."""
        return {"disc_return": torch.from_numpy(self.scale.returns.copy())} if self.scale is not None else {}

    def load_rank_state_dict(self, s: dict) -> None:
        if self.scale is not None and self.collector.continued:  # else fresh episodes: returns start at 0
            self.scale.returns = s["disc_return"].numpy().copy()


def policy(cfg: PPOConfig, state: dict, obs_space: gym.Space, act_space: gym.Space,
           device: torch.device = torch.device("cpu")) -> ActFn:
    """A checkpoint's policy on observations normalized as in training (`algo.norm_obs`): the
    distribution's mode (argmax, or the Gaussian mean), or a sample of it; continuous actions are
    clipped to the bounds, as the sampler clips them."""
    model = ActorCritic(obs_space, act_space, cfg.hidden_sizes, cfg.activation,
                        resolve_encoder(cfg.encoder, obs_space))
    model.load_state_dict(state["model"])
    model.to(device)
    norm = RunningNormalizer.saved(obs_space.shape, state.get("obs_norm"))

    @torch.inference_mode()
    def act(obs: np.ndarray, deterministic: bool, rng: np.random.Generator) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32)
        x = (norm(x) if norm is not None else x).to(device)
        if deterministic:
            a = model.mode(x)
        else:  # a sample of the distribution, drawn with the policy's own generator
            dist, _ = model.dist_value(x)
            g = torch.Generator(x.device).manual_seed(int(rng.integers(2 ** 62)))
            a = torch.multinomial(dist.probs, 1, generator=g)[:, 0] if model.discrete else \
                torch.normal(dist.mean, dist.stddev, generator=g)
        a = a.cpu().numpy()
        return a if model.discrete else np.clip(a, act_space.low, act_space.high)
    return act
