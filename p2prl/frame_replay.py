"""Replay of image observations that stores each frame once (`FrameReplay`)."""
from __future__ import annotations

import numpy as np
import torch

from p2prl.data import ReplayBatch


class FrameReplay:
    """A replay buffer that stores each frame once, for image observations (`ReplayBuffer`'s interface).

    An observation of k stacked frames (k, H, W), newest last (FrameStackObservation, padded with the
    episode's first frame), is stored as its newest frame only; every vector step writes one frame per
    env, so env e's frames lie N slots apart, and a stack is rebuilt on sampling from the k - 1 frames
    before it, clamped to its episode's first frame. A transition is stored at its observation's slot
    with the global index of its next observation: obs and next_obs share frames. k = 1 (no stacking)
    stores each observation once. 100k transitions of 84x84 frames: 0.7 GB, where obs and next_obs
    stacks of 4 would take 5.6 GB.
    """

    def __init__(self, capacity: int, obs_shape: tuple, num_envs: int, stack: int, rng: np.random.Generator) -> None:
        self.capacity, self.n, self.k, self.rng = capacity, num_envs, stack, rng
        self.frame_shape = tuple(obs_shape[1:]) if stack > 1 else tuple(obs_shape)
        self.frames = np.zeros((capacity, *self.frame_shape), dtype=np.uint8)
        self.start = np.zeros(capacity, dtype=np.int64)  # global index of the frame's episode's first frame
        self.next = np.zeros(capacity, dtype=np.int64)  # global index of the transition's next observation
        self.has = np.zeros(capacity, dtype=bool)  # the slot holds a transition
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.count = 0  # frames written so far: the next frame's global index
        self.size = 0  # transitions held

    def _write(self, frames: np.ndarray, first: np.ndarray) -> np.ndarray:
        g = self.count + np.arange(self.n)
        s = g % self.capacity
        self.size -= int(self.has[s].sum())
        self.frames[s], self.has[s] = frames, False
        self.start[s] = np.where(first, g, self.start[(g - self.n) % self.capacity])
        self.count += self.n
        return g

    def begin(self, obs: np.ndarray) -> np.ndarray:
        """First observations (N, *obs_shape): every frame of their stacks, oldest first; returns keys."""
        if self.k == 1:
            return self._write(obs, np.ones(self.n, dtype=bool))
        for j in range(self.k):
            g = self._write(obs[:, j], np.full(self.n, j == 0))
        return g

    def observe(self, next_obs: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """A step's next observations; a step that was not valid reset its env: a new episode's first."""
        return self._write(next_obs[:, -1] if self.k > 1 else next_obs, ~np.asarray(valid, dtype=bool))

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            discounts: np.ndarray, terminated: np.ndarray) -> None:
        """Transitions between observation keys (from `begin`/`observe`)."""
        s = np.asarray(obs, dtype=np.int64) % self.capacity
        self.size += int((~self.has[s]).sum())
        self.has[s] = True
        self.next[s], self.actions[s], self.rewards[s] = next_obs, actions, rewards
        self.discounts[s], self.terminated[s] = discounts, terminated

    def stacks(self, g: np.ndarray) -> np.ndarray:
        """The observations (B, *obs_shape) whose newest frames have global indices g."""
        s = g % self.capacity
        if self.k == 1:
            return self.frames[s]
        back = np.arange(self.k - 1, -1, -1) * self.n  # oldest first
        idx = np.maximum(g[:, None] - back[None, :], self.start[s][:, None])
        return self.frames[idx % self.capacity]

    def sample(self, batch_size: int) -> ReplayBatch:
        """Uniform over held transitions whose frames are all still in the buffer."""
        assert self.size > 0, "sampling from an empty replay buffer"
        oldest = self.count - self.capacity + (self.k - 1) * self.n  # older stacks lost frames
        stored = min(self.count, self.capacity)
        picked: list[np.ndarray] = []
        for _ in range(64):  # bounded: held transitions are most of the slots
            s = self.rng.integers(0, stored, size=2 * batch_size)
            g = self.count - 1 - (self.count - 1 - s) % self.capacity  # the slot's global index
            picked.append(g[self.has[s] & (g >= oldest)])
            if sum(len(p) for p in picked) >= batch_size:
                break
        g = np.concatenate(picked)
        assert len(g) > 0, "no complete transition in the replay buffer"
        g = g[:batch_size] if len(g) >= batch_size else self.rng.choice(g, batch_size)
        s = g % self.capacity
        return ReplayBatch(torch.from_numpy(self.stacks(g)), torch.from_numpy(self.actions[s]),
                           torch.from_numpy(self.rewards[s]), torch.from_numpy(self.stacks(self.next[s])),
                           torch.from_numpy(self.discounts[s]), torch.from_numpy(self.terminated[s]))

    ARRAYS = ("frames", "start", "next", "has", "actions", "rewards", "discounts", "terminated")

    def state_dict(self) -> dict:
        return {**{k: torch.from_numpy(getattr(self, k).copy()) for k in self.ARRAYS},
                "count": self.count, "size": self.size}

    def load_state_dict(self, s: dict) -> None:
        """A buffer saved with any capacity. The same keeps every slot where it was (a resumed run then
        samples the slots the uninterrupted one would). Another is re-keyed: frame g lives at slot
        g % capacity, so the newest frames both capacities hold move to their slots here and every global
        index (`start`, `next`, the sampler's keys and n-step windows) stays valid; transitions whose
        stacks may reach a frame no longer held are dropped, as `sample` would skip them."""
        saved, self.count = len(s["frames"]), int(s["count"])
        if saved == self.capacity:
            for k in self.ARRAYS:
                getattr(self, k)[:] = s[k].numpy()
            self.size = int(s["size"])
            return
        g = np.arange(max(0, self.count - min(saved, self.capacity)), self.count)  # the frames kept
        for k in self.ARRAYS:
            a = getattr(self, k)
            a[:] = 0
            a[g % self.capacity] = s[k].numpy()[g % saved]
        if len(g) and g[0] > 0:  # older frames are lost: stacks reach k - 1 vector steps back
            self.has[g[g < g[0] + (self.k - 1) * self.n] % self.capacity] = False
        self.size = int(self.has.sum())
