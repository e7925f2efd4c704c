"""The collector: one peer's envs as every algorithm steps them.

It owns the vector env, the current observations, the autoreset mask, the episode accounting, DD-PPO's
straggler cut, its share of the per-rank checkpoint and the time spent stepping. An algorithm keeps its
own loop and calls `step(actions)` once per vector step; it never touches the envs itself. An
off-policy loop (DQN's; SAC's or TD3's alike, with a buffer for continuous actions):

    c = self.collector
    for t in c.rollout(cfg.train_freq):                  # t = 0, 1, ...: vector steps of this iteration
        obs = c.obs                                      # (N, *obs_shape), as the envs returned them
        with self.clock("inference"):                    # the peer's stopwatch (Peer.clock)
            actions = self.act(obs)
        s = c.step(actions)                              # Step: next_obs, rewards, terminated, ..., valid
        v = s.valid                                      # False: the step that reset an env, no transition
        self.buffer.add(obs[v], actions[v], s.rewards[v], s.next_obs[v], s.terminated[v])

(`p2prl.algos.transitions.TransitionWriter` does that last line for DQN, n-step windows included.)

gymnasium 1.x vector envs autoreset on the *next* step: on the step where an episode ends, `next_obs`
is that episode's true final observation (so a truncated transition bootstraps from it, a terminated
one does not); on the following step the env ignores the action and resets, and that step's
transition crosses two episodes. `Step.valid` is False there: never learn from it.
"""
from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch

from p2prl.envstate import (copy_rngs, load_copy_rngs, load_vec_env_state, not_restorable, stack_size,
                            vec_env_state)
from p2prl.metrics import Episode, EpisodeCounter
from p2prl.preemption import Preemption
from p2prl.timing import Stopwatch
from p2prl.wrappers import episode_signal


class Step(NamedTuple):
    """One vector step of a peer's N envs (next-step autoreset; see the module docstring).

    next_obs: (N, *obs_shape), the env's dtype; rewards: (N,); terminated, truncated, done: (N,) bool,
    done = terminated | truncated; valid: (N,) bool, False where the step was a reset (no transition);
    infos: the vector env's info dict."""

    next_obs: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    done: np.ndarray
    valid: np.ndarray
    infos: dict


class Sample(NamedTuple):
    """What a peer's collector did since the runner last asked (`Collector.take`)."""

    steps: int  # local env steps (num_envs x vector steps)
    episodes: list[Episode]  # episodes that finished meanwhile


class Collector:
    """One peer's collector: `envs` reset to `first_obs` (N, *obs_shape); `preempt` cuts rollouts short
    (straggler preemption, None: never); `clock` gets the stepping time (`env`)."""

    def __init__(self, envs: gym.vector.VectorEnv, first_obs: np.ndarray, preempt: Optional[Preemption] = None,
                 clock: Optional[Stopwatch] = None) -> None:
        self.envs, self.obs = envs, first_obs
        self.num_envs = int(envs.num_envs)
        self.observation_space, self.action_space = envs.single_observation_space, envs.single_action_space
        self.preempt = preempt  # comm.straggler_frac on several peers: when to cut a rollout short
        self.clock = clock if clock is not None else Stopwatch()
        # False on the step after an episode ended: the env resets then and ignores the action.
        self.next_valid = np.ones(self.num_envs, dtype=bool)
        self.episodes = EpisodeCounter(self.num_envs)
        self.t = 0  # vector steps since the last `take`: episodes are stamped with it
        self.length = 0  # vector steps of the last `rollout` (fewer than asked when cut short)
        self.continued = True  # after `load_state_dict`: whether the envs continue the saved episodes

    def rollout(self, steps: int) -> Iterator[int]:
        """The indices 0, 1, ... of a rollout of `steps` vector steps (step the envs once per index).
        With straggler preemption it may end early, once enough peers have finished theirs (DD-PPO):
        learn from the first `self.length` steps then. Run the loop to its end (no `break`): the other
        peers count this one as finished only then."""
        pre = self.preempt
        self.length = 0
        if pre is not None:
            pre.begin()
        for t in range(steps):
            yield t
            self.length = t + 1
            if pre is not None:
                with self.clock("comm"):  # a read of torchrun's store
                    if pre.cut(t + 1, steps):
                        break
        if pre is not None:
            pre.finished()

    def step(self, actions: np.ndarray) -> Step:
        """Step every env with `actions` (N, *action_shape); the observations move on to `next_obs`."""
        with self.clock("env"):
            next_obs, rewards, terminated, truncated, infos = self.envs.step(actions)
            done = terminated | truncated
            valid = self.next_valid
            self.episodes.step(self.t, *episode_signal(rewards, done, infos), valid)
            self.obs, self.next_valid = next_obs, ~done
            self.t += 1
        return Step(next_obs, rewards, terminated, truncated, done, valid, infos)

    def take(self) -> Sample:
        """The env steps and finished episodes since the last call (for the return window)."""
        sample = Sample(self.t * self.num_envs, self.episodes.take())
        self.t = 0
        return sample

    @property
    def frame_stack(self) -> int:
        """k of the envs' FrameStackObservation(k) (1 without one): how many frames an observation holds."""
        return stack_size(self.envs)

    def close(self) -> None:
        self.envs.close(terminate=True)  # async workers end with the run, not the process (multirun jobs share it)

    # -- the per-rank checkpoint -------------------------------------------------------------------
    @functools.cached_property
    def not_restorable(self) -> Optional[str]:
        """Why the envs' state cannot be saved whole (`p2prl.envstate.not_restorable`); None: it can.
        Found once: for async envs it builds a probe copy."""
        return not_restorable(self.envs)

    def state_dict(self) -> dict:
        """At an iteration boundary: the envs (or, where their state cannot be saved, every copy's
        random generator), the observations, the autoreset mask and the episodes under way."""
        s = {"obs": torch.from_numpy(np.array(self.obs)), "next_valid": torch.from_numpy(self.next_valid.copy()),
             "episodes": self.episodes.state_dict()}
        if self.not_restorable is None:
            s["env"] = vec_env_state(self.envs)
        elif (rngs := copy_rngs(self.envs)) is not None:
            s["env_rngs"] = rngs
        return s

    def load_state_dict(self, s: dict) -> None:
        """Continue the saved episodes exactly; where the envs' state cannot be restored, start fresh
        episodes that continue the run's random stream (each copy's generator restored, then a reset
        without a seed) instead of replaying the run's first episodes from the seeds (`continued` False)."""
        self.continued = self.not_restorable is None
        if self.continued:
            load_vec_env_state(self.envs, s["env"])
            obs = s["obs"] if "obs" in s else s["next_obs"]  # rank files of earlier versions: PPO's key
            # In the saved layout too: CartPole's native vector env returns column-major batches, and a
            # policy's matmul rounds a row-major copy of them differently (the resumed run would drift).
            self.obs = obs.numpy().copy(order="K")
            self.next_valid = s["next_valid"].numpy().copy()
            self.episodes.load_state_dict(s["episodes"])
            return
        if "env_rngs" in s:
            load_copy_rngs(self.envs, s["env_rngs"])
            self.obs, _ = self.envs.reset()
        # else (EnvPool, or a file of an earlier version): fresh episodes from the seeds, as built
        self.next_valid = np.ones(self.num_envs, dtype=bool)
        self.episodes = EpisodeCounter(self.num_envs)
