"""Published returns that the results page (`python -m p2prl.bench --report`) sets beside p2prl's: each
copied from its source as published, with the env version and budget it was measured at and how it was
evaluated. A preset without a row here has no reference on the page; add none that cannot be checked.

rl-baselines3-zoo's benchmark.md: one trained agent per row, evaluated after training over
`eval_timesteps` with the deterministic policy (Atari: the stochastic one). CleanRL's benchmark tables:
the mean over 3 seeds of each run's average return of its training episodes (the stochastic policy while
it learns; no separate evaluation). Both are on older env versions than p2prl's (MuJoCo v3/v4 against
v5, LunarLander v2 against v3, Atari NoFrameskip-v4 against ALE v5): close, not identical tasks.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    how: str  # how its number was evaluated, for the page


@dataclass(frozen=True)
class Reference:
    algo: str     # p2prl's algo
    env: str      # p2prl's env preset
    source: Source
    value: float  # the published mean return
    env_id: str   # the env (and version) it was measured on
    budget: int   # env steps it was trained for
    deterministic: bool  # a greedy (deterministic) evaluation, as p2prl's train.eval_every_steps


ZOO = Source("rl-baselines3-zoo", "https://github.com/DLR-RM/rl-baselines3-zoo/blob/master/benchmark.md",
             "one agent, evaluated after training")
_CLEANRL = "https://github.com/vwxyzjn/cleanrl/blob/master/docs/benchmark/{}.md"
_HOW = "training episodes, mean of 3 seeds"
CLEANRL_PPO = Source("CleanRL ppo.py", _CLEANRL.format("ppo"), _HOW)
CLEANRL_PPO_CONTINUOUS = Source("CleanRL ppo_continuous_action.py", _CLEANRL.format("ppo_continuous_action"), _HOW)
CLEANRL_PPO_ATARI = Source("CleanRL ppo_atari.py", _CLEANRL.format("ppo_atari"), _HOW)
CLEANRL_SAC = Source("CleanRL sac_continuous_action.py", _CLEANRL.format("sac"), _HOW)
CLEANRL_TD3 = Source("CleanRL td3_continuous_action.py", _CLEANRL.format("td3"), _HOW)

M = 1_000_000
REFERENCES = (
    Reference("ppo", "cartpole", ZOO, 500.0, "CartPole-v1", 100_000, True),
    Reference("ppo", "cartpole", CLEANRL_PPO, 490.04, "CartPole-v1", 500_000, False),
    Reference("a2c", "cartpole", ZOO, 500.0, "CartPole-v1", 500_000, True),
    Reference("dqn", "cartpole", ZOO, 500.0, "CartPole-v1", 50_000, True),
    Reference("ppo", "acrobot", ZOO, -73.506, "Acrobot-v1", M, True),
    Reference("ppo", "acrobot", CLEANRL_PPO, -86.36, "Acrobot-v1", 500_000, False),
    Reference("dqn", "acrobot", ZOO, -76.639, "Acrobot-v1", 100_000, True),
    Reference("ppo", "lunarlander", ZOO, 242.119, "LunarLander-v2", M, True),
    Reference("dqn", "lunarlander", ZOO, 154.382, "LunarLander-v2", 100_000, True),
    Reference("ppo", "pendulum", ZOO, -172.225, "Pendulum-v1", 100_000, True),
    Reference("sac", "pendulum", ZOO, -156.995, "Pendulum-v1", 20_000, True),
    Reference("td3", "pendulum", ZOO, -151.855, "Pendulum-v1", 20_000, True),
    Reference("sac", "lunarlandercontinuous", ZOO, 260.390, "LunarLanderContinuous-v2", 500_000, True),
    Reference("td3", "lunarlandercontinuous", ZOO, 207.451, "LunarLanderContinuous-v2", 300_000, True),
    Reference("ppo", "halfcheetah", ZOO, 5819.099, "HalfCheetah-v3", M, True),
    Reference("ppo", "halfcheetah", CLEANRL_PPO_CONTINUOUS, 1442.64, "HalfCheetah-v4", M, False),
    Reference("ppo", "hopper", ZOO, 2410.435, "Hopper-v3", M, True),
    Reference("ppo", "hopper", CLEANRL_PPO_CONTINUOUS, 2382.86, "Hopper-v4", M, False),
    Reference("ppo", "walker2d", ZOO, 3478.798, "Walker2d-v3", M, True),
    Reference("ppo", "walker2d", CLEANRL_PPO_CONTINUOUS, 2287.95, "Walker2d-v4", M, False),
    Reference("sac", "halfcheetah", ZOO, 9535.451, "HalfCheetah-v3", M, True),
    Reference("sac", "halfcheetah", CLEANRL_SAC, 9634.89, "HalfCheetah-v4", M, False),
    Reference("sac", "hopper", ZOO, 2325.547, "Hopper-v3", M, True),
    Reference("sac", "hopper", CLEANRL_SAC, 2310.46, "Hopper-v4", M, False),
    Reference("sac", "walker2d", ZOO, 3863.203, "Walker2d-v3", M, True),
    Reference("sac", "walker2d", CLEANRL_SAC, 3591.45, "Walker2d-v4", M, False),
    Reference("td3", "halfcheetah", ZOO, 9655.666, "HalfCheetah-v3", M, True),
    Reference("td3", "halfcheetah", CLEANRL_TD3, 9583.22, "HalfCheetah-v4", M, False),
    Reference("td3", "hopper", ZOO, 3606.390, "Hopper-v3", M, True),
    Reference("td3", "hopper", CLEANRL_TD3, 3134.61, "Hopper-v4", M, False),
    Reference("td3", "walker2d", ZOO, 4717.823, "Walker2d-v3", M, True),
    Reference("td3", "walker2d", CLEANRL_TD3, 4057.59, "Walker2d-v4", M, False),
    # Atari, 10M agent steps (40M frames): the zoo evaluates these with the stochastic policy.
    Reference("ppo", "breakout", ZOO, 398.033, "BreakoutNoFrameskip-v4", 10 * M, False),
    Reference("ppo", "breakout", CLEANRL_PPO_ATARI, 414.66, "BreakoutNoFrameskip-v4", 10 * M, False),
    Reference("ppo", "pong", ZOO, 20.989, "PongNoFrameskip-v4", 10 * M, False),
    Reference("ppo", "pong", CLEANRL_PPO_ATARI, 20.36, "PongNoFrameskip-v4", 10 * M, False),
    Reference("dqn", "breakout", ZOO, 358.327, "BreakoutNoFrameskip-v4", 10 * M, False),
    Reference("dqn", "pong", ZOO, 20.602, "PongNoFrameskip-v4", 10 * M, False),
)


def references(algo: str, env: str) -> list[Reference]:
    """The published returns for p2prl's `algo` on its env preset `env` (none: an empty list)."""
    return [r for r in REFERENCES if r.algo == algo and r.env == env]
