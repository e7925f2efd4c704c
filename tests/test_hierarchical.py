"""Hierarchical sums (node, then the nodes' leaders, then node) on 4 real peers in 2 pretend nodes:
the same bytes on every peer, exactly the flat sum where float addition is exact, through shared
memory or through the nodes' own gloo groups; and the topology comm.topology=auto chooses."""
import dataclasses

import pytest
import torch

from p2prl.comm import open_comm, parameter_digest
from p2prl.comm.hierarchical import HierarchicalComm, Layout
from p2prl.comm.segment import supported
from p2prl.runner import build_algorithm

pytestmark = pytest.mark.timeout(120)


def _inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"exact": torch.randint(-1000, 1000, (3000,), generator=g).float() / 8,  # sums of these are exact
            "exact64": torch.randint(-2 ** 40, 2 ** 40, (7,), generator=g, dtype=torch.int64),
            "random": torch.randn(5000, generator=g), "random64": torch.randn(9, generator=g, dtype=torch.float64),
            "large": torch.randn(300_000, generator=g)}  # beyond a shared-memory slot


def _sums(rank: int, cfg, shared: bool, steps: int):
    flat = open_comm(dataclasses.replace(cfg, topology="flat"), "gloo")
    hier = open_comm(cfg, "gloo", cores=[rank] if shared else None)
    assert isinstance(hier, HierarchicalComm) and (hier.node_shared is not None) == shared
    out = []
    for step in range(steps):
        for key, x in _inputs(rank, step).items():
            a, b = x.clone(), x.clone()
            flat.all_reduce_sum(a)
            hier.all_reduce_sum(b)
            out.append((key, a, b))
    return out, hier.layout


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "gloo-groups"])
def test_hierarchical_sums_are_identical_everywhere_and_exact_like_flat(shared, compose, peers):
    if shared and not supported():
        pytest.skip("shared-memory sums need x86-64 and memfd_create")
    cfg = compose("comm.timeout_s=30", "comm.topology=auto").comm
    results = peers(_sums, 4, cfg, shared, 5, per_node=2)
    assert results[0][1] == Layout(((0, 1), (2, 3)))
    reference = results[0][0]
    for rank_out, _ in results:
        for (key, flat, hier), (_, _, hier0) in zip(rank_out, reference):
            assert torch.equal(hier, hier0), f"{key}: peers differ"  # the same bytes on every peer
            if key.startswith("exact"):
                assert torch.equal(hier, flat), key
            else:
                torch.testing.assert_close(hier, flat)


def _which(rank: int, cfg):
    comm = open_comm(cfg, "gloo")
    return type(comm).__name__


@pytest.mark.parametrize("topology, per_node, expected", [
    ("auto", 2, "HierarchicalComm"),    # 2 nodes of 2 peers
    ("auto", 1, "ProcessGroupComm"),    # 4 nodes of 1 peer: nothing to sum inside a node
    ("auto", 0, "ProcessGroupComm"),    # one node
    ("flat", 2, "ProcessGroupComm"),
    ("hierarchical", 1, "HierarchicalComm"),
])
def test_topology_auto_is_hierarchical_only_with_several_nodes_of_several_peers(topology, per_node, expected,
                                                                                 compose, peers):
    cfg = compose("comm.timeout_s=30", f"comm.topology={topology}").comm
    # Four spawned peers each import torch and open gloo: on 2 busy cores that alone can take a minute.
    assert peers(_which, 4, cfg, per_node=per_node, timeout=120) == [expected] * 4


def _train(rank: int, cfg):
    comm = open_comm(cfg.comm, "gloo", cores=[rank])
    algo = build_algorithm(cfg, comm)
    for i in range(3):
        algo.sample(i / 3)
        algo.learn(i / 3)
    return parameter_digest(list(algo.model.parameters())), algo.learner.updates, type(comm).__name__


def test_ppo_on_two_nodes_of_two_peers_keeps_identical_parameters(compose, peers):
    cfg = compose("algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
                  "comm.timeout_s=30")
    out = peers(_train, 4, cfg, per_node=2, timeout=90)
    assert {o[2] for o in out} == {"HierarchicalComm"} and {o[1] for o in out} == {3 * 4}
    assert len({o[0] for o in out}) == 1, "parameters differ between peers"
