"""A peer's env steps into its replay buffer, as 1-step or n-step transitions (DQN's, and any
off-policy algorithm's).

The buffer stores transitions between observation keys (`begin` / `observe`: the observations
themselves, or frame indices for `FrameReplay`). With n_step > 1 each env keeps a window of its last
steps; a full window becomes one transition (first key, first action, the discounted sum of its
rewards, the key n steps later, discount gamma^n), and an episode end flushes the window as shorter
transitions, bootstrapping only if the episode was truncated. Under next-step autoreset the next
observation of an ending step is the episode's true final one, so a truncated transition bootstraps
from it; the reset step after it (valid False) is no transition and is dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from p2prl import checks as check
from p2prl.algos.returns import nstep_return
from p2prl.data import ReplayBuffer
from p2prl.frame_replay import FrameReplay


@dataclass
class ReplayConfig:
    """The `algo` keys of every algorithm that learns from its peer's replay buffer (DQN, SAC, TD3)."""

    name: str
    num_envs: int
    buffer_size: int
    batch_size: int
    learning_starts: int
    train_freq: int
    gradient_steps: int
    gamma: float
    tau: float
    hidden_sizes: list
    activation: str

    def __post_init__(self) -> None:
        check.fields(self, "algo.", unit_open=("gamma", "tau"), nonneg_int=("learning_starts",),
                     positive_int=("num_envs", "buffer_size", "batch_size", "train_freq", "gradient_steps"))
        check.net("algo.", self.hidden_sizes, self.activation)
        if self.batch_size > self.buffer_size:
            raise check.ConfigError("algo.batch_size", self.batch_size, f"must be <= algo.buffer_size={self.buffer_size}")


class TransitionWriter:
    def __init__(self, buffer: Union[ReplayBuffer, FrameReplay], first_obs: np.ndarray, num_envs: int,
                 n_step: int, gamma: float) -> None:
        self.buffer, self.n_step, self.gamma = buffer, n_step, gamma
        self.keys = buffer.begin(first_obs)  # what transitions from the current observations are stored by
        self.windows: list[deque] = [deque() for _ in range(num_envs)]  # n-step windows per env

    def add(self, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray,
            truncated: np.ndarray, valid: np.ndarray) -> None:
        """Store one vector step's valid transitions. actions, rewards (float32), terminated, truncated,
        valid: (N,); next_obs: (N, *obs_shape) in the buffer's dtype."""
        next_keys = self.buffer.observe(next_obs, valid)
        if self.n_step == 1:
            v = valid
            self.buffer.add(self.keys[v], actions[v], rewards[v], next_keys[v],
                            np.full(int(v.sum()), self.gamma, dtype=np.float32), terminated[v].astype(np.float32))
        else:
            for i in np.flatnonzero(valid):
                window = self.windows[i]
                window.append((self.keys[i], int(actions[i]), float(rewards[i])))
                if terminated[i] or truncated[i]:
                    while window:  # flush: shorter windows, bootstrap only if truncated
                        self._emit(window, next_keys[i], bool(terminated[i]))
                        window.popleft()
                elif len(window) == self.n_step:
                    self._emit(window, next_keys[i], False)
                    window.popleft()
        self.keys = next_keys

    def _emit(self, window: deque, boot_key: np.ndarray, terminated: bool) -> None:
        ret, disc = nstep_return([w[2] for w in window], self.gamma)
        key, action, _ = window[0]
        self.buffer.add(np.asarray(key)[None], np.array([action]), np.array([ret], dtype=np.float32),
                        np.asarray(boot_key)[None],
                        np.array([disc], dtype=np.float32), np.array([float(terminated)], dtype=np.float32))

    def state_dict(self, keys: bool) -> dict:
        """The windows under way and, with `keys` (the buffer is saved too), the current keys."""
        s = {"windows": [{"obs": torch.from_numpy(np.stack([w[0] for w in d])) if d else torch.zeros(0),
                          "actions": torch.tensor([w[1] for w in d], dtype=torch.int64),
                          "rewards": torch.tensor([w[2] for w in d], dtype=torch.float64)} for d in self.windows]}
        if keys:
            s["obs_key"] = torch.from_numpy(np.asarray(self.keys).copy())
        return s

    def load_state_dict(self, s: dict, obs: np.ndarray, continued: bool) -> None:
        """Restore after the buffer was (or was not) restored. `continued`: the envs continue the saved
        episodes; if not (fresh episodes, `obs` their first observations), the windows stay empty, since
        the saved ones end old episodes, and no window may span two episodes."""
        if continued:
            for d, w in zip(self.windows, s.get("windows", ())):  # SAC's earlier files: none
                d.clear()
                d.extend((o.numpy().copy(), int(a), float(r)) for o, a, r in zip(w["obs"], w["actions"], w["rewards"]))
        if continued and "obs_key" in s:
            self.keys = s["obs_key"].numpy().copy()
        else:  # fresh episodes, or a fresh buffer that the windows' frame indices would not point into
            self.keys = self.buffer.begin(obs)
            if isinstance(self.buffer, FrameReplay):
                for d in self.windows:
                    d.clear()
