"""Sums through shared memory (peers on one node, each pinned): exact, identical on every peer; calls
that differ between peers are refused; a missing or dead peer still ends the collective with its rank
named."""
import mmap
from datetime import timedelta

import pytest
import torch

from p2prl.comm import PeerFailure, open_comm
from p2prl.comm.segment import SLOT_BYTES, supported
from p2prl.comm.store import connect

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not supported(), reason="shared-memory sums need x86-64 and memfd_create")]


@pytest.fixture
def comm_cfg(compose):
    return compose("comm.timeout_s=30").comm


def _inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"grad": torch.randn(5000, generator=g),  # a float32 gradient bucket
            "moments": torch.randn(7, generator=g, dtype=torch.float64),
            "digest": torch.randint(0, 2 ** 40, (3,), generator=g, dtype=torch.int64),
            "mean": torch.randn(3000, generator=g),  # a blocking mean: each peer publishes its part / world
            "large": torch.randn(SLOT_BYTES // 4 + 1, generator=g),  # larger than a slot: 2 pieces
            "strided": torch.randn(2, SLOT_BYTES // 4, generator=g).t()}  # 2 MiB, not contiguous: 2 pieces


def _reference(world: int, step: int, key: str) -> torch.Tensor:
    """The sum in rank order, as every peer must compute it."""
    total = _inputs(0, step)[key].clone()
    for r in range(1, world):
        total += _inputs(r, step)[key]
    return total


def _sums(rank: int, cfg, world: int, steps: int):
    comm = open_comm(cfg, "gloo", cores=[rank])
    assert comm.shared is not None, "peers on one node that spin did not map the shared segment"
    results = []
    for step in range(steps):
        x = _inputs(rank, step)
        pending = comm.all_reduce_mean_async(x["grad"])  # published now, summed at wait()
        results.append(pending.wait().clone())
        for key in ("moments", "digest", "large"):
            results.append(comm.all_reduce_sum(x[key]).clone())
        mean = comm.all_reduce_mean(x["mean"])
        scaled = [_inputs(r, step)["mean"] * (1.0 / world) for r in range(world)]  # what each peer publishes
        assert torch.equal(mean, sum(scaled[1:], scaled[0])), step  # added in rank order
        plain = _reference(world, step, "mean") / world
        assert torch.equal(mean, plain) if world == 2 else torch.allclose(mean, plain, rtol=1e-6, atol=1e-6)
        results.append(mean.clone())
        big = comm.all_reduce_mean(_inputs(rank, step)["large"])  # scaled and summed piece by piece
        parts = [_inputs(r, step)["large"] * (1.0 / world) for r in range(world)]
        assert torch.equal(big, sum(parts[1:], parts[0])), step
        strided = x["strided"]
        comm.all_reduce_mean_async(strided).wait()  # background form: summed in pieces at once
        results.append(strided.contiguous().clone())
        for key, got in zip(("grad", "moments", "digest", "large", "strided"), results[-6:-2] + results[-1:]):
            want = _reference(world, step, key)
            if key in ("grad", "strided"):
                want /= world
            assert torch.equal(got, want), (key, step)
    return [t.view(torch.uint8).clone() for t in results], comm.shared.calls


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_sums_are_exact_and_identical_on_every_peer(world, comm_cfg, peers):
    outs = peers(_sums, world, comm_cfg, world, 40)
    calls = {c for _, c in outs}
    assert calls == {40 * (3 + 1 + 2 + 2 + 2)}, calls  # every sum went through memory, the large ones in 2 pieces
    for got, _ in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0][0], got))


def _background_then_blocking(rank: int, cfg, rounds: int):
    comm = open_comm(cfg, "gloo", cores=[rank])
    assert comm.shared is not None
    for step in range(rounds):
        x = [torch.full((64,), 10.0 * (3 * step + i) + rank) for i in range(3)]
        want = [2 * (10.0 * (3 * step + i)) + 1 for i in range(3)]  # rank 0 + rank 1
        pending = comm.all_reduce_mean_async(x[0])  # background sum, then blocking sums before its wait
        comm.all_reduce_sum(x[1])
        if step % 2:
            pending.wait()
        comm.all_reduce_sum(x[2])
        if step % 2 == 0:
            pending.wait()
        assert torch.equal(x[0], torch.full((64,), want[0] / 2)), (step, x[0][0].item())
        assert torch.equal(x[1], torch.full((64,), want[1])) and torch.equal(x[2], torch.full((64,), want[2]))
    return comm.shared.calls


def test_blocking_sums_while_a_background_sum_is_pending_keep_every_call_apart(comm_cfg, peers):
    assert peers(_background_then_blocking, 2, comm_cfg, 200) == [600, 600]


def _reopen_and_disagree(rank: int, cfg):
    first = open_comm(cfg, "gloo", cores=[rank])
    first.all_reduce_sum(torch.ones(3))
    again = open_comm(cfg, "gloo", cores=[rank])  # a multirun's next job: the same segment
    assert again.shared is first.shared and again.shared.calls == 1
    again.all_reduce_sum(torch.ones(3))
    # One peer not pinned: nobody may sum through memory, or the pinned one would wait there forever.
    mixed = open_comm(cfg, "gloo", cores=[0] if rank == 0 else None)
    assert mixed.shared is None
    t = torch.full((5,), float(rank + 1))
    mixed.all_reduce_sum(t)
    assert torch.equal(t, torch.full((5,), 3.0))
    # Both peers on the same core (each chose alone): neither spins, nobody sums through memory.
    crowded = open_comm(cfg, "gloo", cores=[0])
    assert crowded.shared is None and not crowded.spin
    crowded.all_reduce_sum(t)
    assert torch.equal(t, torch.full((5,), 6.0))
    return again.shared.calls


def test_the_segment_serves_later_jobs_and_is_used_only_when_every_peer_owns_its_cores(comm_cfg, peers):
    assert peers(_reopen_and_disagree, 2, comm_cfg) == [2, 2]


def _mismatched(rank: int, cfg, mine: torch.Tensor):
    comm = open_comm(cfg, "gloo", cores=[rank])
    assert comm.shared is not None
    comm.all_reduce_sum(torch.ones(2))  # one good call first
    with pytest.raises(PeerFailure) as e:
        comm.all_reduce_sum(mine if rank == 0 else torch.ones(8))
    return str(e.value)


@pytest.mark.parametrize("rank0", [torch.ones(4), torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.int32)],
                         ids=["size", "dtype-and-bytes", "dtype"])  # int32: the same 32 bytes as rank 1's
def test_calls_that_differ_between_peers_stop_both_naming_each_call(rank0, comm_cfg, peers):
    # Unchecked, rank 0 would get [2, 2, 2, 2] and rank 1 [2, 2, 2, 2, 1, 1, 1, 1] (or garbage for dtypes).
    messages = peers(_mismatched, 2, comm_cfg, rank0)
    dtype = str(rank0.dtype).replace("torch.", "")
    for m in messages:
        assert "out of step" in m and "sum 2 differs" in m, m
        assert f"rank 0: call 2: {rank0.numel()} x {dtype}" in m and "rank 1: call 2: 8 x float32" in m, m


def _absent_peer(rank: int, cfg):
    comm = open_comm(cfg, "gloo", cores=[rank])
    assert comm.shared is not None
    store = connect()
    if rank == 1:  # never joins the sum; waits until rank 0 gave up
        store.wait(["p2prl-test/gave-up"], timedelta(seconds=60))
        return None
    try:
        comm.all_reduce_sum(torch.ones(4))
    except PeerFailure as e:
        return str(e)
    finally:
        store.set("p2prl-test/gave-up", "1")
    return None


def test_a_peer_that_never_arrives_ends_the_sum_after_the_timeout(compose, peers):
    message, _ = peers(_absent_peer, 2, compose("comm.timeout_s=1").comm)
    assert "rank 1 did not reach shared-memory sum 1 within 1 s" in message, message
    assert "comm.timeout_s=1" in message, message


def _dead_peer(rank: int, cfg):
    comm = open_comm(cfg, "gloo", cores=[rank])
    assert comm.shared is not None
    if rank == 1:
        return None  # exits without joining the sum
    with pytest.raises(PeerFailure) as e:
        comm.all_reduce_sum(torch.ones(4))
    return str(e.value)


def test_a_peer_whose_process_exits_is_named_without_waiting_for_the_timeout(compose, peers):
    # comm.timeout_s=600 is far beyond the test's own timeout: only the liveness check can end the sum.
    message, _ = peers(_dead_peer, 2, compose("comm.timeout_s=600").comm, timeout=90)
    assert "rank 1's process exited" in message and "peer rank 1 (in startup)" in message, message


def test_a_call_the_segment_cannot_take_is_refused_and_unlisted_dtypes_go_to_gloo():
    from p2prl.comm import segment, shm
    summer = shm.SharedMemorySum(mmap.mmap(-1, segment.segment_bytes(1)), 0, 1)
    try:
        with pytest.raises(ValueError, match="at most 1048576 bytes"):
            summer.publish(torch.ones(SLOT_BYTES // 4 + 1), timeout_s=1)
        assert summer.calls == 0  # nothing announced
        x = torch.arange(6, dtype=torch.int32)
        summer.finish(summer.publish(x.clone(), timeout_s=1))
        assert summer.calls == 1
    finally:
        summer.close()
    # A dtype without a code cannot be checked between peers, so it never enters the segment.
    for dtype in (torch.uint32, torch.float8_e5m2):
        t = torch.zeros(4, dtype=dtype)
        assert not shm.SharedMemorySum.takes(t) and not shm.SharedMemorySum.fits(t)
    assert shm.SharedMemorySum.fits(torch.zeros(4, dtype=torch.bfloat16))
