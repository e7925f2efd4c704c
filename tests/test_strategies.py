"""The sync strategies' math on real peers: the parameter server and local SGD (averaging every update,
no outer optimizer) equal the all-reduce for plain SGD; DiLoCo's outer Nesterov step by hand; gossip
keeps the mean of the parameters and follows its pairing schedule; collective decisions stay shared."""
import dataclasses

import pytest
import torch

from p2prl.comm import open_comm
from p2prl.sync.gossip import partner
from p2prl.sync.learner import Learner
from p2prl.sync.optim import FlatSGD

pytestmark = pytest.mark.timeout(120)
LR = 0.1


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _sgd_steps(rank: int, cfg, steps: int, nan_at: int = -1, veto=None):
    """`steps` plain-SGD updates of a small model on this rank's own data; the parameters after each,
    the updates applied here, the skipped count, the streak, the mean loss (take_means, at the end) and
    the collectives made by the updates alone."""
    comm = open_comm(cfg, "gloo", cores=None)
    model = _model()
    learner = Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=LR), comm, None, ("loss",), sync=cfg)
    g = torch.Generator().manual_seed(10 + rank)
    out, calls = [], 0
    for i in range(steps):
        x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        if i == nan_at and rank == 1:
            loss = loss * float("nan")
        before = comm.calls
        learner.step(loss, {"loss": loss.detach()}, veto)
        learner.finish()
        calls += comm.calls - before
        out.append(learner.bucket.flat_param.detach().clone())
    means = learner.take_means()
    return out, learner.updates, learner.skipped, learner.skipped_in_a_row, means.get("loss"), calls, learner.attempts


@pytest.mark.parametrize("strategy", ["param_server", "local_sgd"])
def test_equals_allreduce_for_plain_sgd(strategy, compose, peers):
    base = compose("comm.timeout_s=30").comm
    ref = peers(_sgd_steps, 2, base, 5)
    cfg = dataclasses.replace(compose(f"comm={strategy}", "comm.timeout_s=30").comm, average_every=1)
    got = peers(_sgd_steps, 2, cfg, 5)
    moved = (ref[0][0][-1] - ref[0][0][0]).abs().max()
    assert moved > 1e-3
    for step in range(5):
        assert torch.equal(got[0][0][step], got[1][0][step]), "peers differ"
        torch.testing.assert_close(got[0][0][step], ref[0][0][step], rtol=1e-6, atol=1e-7)


def _never(terms) -> bool:
    """A veto that refuses nothing: it only asks for the terms to be shared before each update."""
    return False


@pytest.mark.parametrize("strategy", ["param_server", "local_sgd", "gossip"])
def test_a_nan_on_one_peer_is_skipped_by_every_peer_where_a_veto_shares_the_terms(strategy, compose, peers):
    cfg = compose(f"comm={strategy}", "comm.timeout_s=30").comm
    (_, u0, s0, *_), (_, u1, s1, *_) = peers(_sgd_steps, 2, cfg, 4, 2, _never)
    assert (u0, s0) == (u1, s1) == (3, 1)


@pytest.mark.parametrize("strategy", ["local_sgd", "gossip"])
def test_without_a_veto_peers_that_step_alone_skip_their_own_nan_and_share_terms_once(strategy, compose, peers):
    """No collective per update but the strategy's own (local SGD averaging every 5th: none in 4);
    the NaN peer skips alone; take_means() agrees on the skips and averages the terms over the peers."""
    cfg = dataclasses.replace(compose(f"comm={strategy}", "comm.timeout_s=30").comm, average_every=5)
    (p0, u0, s0, r0, m0, c0, a0), (p1, u1, s1, r1, m1, c1, a1) = peers(_sgd_steps, 2, cfg, 4, 2)
    assert (u0, u1) == (4, 3), "only the peer whose gradient was NaN skips it"
    assert a0 == a1 == 4, "finished updates stay the same count on every peer (DQN's target copies)"
    assert (s0, s1) == (1, 1) and (r0, r1) == (0, 0), "agreed after take_means"
    if strategy == "local_sgd":  # (gossip mixes the parameters after every update)
        assert torch.equal(p1[1], p1[2]) and not torch.equal(p0[1], p0[2])
    assert c0 == c1 == (0 if strategy == "local_sgd" else 4), "local_sgd: no collective in 4 updates"
    assert m0 == m1 and m0 > 0, "the mean over both peers' 7 applied updates, the same on every peer"


def test_a_streak_of_skips_on_one_peer_is_every_peers_streak(compose, peers):
    cfg = dataclasses.replace(compose("comm=local_sgd", "comm.timeout_s=30").comm, average_every=100)
    (_, u0, s0, r0, *_), (_, u1, s1, r1, *_) = peers(_sgd_streak, 2, cfg)
    assert (u0, u1) == (4, 1) and (s0, s1) == (3, 3) and (r0, r1) == (3, 3)


def _sgd_streak(rank: int, cfg):
    """Rank 1's last three losses are NaN."""
    comm = open_comm(cfg, "gloo", cores=None)
    model = _model()
    learner = Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=LR), comm, None, ("loss",), sync=cfg)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for i in range(4):
        loss = ((model(x) - y) ** 2).mean()
        learner.step(loss * float("nan") if rank == 1 and i > 0 else loss, {"loss": loss.detach()})
    learner.take_means()
    return None, learner.updates, learner.skipped, learner.skipped_in_a_row


def _gossip_once(rank: int, cfg):
    comm = open_comm(cfg, "gloo")
    torch.manual_seed(100 + rank)  # a different model on every peer
    model = torch.nn.Linear(5, 3)
    learner = Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=LR), comm, None, ("loss",), sync=cfg)
    with torch.no_grad():  # undo the start-up broadcast: the peers' parameters differ, as mid-run
        learner.bucket.flat_param.normal_(generator=torch.Generator().manual_seed(rank))
    before = learner.bucket.flat_param.detach().clone()
    learner.strategy.mix(t=0)
    after = learner.bucket.flat_param.detach().clone()
    distance = learner.strategy.logs()["consensus_distance"]
    return before, after, distance


def test_gossip_keeps_the_mean_of_the_parameters(compose, peers):
    cfg = compose("comm=gossip", "comm.timeout_s=30").comm
    out = peers(_gossip_once, 4, cfg)
    before, after = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    torch.testing.assert_close(after.mean(0), before.mean(0), rtol=0, atol=1e-6)
    # t = 0 pairs (0, 1) and (2, 3): each pair holds the same bytes, its two peers' mean
    assert torch.equal(after[0], after[1]) and torch.equal(after[2], after[3]) and not torch.equal(after[1], after[2])
    torch.testing.assert_close(after[0], (before[0] + before[1]) / 2)
    mean = after.mean(0)
    want = float(((after - mean) ** 2).sum(1).mean()) ** 0.5
    assert all(o[2] == pytest.approx(want, rel=1e-5) for o in out)


@pytest.mark.parametrize("world, t, graph, expected", [
    (4, 0, "ring", [1, 0, 3, 2]),
    (4, 1, "ring", [3, 2, 1, 0]),         # the odd edges: 1-2, 3-0
    (3, 0, "ring", [1, 0, None]),         # an odd ring: one peer sits out
    (3, 1, "ring", [None, 2, 1]),
    (2, 7, "ring", [1, 0]),
    (4, 0, "hypercube", [1, 0, 3, 2]),
    (4, 1, "hypercube", [2, 3, 0, 1]),
    (8, 2, "hypercube", [4, 5, 6, 7, 0, 1, 2, 3]),
])
def test_gossip_partners(world, t, graph, expected):
    got = [partner(r, world, t, graph) for r in range(world)]
    assert got == expected
    assert all(p is None or got[p] == r for r, p in enumerate(got))  # pairs are mutual


def _diloco(rank: int, cfg):
    comm = open_comm(cfg, "gloo")
    model = torch.nn.Linear(2, 1, bias=False)
    learner = Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=LR), comm, None, ("loss",), sync=cfg)
    s = learner.strategy
    with torch.no_grad():
        s.anchor.copy_(torch.tensor([1.0, 2.0]))
        learner.bucket.flat_param.copy_(torch.tensor([0.0, 1.0]) if rank == 0 else torch.tensor([0.5, 2.0]))
    s.sync()
    first = learner.bucket.flat_param.detach().clone()
    with torch.no_grad():
        learner.bucket.flat_param.copy_(first - torch.tensor([0.2, 0.4]))  # both peers move alike
    s.sync()
    return first, learner.bucket.flat_param.detach().clone()


def test_diloco_outer_nesterov_step_by_hand(compose, peers):
    cfg = compose("comm=local_sgd", "comm.outer_lr=0.7", "comm.outer_momentum=0.9", "comm.timeout_s=30").comm
    (f0, s0), (f1, s1) = peers(_diloco, 2, cfg)
    lr, mu = 0.7, 0.9
    anchor, mean = torch.tensor([1.0, 2.0]), torch.tensor([0.25, 1.5])
    delta = anchor - mean                   # pseudo-gradient (0.75, 0.5)
    v = delta                               # v = mu * 0 + delta
    first = anchor - lr * (delta + mu * v)
    delta2 = first - (first - torch.tensor([0.2, 0.4]))
    v2 = mu * v + delta2
    second = first - lr * (delta2 + mu * v2)
    for f, s in ((f0, s0), (f1, s1)):
        torch.testing.assert_close(f, first)
        torch.testing.assert_close(s, second)


def _diloco_start(rank: int, cfg):
    comm = open_comm(cfg, "gloo")
    torch.manual_seed(rank)  # peers whose initial weights differ: the learner's broadcast gives all rank 0's
    model = torch.nn.Linear(3, 2)
    learner = Learner(list(model.parameters()), lambda p: FlatSGD(p, lr=LR), comm, None, ("loss",), sync=cfg)
    return learner.strategy.anchor.clone(), learner.bucket.flat_param.detach().clone()


def test_diloco_anchor_is_the_broadcast_initial_parameters(compose, peers):
    # The anchor is what the first outer step measures the peers' progress from: a peer's own initial
    # weights there would pull every peer towards them at the first average.
    cfg = compose("comm=local_sgd", "comm.outer_lr=0.7", "comm.outer_momentum=0.9", "comm.timeout_s=30").comm
    (a0, p0), (a1, p1) = peers(_diloco_start, 2, cfg)
    assert torch.equal(p0, p1)
    assert torch.equal(a0, p0) and torch.equal(a1, p1)


def _run(rank: int, cfg, run_dir):
    from p2prl.runner import run
    return run(cfg, run_dir)


def test_where_parameters_differ_rank_0_saves_their_mean_and_each_rank_its_own(tmp_path, compose, peers):
    from p2prl import checkpoint
    # 16 updates, averaged every 3: the last one leaves the peers apart.
    cfg = compose("comm=local_sgd", "comm.average_every=3", "algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2",
                  "algo.update_epochs=2", "train.total_steps=256", "train.target_return=null",
                  "train.log_every_steps=64", "comm.timeout_s=30")
    run_dir = tmp_path / "run"
    summary, _ = peers(_run, 2, cfg, run_dir)
    folder, step = run_dir / "checkpoints", summary["final_step"]
    shared = checkpoint.load(checkpoint.shared_path(folder, step))
    own = [checkpoint.load(checkpoint.rank_path(folder, r, step))["learner"]["params"] for r in range(2)]
    flat = torch.cat([t.reshape(-1) for t in shared["model"].values()])
    assert not torch.equal(own[0], own[1])
    torch.testing.assert_close(flat, (own[0] + own[1]) / 2)
    rows = [__import__("json").loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["consensus_distance"] >= 0 for r in rows) and any(r["consensus_distance"] > 0 for r in rows)


def _compressed_mean(rank: int, cfg, name: str):
    from p2prl.sync.compress import make_compression
    comm = open_comm(cfg, "gloo")
    flat = torch.tensor([1.0 + 2 ** -10, -3.0, 0.1]) * (rank + 1)  # 1 + 2^-10 needs more than bf16's 8 bits
    params = [torch.nn.Parameter(torch.zeros(2))]  # two gradient values, then one term that travels exact
    make_compression(dataclasses.replace(cfg, compress=name), params, 1, flat).mean(comm, flat)
    return flat


def test_bf16_compression_averages_the_rounded_gradients_alike_on_every_peer(compose, peers):
    cfg = compose("comm.timeout_s=30").comm
    got = peers(_compressed_mean, 2, cfg, "bf16")
    sent = [(torch.tensor([1.0 + 2 ** -10, -3.0, 0.1]) * (r + 1)) for r in range(2)]
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0][:2], (sent[0][:2].bfloat16() + sent[1][:2].bfloat16()).float() / 2)
    assert torch.equal(got[0][2:], (sent[0][2:] + sent[1][2:]) / 2)  # the term stays exact
    exact = peers(_compressed_mean, 2, cfg, "none")[0]
    assert not torch.equal(got[0], exact)  # the rounding is visible: the bytes did travel as bf16


def test_which_strategies_serve_tabular_q_learning_is_a_property_of_each(monkeypatch):
    from p2prl import algos
    from p2prl.checks import ConfigError
    from p2prl.sync import table
    from p2prl.sync.base import Strategy
    monkeypatch.setitem(table.STRATEGIES, "exact_sums", type("ExactSums", (Strategy,), {"tables": True}))
    algos.check_strategy("qlearning", "exact_sums", None)  # no list of names to extend
    with pytest.raises(ConfigError, match=r"^comm=gossip: algo=qlearning cannot .*; allowed: allreduce, exact_sums$"):
        algos.check_strategy("qlearning", "gossip", None)
    for name in table.STRATEGIES:
        algos.check_strategy("ppo", name, None)  # gradients: every strategy


def test_every_strategy_in_the_table_predicts_its_time_per_update():
    from p2prl.bench import cost
    from p2prl.sync import table
    m = {"alpha_s": 1e-4, "beta_s_per_byte": 1e-9, "alpha_shm_s": 1e-6, "beta_shm_s_per_byte": 1e-10}
    preds = cost.predictions(m, 1e6)
    assert set(table.STRATEGIES) < set(preds) and all(s > 0 for row in preds.values() for s in row)
    assert preds["hierarchical"][-1] < preds[table.DEFAULT][-1]  # 256 peers, 8 per node: fewer messages cross
