"""What SAC and TD3 share: continuous actions in the env's bounds, a replay buffer per peer, warm-up,
lockstep counters and Polyak-averaged targets on the learner's one flat parameter.

Every peer steps its own envs (through its collector) into its OWN replay buffer: uniform random
actions from its own stream until `learning_starts` global steps, then the algorithm's exploring policy
(`explore`, with noise from the same per-peer stream). One iteration is `train_freq` vector steps of
every peer, then `gradient_steps` updates on minibatches of `batch_size` from the peer's own buffer,
each one `Learner.step` of the summed losses (or two, with `algo.actor_after_critics`: the critics',
then the actor's through the stepped critics, `in_order`): the gradients land in disjoint segments of
one bucket (actor, critics, temperature) and all-reduce averages them, so every peer applies the same
update and the parameters stay bit-identical. The counters that schedule updates (vector steps,
gradient steps) advance in lockstep on every peer, so no peer waits in a collective that another
skipped, and every peer moves its targets after the same updates.

Actions live in [-1, 1] inside (actors end in tanh; the replay stores them so) and are scaled to the
env's Box bounds only on the way to the env (`to_env`), as SB3 and CleanRL do.

Update-to-data ratio: per update, `batch_size` samples on each of N peers (N x batch_size in all); per
iteration, `gradient_steps` updates for `train_freq x num_envs x N` global env steps. N peers thus
behave as one peer with N times the envs and N times the batch (its replay split N ways, each part
sampled alike). About 300 lines: the shared loop, its two update orders and its checkpoint state read
together.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from p2prl import checks as check
from p2prl.algos.base import Algorithm, Collector, Peer
from p2prl.algos.greedy import Scale
from p2prl.algos.transitions import ReplayConfig, TransitionWriter
from p2prl.data import ReplayBatch, ReplayBuffer
from p2prl.sync.learner import Update
from p2prl.sync.optim import FlatAdam


@dataclass
class OffPolicyConfig(ReplayConfig):
    """The keys SAC and TD3 share (conf/algo/sac.yaml, td3.yaml: the defaults, commented)."""

    actor_lr: float
    critic_lr: float
    anneal_lr: bool
    actor_after_critics: bool

    def __post_init__(self) -> None:
        super().__post_init__()
        check.fields(self, "algo.", positive=("actor_lr", "critic_lr"), boolean=("anneal_lr", "actor_after_critics"))


def check_bounds(algo, space: gym.Space) -> None:
    """Actions are squashed into the Box's bounds: they must be finite."""
    if isinstance(space, gym.spaces.Box) and not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        raise check.ConfigError("algo", algo.name, f"squashes actions into the env's bounds, which must be finite; the "
                                                   f"env has {space}")


def check_comm(algo, comm) -> None:
    """Updates in two parts (`algo.actor_after_critics`) need each part finished before the next: no overlap."""
    if algo.actor_after_critics and comm.overlap:
        raise check.ConfigError("comm.overlap", True, "cannot overlap updates in two parts (algo.actor_after_critics"
                                                      "=true steps the actor through the critics' new parameters); "
                                                      "allowed here: false, or set algo.actor_after_critics=false")


def flat_copy(module: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """A frozen copy of `module` whose parameters are views of one flat tensor (returned with it), laid
    out as the learner's bucket lays out the original's: a target network, moved in one op."""
    twin = copy.deepcopy(module).requires_grad_(False)
    flat = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
    offset = 0
    for p in twin.parameters():
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return twin, flat


def alias(module: nn.Module, like: nn.Module) -> nn.Module:
    """`module` (a copy of `like`) made to read `like`'s parameters, without gradient: `like` detached
    for good, at no cost per update. An actor's loss through it leaves the critics' gradient alone."""
    for p, q in zip(module.parameters(), like.parameters()):
        p.data = q.data  # the same storage: every optimizer step shows through
    return module.requires_grad_(False)


class OffPolicy(Algorithm):
    """The shared loop; a subclass builds its networks (`model`, and `target_flat`: its target
    networks' one flat tensor), passes `groups` [(name, parameters, lr)] in bucket order, and
    implements `explore`, `draw`, `loss`, `update_in_order` and `after_update`."""

    def __init__(self, cfg: OffPolicyConfig, collector: Collector, peer: Peer,
                 groups: Sequence[tuple[str, Sequence[nn.Parameter], float]], terms: Sequence[str],
                 gates: Optional[dict[str, str]] = None) -> None:
        self.cfg, self.collector, self.clock, self.num_envs = cfg, collector, peer.clock, cfg.num_envs
        self.device, self.world_size = peer.device, peer.world_size
        space = collector.action_space
        self.act_dim = int(np.prod(space.shape))  # actions flat inside: (B, act_dim); the env's shape outside
        self.low = space.low.astype(np.float64).reshape(-1)
        self.half = (space.high.astype(np.float64).reshape(-1) - self.low) / 2
        sizes = [(name, sum(p.numel() for p in params), lr) for name, params, lr in groups]
        self.base_lrs = [lr for _, _, lr in groups]
        self.segments, start = {}, 0
        for name, n, _ in sizes:
            self.segments[name] = slice(start, start + n)
            start += n
        self.learner = peer.learner([p for _, params, _ in groups for p in params],
                                    lambda p: FlatAdam(p, lr=self.base_lrs[0], groups=sizes), None, terms, gates)
        self.rng = peer.rng("explore")  # warm-up actions, exploration noise and replay sampling
        self.buffer = ReplayBuffer(cfg.buffer_size, collector.observation_space.shape, self.rng,
                                   (self.act_dim,), np.float32)
        self.writer = TransitionWriter(self.buffer, self.obs, cfg.num_envs, 1, cfg.gamma)  # one-step transitions
        self.vector_steps = 0  # identical on every peer
        self.updates_started = 0  # updates started, identical on every peer (TD3's delay counts them)
        # Vector step from which learning_starts counts: moves to the resume point when the replay
        # buffers were not restored, so no peer ever samples an empty or nearly empty buffer.
        self.fill_from = 0

    @property
    def flat(self) -> torch.Tensor:
        """The learner's flat parameter (the segments' layout), without gradient."""
        return self.learner.bucket.flat_param.detach()

    # -- acting ----------------------------------------------------------------------------------
    @property
    def obs(self) -> np.ndarray:
        """The collector's current observations (N, *obs_shape) as the networks take them (float32)."""
        return np.asarray(self.collector.obs, dtype=np.float32)

    def explore(self, obs: torch.Tensor) -> np.ndarray:
        """The exploring policy's actions in [-1, 1], (num_envs, act_dim), noise from self.rng."""
        raise NotImplementedError

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        """[-1, 1] (N, act_dim) -> the env's bounds and action shape."""
        space = self.collector.action_space
        return (self.low + (actions + 1.0) * self.half).astype(space.dtype).reshape(len(actions), *space.shape)

    def _act(self) -> np.ndarray:
        if self.vector_steps * self.num_envs * self.world_size < self.cfg.learning_starts:
            return self.rng.uniform(-1.0, 1.0, (self.num_envs, self.act_dim)).astype(np.float32)
        with torch.inference_mode():
            return self.explore(torch.from_numpy(self.obs).to(self.device))

    def collect(self, vector_steps: int) -> None:
        """Step this peer's envs and store their valid transitions (`TransitionWriter`: a truncated one
        bootstraps from the episode's true final observation; the reset step after an end is dropped)."""
        for _ in self.collector.rollout(vector_steps):
            with self.clock("inference"):
                actions = self._act()
                env_actions = self.to_env(actions)
            s = self.collector.step(env_actions)
            with self.clock("storage"):
                self.writer.add(actions, np.asarray(s.rewards, dtype=np.float32), np.asarray(s.next_obs, dtype=np.float32),
                                s.terminated, s.truncated, s.valid)
        self.vector_steps += vector_steps

    def sample(self, progress: float) -> None:
        self.collect(self.cfg.train_freq)

    # -- learning --------------------------------------------------------------------------------
    def draw(self, batch: ReplayBatch) -> tuple:
        """The arguments of `loss` and `update_in_order` for one update on this peer's minibatch: the batch
        on the device and the update's random draws (from this peer's torch stream), and what else they take."""
        raise NotImplementedError

    def loss(self, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed losses of one update and their named terms, every gradient from the parameters
        before the update (one learner step)."""
        raise NotImplementedError

    def update_in_order(self, *args) -> Update:
        """One update in two parts (`in_order`)."""
        raise NotImplementedError

    def update(self, batch: ReplayBatch) -> Optional[Update]:
        """One update on this peer's minibatch (the learner's finished one: with overlap, the previous)."""
        args = self.draw(batch)
        if self.cfg.actor_after_critics:
            return self.update_in_order(*args)
        with self.clock("forward"):  # the replay minibatch, its targets and losses
            loss, terms = self.loss(*args)
        return self.learner.step(loss, terms)

    def in_order(self, critics: tuple[torch.Tensor, dict[str, torch.Tensor]],
                 actor: Optional[Callable[[], torch.Tensor]]) -> Update:
        """One update in two parts, as SB3 and CleanRL order it: step the critics (and temperature) on
        their loss; then, where `actor` is given, step the actor on `actor()`, its loss built through
        the critics' new parameters (the `alias` sees them). Each part is one learner step, so two
        sums; the last counts, with the terms of both (`terms["loss_actor"]` taken from the second)."""
        loss, terms = critics
        rest = [g for g in self.segments if g != "actor"]
        if actor is None:
            return self.learner.step(loss, terms, only=rest)
        # Where the actor's segment is last (SAC lays it out so), each part shares only its own: the
        # critics' gradient, then the actor's with the terms, as many bytes in all as one update.
        start = self.segments["actor"].start
        last = self.segments["actor"].stop == self.flat.numel()
        self.learner.step(loss, terms, only=rest, count=False, span=slice(0, start) if last else None)
        with self.clock("forward"):
            loss_actor = actor()
        return self.learner.step(loss_actor, {**terms, "loss_actor": loss_actor.detach()}, only=("actor",),
                                 span=slice(start, None) if last else None)

    def after_update(self, update: Update) -> None:
        """After every finished update, on every peer alike: move the targets."""
        raise NotImplementedError

    def polyak(self, target: torch.Tensor, segment: slice) -> None:
        """target <- (1 - tau) target + tau online, over one segment of the flat parameter."""
        with torch.no_grad(), self.clock("optimizer"):
            target.lerp_(self.flat[segment], self.cfg.tau)

    def ready(self) -> bool:
        """Whether every peer has filled its buffer enough (agreed: lockstep counters). Two vector
        steps guarantee every peer has stored a transition, whatever the resets."""
        filled = self.vector_steps - self.fill_from
        return filled * self.num_envs * self.world_size >= self.cfg.learning_starts and filled > 1

    def learn(self, progress: float) -> dict[str, float]:
        c = self.cfg
        if c.anneal_lr:  # linearly to 0 over train.total_steps, every group alike (the zoo's lin_<lr>)
            for group, lr in zip(self.learner.optimizer.param_groups, self.base_lrs):
                group["lr"] = lr * (1.0 - progress)
        logs = {"buffer_size": self.buffer.size}
        if self.ready():
            for _ in range(c.gradient_steps):
                self.updates_started += 1
                finished = self.update(self.buffer.sample(c.batch_size))
                if finished is not None:
                    self.after_update(finished)
            finished = self.learner.finish()  # comm.overlap: the last one was still in flight
            if finished is not None:
                self.after_update(finished)
            logs.update(self.learner.take_means())
        return {**logs, "updates": self.learner.updates}

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The shared state: the subclass's `model` and `target_flat` (its target networks), the counters."""
        return {"model": self.model.state_dict(), "target": self.target_flat,
                "vector_steps": self.vector_steps, "updates_started": self.updates_started}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])  # in place: the bucket's views stay the model's parameters
        self.target_flat.copy_(s["target"])
        self.vector_steps, self.updates_started = int(s["vector_steps"]), int(s["updates_started"])
        self.fill_from = self.vector_steps  # until load_rank_state_dict restores the replay buffers

    def rank_state_dict(self, replay: bool = False) -> dict:
        """This peer's own state: its RNG, and its replay if asked (the collector saves the envs)."""
        s = {"explore_rng": self.rng.bit_generator.state, **self.writer.state_dict(keys=replay)}
        return {**s, "replay": self.buffer.state_dict()} if replay else s

    def load_rank_state_dict(self, s: dict) -> None:
        """Restore what rank_state_dict saved; where the collector started fresh episodes (envs whose
        state cannot be restored) the replay is kept."""
        self.rng.bit_generator.state = s["explore_rng"]
        if "replay" in s:  # checkpoint.replay is a config value: the same branch on every peer
            self.buffer.load_state_dict(s["replay"])
            self.fill_from = 0
        self.writer.load_state_dict(s, self.obs, continued=self.collector.continued)


def deterministic_policy(actor: nn.Module, space: gym.spaces.Box, device: torch.device, noisy):
    """A checkpoint's policy on a batch (p2prl.policy's ActFn): `actor(obs)` in [-1, 1] scaled to the
    bounds; not deterministic: `noisy(obs, actor, rng)` (its own exploration), scaled alike."""
    scale = Scale(space).to(device)
    actor.to(device).eval()

    @torch.inference_mode()
    def act(obs: np.ndarray, deterministic: bool, rng: np.random.Generator) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        a = actor(x) if deterministic else noisy(x, actor, rng)
        out = scale(a).cpu().numpy().reshape(len(obs), *space.shape)
        return np.clip(out, space.low, space.high).astype(space.dtype)
    return act
