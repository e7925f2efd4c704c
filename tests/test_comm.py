"""Several tensors in one sum, and tensors that ride in the next sum of their dtype (or at settle)."""
import pytest
import torch

from p2prl.comm import LocalComm, open_comm

pytestmark = pytest.mark.timeout(120)


def _sums(rank: int, cfg, spin: bool):
    comm = open_comm(cfg, "gloo", cores=[rank] if spin else None)
    a, b = torch.full((3,), rank + 1.0), torch.full((2, 2), 10.0 * (rank + 1))
    calls = comm.calls
    comm.all_reduce_sum(a, b)
    one_call = comm.calls - calls
    rider, other = torch.full((4,), float(rank), dtype=torch.float64), torch.full((2,), rank, dtype=torch.int64)
    comm.sum_with_next(rider)
    comm.sum_with_next(other)
    stats = torch.full((2,), 1.0, dtype=torch.float64)
    calls = comm.calls
    comm.all_reduce_sum(stats)  # takes the float64 rider with it, not the int64 one
    took = (comm.calls - calls, rider.clone(), other.clone())
    comm.settle()
    return a, b, one_call, took, other, stats, comm.calls - calls


@pytest.mark.parametrize("spin", [False, True], ids=["gloo", "shared-memory"])
def test_several_tensors_one_collective(spin, compose, peers):
    results = peers(_sums, 2, compose("comm.timeout_s=30").comm, spin)
    for rank, (a, b, one_call, (took_calls, rider, other_then), other, stats, calls) in enumerate(results):
        assert torch.equal(a, torch.full((3,), 3.0)) and torch.equal(b, torch.full((2, 2), 30.0)) and one_call == 1
        assert took_calls == 1 and torch.equal(rider, torch.full((4,), 1.0, dtype=torch.float64))
        assert torch.equal(stats, torch.full((2,), 2.0, dtype=torch.float64))
        assert torch.equal(other_then, torch.tensor([rank, rank]))  # int64: not taken by the float64 sum
        assert torch.equal(other, torch.tensor([1, 1])) and calls == 2  # settle summed it


def test_a_world_of_one_sums_to_itself():
    comm = LocalComm()
    x, y = torch.ones(3), torch.arange(4.0)
    comm.sum_with_next(y)
    comm.all_reduce_sum(x)
    comm.settle()
    assert torch.equal(x, torch.ones(3)) and torch.equal(y, torch.arange(4.0)) and comm.calls == 1
