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
