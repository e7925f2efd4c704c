"""Per-env wrapper stacks chosen by `env.wrapper` and `env.frame_stack`.

`env.wrapper=atari` is the usual Atari preprocessing, built from gymnasium's own wrappers where they do
what is wanted: AtariPreprocessing (up to 30 no-op starts, frame skip 4 with the last two frames
max-pooled, 84x84 grey), then `GameScore`, then (`env.terminal_on_life_loss`) `LifeLoss`, then
`FireReset` for games that wait for FIRE, then ClipReward to [-1, 1]. `env.frame_stack` adds
FrameStackObservation outermost (padded with the reset frame), giving (k, 84, 84) uint8 observations.

The learner sees clipped rewards and, with `LifeLoss`, an episode end at every lost life; what is logged
as `episode_return_mean` is the game's own score over every life: `GameScore` puts each step's
unclipped reward and whether the game is over into the step's info (`score`, `game_over`), and the
samplers count episodes from those when they are there (`episode_signal`).

gymnasium's own `terminal_on_life_loss` restarts the game at a lost life; `LifeLoss` keeps playing
the same game (the lives left carry on), as the DQN papers' training did.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from p2prl.config import EnvConfig

SCORE, GAME_OVER = "score", "game_over"


class GameScore(gym.Wrapper):
    """Adds the step's unclipped reward and whether the game itself ended to every info."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, {**info, SCORE: 0.0, GAME_OVER: False}

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        return obs, reward, term, trunc, {**info, SCORE: float(reward), GAME_OVER: bool(term or trunc)}


class LifeLoss(gym.Wrapper):
    """A lost life ends the episode for the learner (terminated); the next reset only continues the
    game with a no-op step, unless the game was over. (Should that no-op step end the game, a new one
    starts at once: the two games are counted as one, a case too rare to be worth a signal.)"""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives, self.game_over = 0, True

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        self.game_over = bool(info.get(GAME_OVER, term or trunc))
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            term = True
        self.lives = lives
        return obs, reward, term, trunc, info

    def reset(self, **kwargs):
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, term, trunc, info = self.env.step(0)  # the same game, one no-op on
            if term or trunc:
                obs, info = self.env.reset(**kwargs)
        self.game_over = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Presses FIRE after every reset, for games that wait for it (Breakout serves the ball so)."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        obs, _, term, trunc, fired = self.env.step(1)
        if term or trunc:
            return self.env.reset(**kwargs)
        if SCORE in info:  # what FIRE scored still counts in the game's score
            info = {**info, SCORE: info[SCORE] + fired.get(SCORE, 0.0)}
        return obs, info


def atari(env: gym.Env, terminal_on_life_loss: bool) -> gym.Env:
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True,
                                          scale_obs=False, terminal_on_life_loss=False)
    return scored(env, terminal_on_life_loss)


def scored(env: gym.Env, terminal_on_life_loss: bool) -> gym.Env:
    """What follows AtariPreprocessing: the game score, lives, FIRE on reset, clipped rewards."""
    env = GameScore(env)
    if terminal_on_life_loss:
        env = LifeLoss(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env)
    return gym.wrappers.ClipReward(env, -1.0, 1.0)


def wrap(env: gym.Env, cfg: EnvConfig) -> gym.Env:
    """`env` with the wrappers `cfg` asks for (none: unchanged)."""
    if cfg.wrapper == "atari":
        env = atari(env, cfg.terminal_on_life_loss)
    if cfg.frame_stack is not None:
        env = gym.wrappers.FrameStackObservation(env, cfg.frame_stack)
    return env


def episode_signal(rewards: np.ndarray, dones: np.ndarray, infos: dict) -> tuple[np.ndarray, np.ndarray]:
    """What episodes are counted from: (per-env score, per-env game over) where `GameScore` put them
    into the vector env's infos, else the rewards and episode ends the learner sees."""
    if SCORE in infos:
        return np.asarray(infos[SCORE], dtype=np.float64), np.asarray(infos[GAME_OVER], dtype=bool)
    return rewards, dones
