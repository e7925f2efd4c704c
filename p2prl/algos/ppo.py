"""PPO, and A2C as its one-epoch, one-minibatch, no-clip setting; discrete and continuous actions.

Each peer samples `num_envs x num_steps` transitions from its own vector env, computes GAE, then runs
`update_epochs` epochs of `num_minibatches` minibatches. Every minibatch gradient is averaged across
peers by the learner (one flat all-reduce), so N peers behave like one peer with N times the envs.
"""
from __future__ import annotations

from typing import Optional

import gymnasium as gym
import numpy as np
import torch

from p2prl.algos import EpisodeTable, IterationResult
from p2prl.algos.returns import gae
from p2prl.comm import Communicator
from p2prl.config import PPOConfig
from p2prl.data import Rollout, allocate_rollout
from p2prl.envs import load_vec_env_state, vec_env_state
from p2prl.learner import Learner
from p2prl.metrics import EpisodeCounter
from p2prl.nets import ActorCritic
from p2prl.normalize import Moments, RunningNormalizer, global_moments, moments_of
from p2prl.optim import FlatAdam, FlatOptimizer, FlatRMSprop

# Per-minibatch scalars averaged across peers in the gradient bucket's extra slots.
EXTRAS = ("approx_kl", "loss_policy", "loss_value", "entropy", "clip_frac")


def make_optimizer(cfg: PPOConfig, param: torch.nn.Parameter) -> FlatOptimizer:
    if cfg.optimizer == "adam":
        return FlatAdam(param, lr=cfg.lr, eps=cfg.eps)
    return FlatRMSprop(param, lr=cfg.lr, alpha=0.99, eps=cfg.eps)


class PPO:
    def __init__(self, cfg: PPOConfig, envs: gym.vector.VectorEnv, first_obs: np.ndarray,
                 comm: Communicator) -> None:
        self.cfg, self.envs, self.comm = cfg, envs, comm
        obs_space, act_space = envs.single_observation_space, envs.single_action_space
        self.model = ActorCritic(obs_space, act_space, cfg.hidden_sizes, cfg.activation).to(comm.device)
        self.learner = Learner(list(self.model.parameters()), lambda p: make_optimizer(cfg, p), comm,
                               cfg.max_grad_norm, n_extras=len(EXTRAS))
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        if not self.discrete:
            self.act_low, self.act_high = act_space.low, act_space.high
        self.obs_norm = RunningNormalizer(obs_space.shape) if cfg.norm_obs else None
        self.ret_norm = RunningNormalizer((1,), center=False) if cfg.norm_reward else None
        # Running discounted return per env, whose std scales rewards (norm_reward).
        self.disc_return = np.zeros(cfg.num_envs, dtype=np.float64)
        self.disc_returns = np.zeros((cfg.num_steps, cfg.num_envs), dtype=np.float64)
        self.rollout = allocate_rollout(cfg.num_steps, cfg.num_envs, obs_space.shape,
                                        () if self.discrete else act_space.shape,
                                        torch.int64 if self.discrete else torch.float32)
        self.next_obs = torch.as_tensor(first_obs, dtype=torch.float32)
        # False on the step after an episode ended: the env resets then and ignores the action.
        self.next_valid = np.ones(cfg.num_envs, dtype=bool)
        self.episodes = EpisodeCounter(cfg.num_envs)
        self.num_envs = cfg.num_envs
        self.steps_per_iteration = cfg.num_envs * cfg.num_steps
        self.learner.broadcast_parameters()

    def shared_tensors(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    # -- sampling --------------------------------------------------------------------------------
    def _policy_input(self, raw: torch.Tensor) -> torch.Tensor:
        return self.obs_norm(raw) if self.obs_norm is not None else raw

    @torch.inference_mode()
    def collect(self) -> Rollout:
        r, cfg = self.rollout, self.cfg
        self.comm.phase = "sampling"
        for t in range(cfg.num_steps):
            raw = self.next_obs
            obs = self._policy_input(raw)
            action, logp, value = self.model.act(obs.to(self.comm.device))
            r.raw_obs[t] = raw
            r.obs[t] = obs
            r.actions[t] = action
            r.logprobs[t] = logp
            r.values[t] = value
            a = action.cpu().numpy()
            if not self.discrete:
                a = np.clip(a, self.act_low, self.act_high)  # the Gaussian is unbounded; the env is not
            next_obs, reward, term, trunc, _ = self.envs.step(a)
            done = term | trunc
            valid = self.next_valid
            self.episodes.step(t, reward, done, valid)
            r.rewards[t] = torch.from_numpy(np.asarray(reward, dtype=np.float32))
            r.terminated[t] = torch.from_numpy(term)
            r.dones[t] = torch.from_numpy(done)
            r.valid[t] = torch.from_numpy(valid)
            if self.ret_norm is not None:
                self.disc_return = self.disc_return * cfg.gamma + reward
                self.disc_returns[t] = self.disc_return
                self.disc_return[done] = 0.0
            self.next_valid = ~done
            self.next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
        return r

    # -- learning --------------------------------------------------------------------------------
    def _advantages(self, r: Rollout, rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """GAE and returns (T, N), normalization moments merged across peers; one collective, which
        also sums `rows` (the return window's episode table) in place."""
        cfg = self.cfg
        rewards = r.rewards
        if self.ret_norm is not None:
            rewards = rewards / self.ret_norm.std  # scale by the std of discounted returns so far
        with torch.inference_mode():
            next_value = self.model.value(self._policy_input(self.next_obs).to(self.comm.device)).cpu()
        adv = gae(rewards, r.values, next_value, r.terminated, r.dones, cfg.gamma, cfg.gae_lambda)
        adv = adv * r.valid
        returns = adv + r.values
        valid = r.valid.reshape(-1)
        local = [moments_of(adv.reshape(-1, 1)[valid])]
        if self.obs_norm is not None:
            local.append(moments_of(r.raw_obs.reshape(-1, *r.raw_obs.shape[2:])[valid]))
        if self.ret_norm is not None:
            local.append(moments_of(torch.from_numpy(self.disc_returns).reshape(-1, 1)[valid]))
        merged = global_moments(self.comm, *local, rows=rows)
        adv_stats = merged[0]
        if self.obs_norm is not None:
            self.obs_norm.update(merged[1])
        if self.ret_norm is not None:
            self.ret_norm.update(merged[-1])
        n_valid = int(adv_stats.count)
        if cfg.norm_adv and n_valid > 1:
            std = torch.sqrt(adv_stats.m2 / (n_valid - 1)).float()
            adv = (adv - adv_stats.mean.float()) / (std + 1e-8) * r.valid
        return adv, returns, n_valid

    def update(self, r: Rollout, progress: float, rows: Optional[torch.Tensor] = None) -> dict:
        """Epochs of minibatch updates on this peer's rollout; progress in [0, 1] anneals lr / clip.
        `rows` is summed over peers in place, in the collective that merges the advantage statistics."""
        cfg = self.cfg
        self.comm.phase = "update"
        adv, returns, n_valid = self._advantages(r, rows)
        frac = 1.0 - progress
        if cfg.anneal_lr:
            self.learner.set_lr(cfg.lr * frac)
        clip = cfg.clip_coef * frac if (cfg.clip_coef is not None and cfg.anneal_clip) else cfg.clip_coef
        B = cfg.num_envs * cfg.num_steps
        M = cfg.num_minibatches
        flat = lambda x: x.reshape(B, *x.shape[2:]).to(self.comm.device)
        b_obs, b_act, b_logp, b_val = flat(r.obs), flat(r.actions), flat(r.logprobs), flat(r.values)
        b_adv, b_ret = flat(adv), flat(returns)
        # Sum of per-sample terms x weight, averaged over peers = mean over the global minibatch;
        # reset steps weigh 0. Exact for one minibatch: 2 peers with half the data = 1 peer with all.
        b_w = flat(r.valid.float()) * (M * self.comm.world_size / max(n_valid, 1))
        sums = torch.zeros(len(EXTRAS))
        n_applied = 0
        stopped = False
        learner = self.learner
        kl_limit = None if cfg.target_kl is None else 1.5 * cfg.target_kl
        for _ in range(cfg.update_epochs):
            perm = torch.randperm(B)
            for start in range(0, B, B // M):
                idx = perm[start:start + B // M]
                extras, loss = self._loss(b_obs[idx], b_act[idx], b_logp[idx], b_val[idx], b_adv[idx],
                                          b_ret[idx], b_w[idx], clip)
                if learner.overlap:
                    # The step applied now is the previous one. Its KL stops the epochs as in the
                    # plain path, but that step is already applied (one step later than without overlap).
                    averaged = learner.backward_overlapped(loss, extras)
                    applied = averaged is not None and learner.last_applied
                else:
                    averaged = learner.backward(loss, extras)
                    applied = None
                # The KL is averaged over peers, so every peer takes the same early-stop decision.
                if averaged is not None and kl_limit is not None and float(averaged[0]) > kl_limit:
                    stopped = True
                    break
                if applied is None:
                    applied = learner.apply()
                if applied:
                    sums += averaged.detach().cpu()
                    n_applied += 1
            if stopped:
                break
        if learner.overlap:  # the last gradient is still in flight: apply it, or drop it after a stop
            averaged = learner.finish(apply=not stopped)
            if averaged is not None and learner.last_applied:
                sums += averaged.cpu()
                n_applied += 1
        logs = {k: float(v) / max(n_applied, 1) for k, v in zip(EXTRAS, sums)}
        logs.update(lr=self.learner.optimizer.param_groups[0]["lr"], early_stop=int(stopped),
                    updates=self.learner.updates, skipped_updates=self.learner.skipped)
        return logs

    def _loss(self, obs, act, old_logp, old_val, adv, ret, w, clip):
        cfg = self.cfg
        dist = self.model.dist(obs)
        logp = self.model.log_prob(dist, act)
        value = self.model.value(obs)
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
            clip_frac = (clipped * w).sum()
        return (kl, loss_pg, loss_v, ent_m, clip_frac), loss

    def iteration(self, progress: float, episode_table: Optional[EpisodeTable] = None) -> IterationResult:
        rollout = self.collect()
        episodes = self.episodes.take()
        table = None if episode_table is None else episode_table(episodes)
        logs = self.update(rollout, progress, table)
        return IterationResult(self.steps_per_iteration, episodes, logs, table)

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = {"model": self.model.state_dict(), "optimizer": self.learner.optimizer.state_dict(),
             "updates": self.learner.updates, "skipped": self.learner.skipped,
             "skipped_in_a_row": self.learner.skipped_in_a_row}
        if self.obs_norm is not None:
            s["obs_norm"] = self.obs_norm.state_dict()
        if self.ret_norm is not None:
            s["ret_norm"] = self.ret_norm.state_dict()
        return s

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.learner.optimizer.load_state_dict(s["optimizer"])
        self.learner.updates, self.learner.skipped = int(s["updates"]), int(s["skipped"])
        self.learner.skipped_in_a_row = int(s.get("skipped_in_a_row", 0))
        if self.obs_norm is not None:
            self.obs_norm.load_state_dict(s["obs_norm"])
        if self.ret_norm is not None:
            self.ret_norm.load_state_dict(s["ret_norm"])

    def rank_state_dict(self, replay: bool = False) -> dict:
        """This peer's own state at a rollout boundary: its envs and what the sampler carries over."""
        return {"env": vec_env_state(self.envs), "next_obs": self.next_obs.clone(),
                "next_valid": torch.from_numpy(self.next_valid.copy()), "episodes": self.episodes.state_dict(),
                "disc_return": torch.from_numpy(self.disc_return.copy())}

    def load_rank_state_dict(self, s: dict) -> None:
        load_vec_env_state(self.envs, s["env"])
        self.next_obs = s["next_obs"].clone()
        self.next_valid = s["next_valid"].numpy().copy()
        self.episodes.load_state_dict(s["episodes"])
        self.disc_return = s["disc_return"].numpy().copy()
