"""GAE and TD targets against hand-computed cases, including terminations and truncations."""
import torch

from p2prl.algos.returns import gae, td_targets


def test_gae_hand_computed_termination_and_truncation():
    # One env, 5 vector steps, gamma=0.9, lambda=0.5.
    # t=0: normal; t=1: terminated (no bootstrap, trace cut); t=2: reset step (invalid, masked);
    # t=3: truncated (bootstrap from values[4] = V(final obs), trace cut); t=4: reset step.
    g, lam = 0.9, 0.5
    r = torch.tensor([[1.0], [2.0], [0.0], [3.0], [0.0]])
    v = torch.tensor([[0.5], [1.0], [9.0], [2.0], [4.0]])
    term = torch.tensor([[False], [True], [False], [False], [False]])
    done = torch.tensor([[False], [True], [False], [True], [False]])
    next_v = torch.tensor([7.0])
    adv = gae(r, v, next_v, term, done, g, lam)
    d1 = 2.0 - 1.0                      # terminated: r - V(s)
    d0 = 1.0 + g * 1.0 - 0.5
    a0 = d0 + g * lam * d1
    d3 = 3.0 + g * 4.0 - 2.0            # truncated: bootstraps from V(final obs)
    d4 = 0.0 + g * 7.0 - 4.0
    expected = [a0, d1, None, d3, d4]
    for t in (0, 1, 3, 4):
        assert abs(adv[t, 0].item() - expected[t]) < 1e-6, (t, adv[t, 0].item(), expected[t])


def test_gae_lambda_one_equals_discounted_return_minus_value():
    torch.manual_seed(0)
    T, g = 6, 0.95
    r, v = torch.rand(T, 2), torch.rand(T, 2)
    z = torch.zeros(T, 2, dtype=torch.bool)
    next_v = torch.rand(2)
    adv = gae(r, v, next_v, z, z, g, 1.0)
    ret = next_v.clone()
    for t in reversed(range(T)):
        ret = r[t] + g * ret
        assert torch.allclose(adv[t], ret - v[t], atol=1e-5)


def test_td_targets_terminal_vs_truncated():
    r = torch.tensor([1.0, 1.0, 1.0])
    q_next = torch.tensor([10.0, 10.0, 10.0])
    terminated = torch.tensor([False, True, False])  # the third is truncated: still bootstraps
    out = td_targets(r, q_next, terminated, 0.5)
    assert out.tolist() == [6.0, 1.0, 6.0]
