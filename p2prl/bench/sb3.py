"""One Stable-Baselines3 baseline run for `p2prl.bench`, in its own process.

`python -m p2prl.bench.sb3 --algo ppo --env CartPole-v1 --seed 0 --target 475 --out run.json`
trains SB3 with rl-baselines3-zoo's hyperparameters for the env and stops as soon as the mean return
of the 20 most recently finished training episodes reaches the target (p2prl's `episode_return_mean`),
when the step budget is spent, or at the wall-clock deadline. `--watch R` notes when that mean first
reaches R without stopping; `--eval-every N` plays `--eval-episodes` greedy episodes every N steps (and
at the end), seeded as p2prl's evaluation during training seeds them (`train.eval_every_steps`), inside
the timed training loop as p2prl's are. It writes a JSON summary with the same fields p2prl's
summary.json uses where they mean the same thing.
"""
from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from p2prl.atomic import write_json_atomic
from p2prl.metrics import peak_rss_mb

# rl-baselines3-zoo's tuned settings (hyperparams/ppo.yml, hyperparams/dqn.yml): CartPole-v1, and
# LunarLander-v2 (run on gymnasium's LunarLander-v3, the same task). "horizon" is the zoo's
# n_timesteps: the linear schedules ("lin_X" in the zoo) and the exploration decay run over it.
# "normalize": the zoo's VecNormalize (observations and rewards, with the algorithm's gamma).
ZOO: dict[tuple[str, str], dict[str, Any]] = {
    ("ppo", "CartPole-v1"): dict(
        n_envs=8, horizon=100_000, linear=("learning_rate", "clip_range"),
        kwargs=dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                    learning_rate=1e-3, clip_range=0.2)),
    ("dqn", "CartPole-v1"): dict(
        n_envs=1, horizon=50_000, linear=(),
        kwargs=dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000,
                    gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                    exploration_fraction=0.16, exploration_final_eps=0.04,
                    policy_kwargs=dict(net_arch=[256, 256]))),
    ("ppo", "LunarLander-v3"): dict(
        n_envs=16, horizon=1_000_000, linear=(),
        kwargs=dict(n_steps=1024, batch_size=64, gae_lambda=0.98, gamma=0.999, n_epochs=4, ent_coef=0.01)),
    # The zoo's `atari` entries (AtariWrapper, 4 stacked frames, CnnPolicy), on the v4 NoFrameskip id
    # that p2prl's ALE/Breakout-v5 preset equals (frameskip 1, no sticky actions).
    ("ppo", "BreakoutNoFrameskip-v4"): dict(
        n_envs=8, horizon=10_000_000, linear=("learning_rate", "clip_range"), atari=True,
        kwargs=dict(n_steps=128, n_epochs=4, batch_size=256, learning_rate=2.5e-4, clip_range=0.1, vf_coef=0.5,
                    ent_coef=0.01)),
    ("dqn", "BreakoutNoFrameskip-v4"): dict(
        n_envs=1, horizon=10_000_000, linear=(), atari=True,
        kwargs=dict(buffer_size=100_000, learning_rate=1e-4, batch_size=32, learning_starts=100_000,
                    target_update_interval=1000, train_freq=4, gradient_steps=1, exploration_fraction=0.1,
                    exploration_final_eps=0.01, optimize_memory_usage=False)),
    # The zoo's tuned HalfCheetah-v4 settings, on v5 (the same task, as p2prl's preset); activation_fn names
    # a torch.nn class.
    ("ppo", "HalfCheetah-v5"): dict(
        n_envs=1, horizon=1_000_000, linear=(), normalize=True,
        kwargs=dict(n_steps=512, batch_size=64, gamma=0.98, learning_rate=2.0633e-5, ent_coef=0.000401762,
                    clip_range=0.1, n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8, vf_coef=0.58096,
                    policy_kwargs=dict(log_std_init=-2, ortho_init=False, activation_fn="ReLU",
                                       net_arch=dict(pi=[256, 256], vf=[256, 256])))),
    # SAC (hyperparams/sac.yml): Pendulum-v1 is SB3's defaults with lr 1e-3; the MuJoCo envs ("mujoco-defaults",
    # v3 in the zoo, run on v5) SB3's defaults with 10k steps of random actions first. TD3 (td3.yml's MuJoCo
    # defaults): Gaussian exploration noise of std 0.1 (`noise_std`), lr 1e-3, 400x300 networks.
    ("sac", "Pendulum-v1"): dict(n_envs=1, horizon=20_000, linear=(), kwargs=dict(learning_rate=1e-3)),
    ("sac", "HalfCheetah-v5"): dict(n_envs=1, horizon=1_000_000, linear=(), kwargs=dict(learning_starts=10_000)),
    ("sac", "Hopper-v5"): dict(n_envs=1, horizon=1_000_000, linear=(), kwargs=dict(learning_starts=10_000)),
    ("td3", "HalfCheetah-v5"): dict(
        n_envs=1, horizon=1_000_000, linear=(), noise_std=0.1,
        kwargs=dict(learning_starts=10_000, learning_rate=1e-3, batch_size=256, train_freq=1, gradient_steps=1,
                    policy_kwargs=dict(net_arch=[400, 300]))),
    ("dqn", "LunarLander-v3"): dict(
        n_envs=1, horizon=100_000, linear=(),
        kwargs=dict(learning_rate=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=0, gamma=0.99,
                    target_update_interval=250, train_freq=4, gradient_steps=-1, exploration_fraction=0.12,
                    exploration_final_eps=0.1, policy_kwargs=dict(net_arch=[256, 256]))),
}

# PPO's learning rate reaches 0 at the zoo's horizon, so a longer budget cannot help; DQN's schedules
# are constant past it (final epsilon, fixed learning rate), so DQN may train on until the deadline.
DEFAULT_BUDGET = {"ppo": None, "dqn": 300_000, "sac": None, "td3": None}  # None: the zoo's horizon


def budget_for(algo: str, env_id: str, steps: Optional[int]) -> int:
    """The step budget of one run: `steps` if given, else the algorithm's default."""
    return steps or DEFAULT_BUDGET[algo] or ZOO[(algo, env_id)]["horizon"]


def zoo_linear(initial: float, horizon: int, budget: int) -> Callable[[float], float]:
    """The zoo's `lin_<initial>` over `horizon` env steps, as a function of SB3's progress_remaining
    (which runs over `budget` steps): the same schedule in steps whatever the budget, held at 0 after."""
    def schedule(progress_remaining: float) -> float:
        step = (1.0 - progress_remaining) * budget
        return initial * max(0.0, 1.0 - step / horizon)
    return schedule


def model_kwargs(algo: str, env_id: str, budget: int) -> dict[str, Any]:
    """The zoo's hyperparameters with their schedules pinned to the zoo's horizon in env steps, so that
    the first `horizon` steps are the zoo's run whatever the budget."""
    spec = ZOO[(algo, env_id)]
    kwargs = dict(spec["kwargs"])
    for key in spec["linear"]:
        kwargs[key] = zoo_linear(kwargs[key], spec["horizon"], budget)
    if "exploration_fraction" in kwargs:
        kwargs["exploration_fraction"] = min(1.0, kwargs["exploration_fraction"] * spec["horizon"] / budget)
    return kwargs


def greedy_returns(model: Any, env_id: str, episodes: int, normalize: Any = None) -> list[float]:
    """`episodes` greedy episodes on a fresh env, seeded as p2prl's evaluation seeds them (its EVAL_SEED
    + i), observations normalized as in training where the zoo normalizes them (`normalize`: its
    VecNormalize)."""
    import gymnasium as gym
    from p2prl.policy import EVAL_SEED
    env = gym.make(env_id)
    returns = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=EVAL_SEED + i)
            total, done = 0.0, False
            while not done:
                action, _ = model.predict(normalize.normalize_obs(obs) if normalize else obs, deterministic=True)
                obs, reward, term, trunc, _ = env.step(action)
                total, done = total + float(reward), term or trunc
            returns.append(total)
    finally:
        env.close()
    return returns


def train(algo: str, env_id: str, seed: int, target: Optional[float], steps: Optional[int],
          deadline: Optional[float], window: int = 20, watch: Optional[float] = None,
          eval_every: Optional[int] = None, eval_episodes: int = 10,
          learning_starts: Optional[int] = None) -> dict[str, Any]:
    """Train one SB3 model; the summary. `deadline` is a `time.time()` at which training stops; `watch`
    a return whose first crossing is noted without stopping; `eval_every`: greedy evaluations;
    `learning_starts` (DQN) replaces the zoo's."""
    import numpy as np
    import torch
    from stable_baselines3 import DQN, PPO, SAC, TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    t_start = time.perf_counter()  # like p2prl's run(): after imports; env and model construction count
    torch.set_num_threads(1)  # one intra-op thread, as every p2prl peer uses
    budget = budget_for(algo, env_id, steps)
    spec = ZOO[(algo, env_id)]
    if spec.get("atari"):  # Monitor inside AtariWrapper: info["episode"] is the whole game's score
        import ale_py
        import gymnasium as gym
        from stable_baselines3.common.env_util import make_atari_env
        from stable_baselines3.common.vec_env import VecFrameStack
        gym.register_envs(ale_py)
        envs = VecFrameStack(make_atari_env(env_id, n_envs=spec["n_envs"], seed=seed), n_stack=4)
    else:
        envs = make_vec_env(env_id, n_envs=spec["n_envs"], seed=seed)  # Monitor-wrapped: info["episode"]
    kwargs = model_kwargs(algo, env_id, budget)
    if learning_starts is not None:
        kwargs["learning_starts"] = learning_starts
    if spec.get("normalize"):  # outside Monitor: the episode returns stay the env's own
        from stable_baselines3.common.vec_env import VecNormalize
        envs = VecNormalize(envs, gamma=kwargs["gamma"])
    if isinstance(kwargs.get("policy_kwargs", {}).get("activation_fn"), str):
        kwargs["policy_kwargs"] = {**kwargs["policy_kwargs"],
                                   "activation_fn": getattr(torch.nn, kwargs["policy_kwargs"]["activation_fn"])}
    if "noise_std" in spec:
        from stable_baselines3.common.noise import NormalActionNoise
        n = int(np.prod(envs.action_space.shape))
        kwargs["action_noise"] = NormalActionNoise(np.zeros(n), spec["noise_std"] * np.ones(n))
    cls = {"ppo": PPO, "dqn": DQN, "sac": SAC, "td3": TD3}[algo]
    policy = "CnnPolicy" if spec.get("atari") else "MlpPolicy"
    model = cls(policy, envs, seed=seed, device="cpu", verbose=0, **kwargs)
    state: dict[str, Any] = {"t_first": None, "reached_at": None, "timed_out": False, "episodes": 0,
                             "watched_at": None, "evaluations": []}
    returns: deque[float] = deque(maxlen=window)

    def evaluate(step: int) -> None:
        r = greedy_returns(model, env_id, eval_episodes, envs if spec.get("normalize") else None)
        state["evaluations"].append([step, float(np.mean(r)), float(np.std(r))])

    class StopAtTarget(BaseCallback):
        """Keeps the return window (episodes in env order within a step, as p2prl) and stops training."""

        def _on_training_start(self) -> None:
            state["t_first"] = time.perf_counter()

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    returns.append(float(info["episode"]["r"]))
                    state["episodes"] += 1
            mean = sum(returns) / len(returns) if returns else None
            if watch is not None and state["watched_at"] is None and mean is not None and mean >= watch:
                state["watched_at"] = (self.num_timesteps, time.perf_counter())
            if eval_every and self.num_timesteps // eval_every > (self.num_timesteps - self.training_env.num_envs) // eval_every:
                evaluate(self.num_timesteps)
            if target is not None and mean is not None and mean >= target:
                state["reached_at"] = (self.num_timesteps, time.perf_counter())
                return False
            if deadline is not None and time.time() >= deadline:
                state["timed_out"] = True
                return False
            return True

    model.learn(total_timesteps=budget, callback=StopAtTarget())
    if eval_every and (not state["evaluations"] or state["evaluations"][-1][0] != model.num_timesteps):
        evaluate(model.num_timesteps)  # at the end too, as p2prl's last iteration evaluates
    t_end = time.perf_counter()
    reached = state["reached_at"] or state["watched_at"]
    loop_s = max(t_end - state["t_first"], 1e-9)
    return {
        "reached": reached is not None, "steps_to_target": reached[0] if reached else None,
        "time_to_target_s": reached[1] - t_start if reached else None,
        "first_step_to_target_s": reached[1] - state["t_first"] if reached else None,
        "final_step": model.num_timesteps, "world_size": 1, "wall_s": t_end - t_start,
        "sps": model.num_timesteps / loop_s, "episodes": state["episodes"],
        "episode_return_mean": sum(returns) / len(returns) if returns else None,
        "timed_out": state["timed_out"], "budget": budget, "max_rss_mb": [peak_rss_mb()],
        "evaluations": state["evaluations"], "eval_return_mean": state["evaluations"][-1][1] if state["evaluations"] else None,
    }


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m p2prl.bench.sb3", description=__doc__.split("\n")[0])
    p.add_argument("--algo", choices=("ppo", "dqn", "sac", "td3"), required=True)
    p.add_argument("--env", required=True, choices=sorted({env for _, env in ZOO}))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=None, help="stop once the return window reaches this (default: never)")
    p.add_argument("--steps", type=int, default=None, help="step budget (default: see DEFAULT_BUDGET)")
    p.add_argument("--deadline", type=float, default=None, help="time.time() at which to stop training")
    p.add_argument("--watch", type=float, default=None, help="note when the return window first reaches this, "
                                                             "without stopping")
    p.add_argument("--eval-every", type=int, default=None, help="greedy evaluation every this many steps and at the end")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per greedy evaluation (default 10)")
    p.add_argument("--learning-starts", type=int, default=None, help="DQN: steps before learning (default: the zoo's)")
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON summary")
    a = p.parse_args(argv)
    if a.learning_starts is not None and (a.algo != "dqn" or a.learning_starts < 0):
        p.error(f"--learning-starts={a.learning_starts}: allowed: an integer >= 0, with --algo dqn")
    write_json_atomic(a.out, train(a.algo, a.env, a.seed, a.target, a.steps, a.deadline, watch=a.watch,
                                   eval_every=a.eval_every, eval_episodes=a.eval_episodes,
                                   learning_starts=a.learning_starts))


if __name__ == "__main__":
    main()
