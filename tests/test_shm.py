"""Sums through shared memory (peers on one node, each pinned): exact, identical on every peer, and a
missing or dead peer still ends the collective with its rank named."""
import time
from datetime import timedelta

import pytest
import torch

from peers import run_peers
from p2prl.comm import PeerFailure, open_comm
from p2prl.comm.shm import SLOT_BYTES, supported
from p2prl.comm.store import connect
from p2prl.config import CommConfig

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not supported(), reason="shared-memory sums need x86-64 and /dev/shm")]


def _inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"grad": torch.randn(5000, generator=g),  # a float32 gradient bucket
            "moments": torch.randn(7, generator=g, dtype=torch.float64),
            "digest": torch.randint(0, 2 ** 40, (3,), generator=g, dtype=torch.int64),
            "large": torch.randn(SLOT_BYTES // 4 + 1, generator=g)}  # too large for a slot: gloo


def _reference(world: int, step: int, key: str) -> torch.Tensor:
    """The sum in rank order, as every peer must compute it."""
    total = _inputs(0, step)[key].clone()
    for r in range(1, world):
        total += _inputs(r, step)[key]
    return total


def _sums(rank: int, world: int, steps: int):
    comm = open_comm(CommConfig(timeout_s=30), spin=True)
    assert comm.shared is not None, "peers on one node that spin did not map the shared segment"
    results = []
    for step in range(steps):
        x = _inputs(rank, step)
        pending = comm.all_reduce_mean_async(x["grad"])  # published now, summed at wait()
        results.append(pending.wait().clone())
        for key in ("moments", "digest", "large"):
            results.append(comm.all_reduce_sum(x[key]).clone())
        for key, got in zip(("grad", "moments", "digest", "large"), results[-4:]):
            want = _reference(world, step, key)
            if key == "grad":
                want /= world
            if key == "large":  # gloo adds in its own order
                torch.testing.assert_close(got, want)
            else:
                assert torch.equal(got, want), (key, step)
    return [t.view(torch.uint8).clone() for t in results], comm.shared.calls


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_sums_are_exact_and_identical_on_every_peer(world):
    outs = run_peers(_sums, world, world, 40)
    calls = {c for _, c in outs}
    assert calls == {40 * 3}, calls  # grad, moments and digest went through memory; "large" did not
    for got, _ in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0][0], got))


def _background_then_blocking(rank: int, rounds: int):
    comm = open_comm(CommConfig(timeout_s=30), spin=True)
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


def test_blocking_sums_while_a_background_sum_is_pending_keep_every_call_apart():
    assert run_peers(_background_then_blocking, 2, 200) == [600, 600]


def _reopen_and_disagree(rank: int):
    first = open_comm(CommConfig(timeout_s=30), spin=True)
    first.all_reduce_sum(torch.ones(3))
    again = open_comm(CommConfig(timeout_s=30), spin=True)  # a multirun's next job: the same segment
    assert again.shared is first.shared and again.shared.calls == 1
    again.all_reduce_sum(torch.ones(3))
    # One peer not pinned: nobody may sum through memory, or the pinned one would wait there forever.
    mixed = open_comm(CommConfig(timeout_s=30), spin=rank == 0)
    assert mixed.shared is None
    t = torch.full((5,), float(rank + 1))
    mixed.all_reduce_sum(t)
    assert torch.equal(t, torch.full((5,), 3.0))
    return again.shared.calls


def test_the_segment_serves_later_jobs_and_is_used_only_when_every_peer_is_pinned():
    assert run_peers(_reopen_and_disagree, 2) == [2, 2]


def _absent_peer(rank: int):
    comm = open_comm(CommConfig(timeout_s=1), spin=True)
    assert comm.shared is not None
    store = connect()
    if rank == 1:  # never joins the sum; waits until rank 0 gave up
        store.wait(["p2prl-test/gave-up"], timedelta(seconds=60))
        return None
    t0 = time.monotonic()
    try:
        comm.all_reduce_sum(torch.ones(4))
    except PeerFailure as e:
        store.set("p2prl-test/gave-up", "1")
        return str(e), time.monotonic() - t0
    store.set("p2prl-test/gave-up", "1")
    return None


def test_a_peer_that_never_arrives_ends_the_sum_after_the_timeout():
    (message, seconds), _ = run_peers(_absent_peer, 2)
    assert "rank 1 did not reach" in message and "comm.timeout_s=1" in message, message
    assert 1 <= seconds < 10, seconds


def _dead_peer(rank: int):
    comm = open_comm(CommConfig(timeout_s=60), spin=True)
    assert comm.shared is not None
    if rank == 1:
        return None  # exits without joining the sum
    t0 = time.monotonic()
    with pytest.raises(PeerFailure) as e:
        comm.all_reduce_sum(torch.ones(4))
    return str(e.value), time.monotonic() - t0


def test_a_peer_whose_process_exits_is_named_without_waiting_for_the_timeout():
    (message, seconds), _ = run_peers(_dead_peer, 2)
    assert "rank 1's process exited" in message and "peer rank 1 (in startup)" in message, message
    assert seconds < 20, seconds  # far below comm.timeout_s=60
