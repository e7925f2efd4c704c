"""The count-weighted normalizer merge equals the statistics of the concatenated data."""
import torch

from p2prl.comm import LocalComm
from p2prl.normalize import RunningNormalizer, global_moments, merge_moments, moments_of


def test_merge_equals_concatenated():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(37, 3, generator=g, dtype=torch.float64) * 4 + 2
    b = torch.randn(5, 3, generator=g, dtype=torch.float64) - 7
    m = merge_moments(moments_of(a), moments_of(b))
    both = torch.cat([a, b])
    assert float(m.count) == 42
    assert torch.allclose(m.mean, both.mean(0))
    assert torch.allclose(m.m2 / m.count, both.var(0, unbiased=False))


def test_merge_with_empty_is_identity():
    a = torch.randn(10, 2, dtype=torch.float64)
    empty = moments_of(torch.zeros(0, 2))
    m = merge_moments(empty, moments_of(a))
    assert torch.allclose(m.mean, a.mean(0)) and float(m.count) == 10


def test_running_normalizer_normalizes_after_updates():
    norm = RunningNormalizer((2,))
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(100, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([5.0, -1.0])
            for _ in range(5)]
    for x in data:
        (m,) = global_moments(LocalComm(), moments_of(x))
        norm.update(m)
    y = norm(torch.cat(data))
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(2), atol=1e-3)
