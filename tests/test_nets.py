"""The networks' fast paths compute what the plain modules compute, bit for bit."""
import pytest
import torch
from torch import nn

from p2prl.nets import mlp


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_forward_and_gradients_equal_the_sequential_modules_bit_for_bit(activation):
    torch.manual_seed(0)
    fast = mlp(7, [32, 16], 3, activation)
    plain = nn.Sequential(*fast)  # the same layers, called as modules
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    for rows in (1, 64):
        x = torch.randn(rows, 7, requires_grad=True)
        out, ref = fast(x), plain(x)
        assert torch.equal(out, ref)
        grads = torch.autograd.grad(out.square().sum(), [x, *fast.parameters()])
        ref_grads = torch.autograd.grad(ref.square().sum(), [x, *plain.parameters()])
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("continuous", [True, False])
def test_act_draws_and_scores_actions_as_the_distribution_does_bit_for_bit(continuous):
    """act's Gaussian path skips building torch's Normal at every env step: the same draws, log-probs
    and values as sampling and scoring the distribution of dist_value."""
    import gymnasium as gym
    import numpy as np

    from p2prl.nets import ActorCritic
    obs_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float64)
    act_space = gym.spaces.Box(-1.0, 1.0, (6,), np.float32) if continuous else gym.spaces.Discrete(5)
    torch.manual_seed(0)
    model = ActorCritic(obs_space, act_space, [32, 32], "tanh", log_std_init=-0.5)
    obs = torch.randn(7, 17)
    with torch.inference_mode():
        torch.manual_seed(1)
        a, logp, v = model.act(obs)
        torch.manual_seed(1)
        d, v_ref = model.dist_value(obs)
        a_ref = d.sample()
        logp_ref = model.log_prob(d, a_ref)
    assert torch.equal(a, a_ref) and torch.equal(logp, logp_ref) and torch.equal(v, v_ref)
    assert a.shape == ((7, 6) if continuous else (7,)) and logp.shape == (7,)
