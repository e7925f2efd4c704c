"""Return estimators (and PPO's sample weights) as pure functions, so tests can check them against
hand-computed cases.

Conventions (gymnasium 1.x, next-step autoreset): arrays are (T, N) over T vector steps of N envs.
Step t took action a_t in obs_t and got rewards[t]; `terminated[t]` / `truncated[t]` say the episode
ended at that step. The obs fed at step t+1 is then the episode's *final* observation (the env only
resets on the following call), so values[t+1] = V(final obs): exactly the bootstrap a truncated
episode needs. The step after an end is a reset step whose transition is invalid and must be masked.
"""
from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, next_value: torch.Tensor,
        terminated: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalized advantage estimates, (T, N).

    rewards, values, terminated, dones: (T, N); next_value: (N,) = V(obs_T) after the last step.
    dones = terminated | truncated. A terminated step bootstraps nothing; a truncated step bootstraps
    from V(final obs); both cut the lambda-trace so no advantage leaks across an episode boundary.
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    nonterminal = 1.0 - terminated.to(rewards.dtype)
    continuing = 1.0 - dones.to(rewards.dtype)
    for t in reversed(range(T)):
        v_next = next_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * v_next * nonterminal[t] - values[t]
        last = delta + gamma * lam * continuing[t] * last
        adv[t] = last
    return adv


def td_targets(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """One-step TD targets r + gamma * (1 - terminated) * V(s'), any matching shapes.

    Truncated transitions are NOT terminal: they bootstrap from V(final obs) like any other step.
    """
    return rewards + gamma * (1.0 - terminated.to(rewards.dtype)) * next_values


def nstep_return(rewards: list[float], gamma: float) -> tuple[float, float]:
    """(sum_k gamma^k r_k, gamma^len(rewards)): an n-step reward sum and the discount of its bootstrap.

    An episode end inside the window shortens it: the caller passes only the rewards up to the end,
    bootstraps from the final observation (if truncated) with the returned discount, or not at all.
    """
    total, discount = 0.0, 1.0
    for r in rewards:
        total += discount * r
        discount *= gamma
    return total, discount


def sample_weights(valid: torch.Tensor, n_valid: int, minibatches: int, world_size: int) -> torch.Tensor:
    """Per-sample loss weights (B,): a minibatch's weighted sum, averaged over the peers, is the mean
    over the global minibatch, whatever each peer's number of samples (stragglers contribute fewer);
    reset steps weigh 0. `n_valid`: valid samples over all peers. Exact for one minibatch: 2 peers with
    half the data each (or 7 and 3 samples) = 1 peer with all of it."""
    return valid.float() * (minibatches * world_size / max(n_valid, 1))
