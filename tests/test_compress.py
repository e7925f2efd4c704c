"""Compressed sums (`comm.compress`: bf16, int8, lowrank): error feedback drives the accumulated error
to zero on a constant gradient; every peer gets the same bytes; the terms and flag stay exact; only the
network hop is compressed (shared memory stays exact, a hierarchical layout compresses the leaders' sum
alone); a NaN is skipped alike and forgotten; local SGD's compressed average keeps peers identical; a
learner's residual and warm start survive a checkpoint round trip."""
import dataclasses

import pytest
import torch

from p2prl.comm import open_comm
from p2prl.comm.hop import LocalHop
from p2prl.comm.segment import supported
from p2prl.sync.compress import make_compression
from p2prl.sync.int8 import CHUNK, Int8
from p2prl.sync.learner import Learner
from p2prl.sync.lowrank import orthogonalize, outer_sum
from p2prl.sync.optim import FlatSGD

pytestmark = pytest.mark.timeout(120)
TAIL = 3  # named terms and a flag, as a learner's bucket ends


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # 64x48 and 48x40 matrices (compressed by lowrank), biases and a small head
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 2))


def _params() -> list:
    return list(_model().parameters())


def _n(params) -> int:
    return sum(p.numel() for p in params)


def _message(rank: int, n: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n + TAIL, generator=g)
    x[n:] = torch.tensor([0.5 + rank, 2.0 ** -20 * (rank + 1), 0.0])  # terms whose float sums are exact
    return x


@pytest.mark.parametrize("form", ["int8", "lowrank"])
def test_error_feedback_drives_the_accumulated_error_to_zero_on_a_constant_gradient(form, compose):
    cfg = compose(f"comm.compress={form}").comm
    params = _params()
    n = _n(params)
    g = _message(0, n)
    c = make_compression(cfg, params, TAIL, g)
    sent, errors, residuals = torch.zeros_like(g), {}, {}
    for t in range(1, 801):
        x = g.clone()
        c.sum(LocalHop(), x)
        assert torch.equal(x[n:], g[n:]), "the tail must travel exact"
        sent += x
        # error feedback loses nothing: what was sent plus what is still held back is every true gradient
        torch.testing.assert_close(sent[:n] + c.residual, t * g[:n], rtol=1e-5, atol=1e-5 * t)
        if t in (1, 200, 400, 800):
            errors[t] = float((sent[:n] / t - g[:n]).norm() / g[:n].norm())
            residuals[t] = float(c.residual.norm())
    assert errors[1] > 1e-3, "the first message must lose something, or nothing is compressed"
    # sent / t = g - residual / t: a bounded residual, so the mean error halves as t doubles
    assert residuals[800] <= 1.2 * max(residuals[200], residuals[400])
    assert errors[800] < 0.6 * errors[400] < 0.36 * errors[200]
    assert errors[800] < errors[1] / 10 and errors[800] < 0.05


def test_int8_codes_and_scales_by_hand(compose):
    c = Int8(make_compression(compose().comm, [torch.nn.Parameter(torch.zeros(CHUNK + 2))], 0,
                              torch.zeros(1)).layout, compose().comm, torch.zeros(1))
    values = torch.zeros(2 * CHUNK)
    values[:4] = torch.tensor([1.0, -0.5, 0.25, 0.004])
    values[CHUNK:CHUNK + 2] = torch.tensor([-3.0, 1.0])
    codes, scales = c.encode(values)
    torch.testing.assert_close(scales, torch.tensor([1 / 127, 3 / 127]))
    assert codes[0, :4].tolist() == [127, -64, 32, 1] and codes[1, :2].tolist() == [-127, 42]  # round half to even
    assert not codes[0, 4:].any() and not codes[1, 2:].any()


def test_int8_sum_of_one_member_by_hand(compose):
    cfg = compose("comm.compress=int8").comm
    c = make_compression(cfg, [torch.nn.Parameter(torch.zeros(4))], 1, torch.zeros(1))
    x = torch.tensor([1.0, -0.5, 0.25, 0.004, 7.0])  # four values, then the exact tail
    c.sum(LocalHop(), x)
    decoded = torch.tensor([127.0, -64.0, 32.0, 1.0]) * (1.0 / 127)  # scale: absmax / 127
    torch.testing.assert_close(x, torch.cat([decoded, torch.tensor([7.0])]))
    torch.testing.assert_close(c.residual, torch.tensor([1.0, -0.5, 0.25, 0.004]) - decoded)
    x = torch.tensor([1.0, -0.5, 0.25, 0.004, 7.0])  # the next message carries what the first lost
    c.sum(LocalHop(), x)
    want = c.decode(*c.encode(torch.nn.functional.pad(torch.tensor([1.0, -0.5, 0.25, 0.004]) + (
        torch.tensor([1.0, -0.5, 0.25, 0.004]) - decoded), (0, CHUNK - 4)))).view(-1)[:4]
    torch.testing.assert_close(x[:4], want)


def test_low_rank_of_an_exactly_rank_r_matrix_is_exact(compose):
    cfg = compose("comm.compress=lowrank", "comm.compress_rank=2").comm
    params = [torch.nn.Parameter(torch.zeros(64, 48)), torch.nn.Parameter(torch.zeros(48)),
              torch.nn.Parameter(torch.zeros(()))]  # a matrix, a bias, a 0-d parameter
    g = torch.Generator().manual_seed(3)
    m = torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g)  # rank 2
    x = torch.cat([m.reshape(-1), torch.randn(49, generator=g), torch.tensor([0.5, 1.0, 0.0])])
    want = x.clone()
    c = make_compression(cfg, params, TAIL, x)
    assert [(n, k, r) for _, n, k, r in c.matrices] == [(64, 48, 2)], "only the matrix is factored"
    c.sum(LocalHop(), x)
    torch.testing.assert_close(x[:m.numel()], want[:m.numel()], rtol=0, atol=1e-5)
    assert torch.equal(x[m.numel():], want[m.numel():]), "bias, 0-d parameter and tail travel exact"
    assert float(c.residual.norm()) < 1e-5 * float(m.norm()), "a rank-2 matrix loses nothing at rank 2"


def test_low_rank_pieces_by_hand():
    a = torch.tensor([[[3.0, 1.0], [4.0, 2.0], [0.0, 5.0]], [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    assert orthogonalize(a)  # both matrices at once
    torch.testing.assert_close(a[0].t() @ a[0], torch.eye(2))
    torch.testing.assert_close(a[0, :, 0], torch.tensor([0.6, 0.8, 0.0]))
    torch.testing.assert_close(a[1], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    zero = torch.zeros(1, 3, 2)
    assert not orthogonalize(zero) and not zero.any()  # no direction left: zeros, no NaN
    p, q = torch.randn(5, 3), torch.randn(4, 3)
    torch.testing.assert_close(outer_sum(p, q, torch.empty(5, 4), torch.empty(5, 4)), p @ q.t())


def _sums(rank: int, cfg, form: str, steps: int, pinned: bool = False):
    comm = open_comm(cfg, "gloo", cores=[rank] if pinned else None)  # pinned peers of one node: shared memory
    params = _params()
    n = _n(params)
    c = make_compression(dataclasses.replace(cfg, compress=form), params, TAIL, torch.zeros(1))
    out = []
    for step in range(steps):
        x = _message(rank, n, step)
        comm.all_reduce_sum_across(x, c.sum)
        out.append(x)
    return out, comm.bytes


@pytest.mark.parametrize("form", ["bf16", "int8", "lowrank"])
def test_compressed_sums_are_identical_on_every_peer_and_keep_the_tail_exact(form, compose, peers):
    cfg = compose("comm.timeout_s=30").comm
    results = peers(_sums, 3, cfg, form, 3)
    n = _n(_params())
    for step in range(3):
        got = [r[0][step] for r in results]
        assert all(torch.equal(got[0], g) for g in got[1:]), f"step {step}: peers differ"
        exact = sum(_message(r, n, step) for r in range(3))
        assert torch.equal(got[0][n:], exact[n:]), "terms and flag must stay exact"
        assert not torch.equal(got[0][:n], exact[:n]), "the gradient part must have been compressed"
        torch.testing.assert_close(got[0][:n], exact[:n], rtol=0, atol={"bf16": 0.05, "int8": 0.2, "lowrank": 10.0}[form])
    if form == "int8":  # each peer's codes, decoded and added in rank order
        want = torch.zeros(n)
        for r in range(3):
            x = _message(r, n, 0)[:n]
            c = make_compression(dataclasses.replace(cfg, compress="int8"), _params(), 0, x)
            padded = torch.zeros(c.chunks * CHUNK)
            padded[:n] = x
            want += c.decode(*c.encode(padded)).view(-1)[:n]
        assert torch.equal(results[0][0][0][:n], want)
    full = (n + TAIL) * 4
    assert results[0][1] < {"bf16": 0.6, "int8": 0.3, "lowrank": 0.3}[form] * 3 * full  # bytes handed to the hop


def _hier(rank: int, cfg, shared: bool):
    comm = open_comm(cfg, "gloo", cores=[rank] if shared else None)
    n = _n(_params())
    c = make_compression(dataclasses.replace(cfg, compress="int8"), _params(), TAIL, torch.zeros(1))
    x = _message(rank, n)
    comm.all_reduce_sum_across(x, c.sum)
    return x, type(comm).__name__


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "gloo-groups"])
def test_hierarchical_layout_compresses_only_the_leaders_sum(shared, compose, peers):
    if shared and not supported():
        pytest.skip("shared-memory sums need x86-64 and memfd_create")
    cfg = compose("comm.timeout_s=30", "comm.topology=hierarchical").comm
    out = peers(_hier, 4, cfg, shared, per_node=2)
    assert {o[1] for o in out} == {"HierarchicalComm"}
    assert all(torch.equal(out[0][0], o[0]) for o in out[1:]), "peers differ"
    n = _n(_params())
    c = make_compression(dataclasses.replace(cfg, compress="int8"), _params(), 0, torch.zeros(1))
    want = torch.zeros(n)
    for node in ((0, 1), (2, 3)):  # each node's exact sum, compressed once by its leader
        padded = torch.zeros(c.chunks * CHUNK)
        padded[:n] = _message(node[0], n)[:n] + _message(node[1], n)[:n]
        want += c.decode(*c.encode(padded)).view(-1)[:n]
    assert torch.equal(out[0][0][:n], want)


def test_one_node_sums_through_shared_memory_stay_exact(compose, peers):
    if not supported():
        pytest.skip("shared-memory sums need x86-64 and memfd_create")
    cfg = compose("comm.timeout_s=30").comm
    exact = sum(_message(r, _n(_params())) for r in range(2))
    pinned = [out[0] for out, _ in peers(_sums, 2, cfg, "int8", 1, True)]
    assert all(torch.equal(x, exact) for x in pinned), "a shared-memory sum crosses no link: no compression"
    unpinned = [out[0] for out, _ in peers(_sums, 2, cfg, "int8", 1, False)]
    assert torch.equal(unpinned[0], unpinned[1]) and not torch.equal(unpinned[0], exact)  # gloo: compressed


def _learner(comm, cfg):
    model = _model()
    return model, Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=0.05), comm, None, ("loss",), sync=cfg)


def _data(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    while True:
        yield torch.randn(16, 48, generator=g), torch.randn(16, 2, generator=g)


def _step(model, learner, batch, nan: bool = False) -> None:
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    if nan:
        loss = loss * float("nan")
    learner.step(loss, {"loss": loss.detach()})


def _train(rank: int, cfg, steps: int, nan_at: int = -1):
    comm = open_comm(cfg, "gloo")
    model, learner = _learner(comm, cfg)
    data, out = _data(rank), []
    for i in range(steps):
        _step(model, learner, next(data), nan=i == nan_at and rank == 1)
        out.append(learner.bucket.flat_param.detach().clone())
    return out, learner.updates, learner.skipped, float(learner.strategy.logs().get("consensus_distance", 0.0))


@pytest.mark.parametrize("form", ["int8", "lowrank"])
def test_a_nan_is_skipped_by_every_peer_and_forgotten(form, compose, peers):
    cfg = compose("comm.timeout_s=30", f"comm.compress={form}").comm
    (p0, u0, s0, _), (p1, u1, s1, _) = peers(_train, 2, cfg, 6, 2)
    assert (u0, s0) == (u1, s1) == (5, 1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "peers differ"
    assert torch.equal(p0[1], p0[2]), "the NaN update must be skipped"
    assert torch.isfinite(p0[-1]).all() and not torch.equal(p0[-1], p0[2]), "later updates apply again"


@pytest.mark.parametrize("form", ["int8", "lowrank"])
def test_local_sgd_compressed_average_leaves_every_peer_the_same_parameters(form, compose, peers):
    cfg = dataclasses.replace(compose("comm=local_sgd", "comm.timeout_s=30", f"comm.compress={form}").comm,
                              average_every=2)
    (p0, *_), (p1, *_) = peers(_train, 2, cfg, 4)
    assert not torch.equal(p0[0], p1[0]), "between averages each peer steps alone"
    assert torch.equal(p0[1], p1[1]) and torch.equal(p0[3], p1[3]), "after an average: identical"
    exact = peers(_train, 2, dataclasses.replace(cfg, compress="none"), 4)[0][0]
    torch.testing.assert_close(p0[1], exact[1], rtol=0, atol=1e-2)  # close to the exact average
    assert not torch.equal(p0[1], exact[1])


def _resumed(rank: int, cfg, keep_rank_state: bool):
    comm = open_comm(cfg, "gloo")
    model, learner = _learner(comm, cfg)
    data = _data(rank)
    for _ in range(6):
        _step(model, learner, next(data))
    straight = learner.bucket.flat_param.detach().clone()
    model, learner = _learner(comm, cfg)
    data = _data(rank)
    for _ in range(3):
        _step(model, learner, next(data))
    shared, own = learner.state_dict(), learner.rank_state_dict()
    params = learner.bucket.flat_param.detach().clone()
    model, learner = _learner(comm, cfg)  # a fresh process's learner, loaded as a resume loads it
    with torch.no_grad():
        learner.bucket.flat_param.copy_(params)
    learner.load_state_dict(shared)
    if keep_rank_state:
        learner.load_rank_state_dict(own)
    for _ in range(3):
        _step(model, learner, next(data))
    return straight, learner.bucket.flat_param.detach().clone(), sorted(own.get("strategy", {}))


@pytest.mark.parametrize("form", ["int8", "lowrank"])
def test_a_resume_with_the_saved_residual_and_warm_start_continues_exactly(form, compose, peers):
    cfg = compose("comm.timeout_s=30", f"comm.compress={form}").comm
    out = peers(_resumed, 2, cfg, True)
    assert all(torch.equal(straight, resumed) for straight, resumed, _ in out)
    assert out[0][2] == ["form", "residual"]  # each rank's own file holds its residual
    lost = peers(_resumed, 2, cfg, False)
    assert not torch.equal(lost[0][0], lost[0][1]), "without the residual the run would not continue exactly"
