"""Real 2-peer gloo runs: identical parameters, averaged gradients, 2 peers == 1 peer, exploration."""
import dataclasses

import pytest
import torch

from p2prl.comm import LocalComm, open_comm, parameter_digest
from p2prl.comm.segment import supported
from p2prl.metrics import ReturnWindow
from p2prl.runner import build_algorithm
from p2prl.sync.bucket import GradientBucket

pytestmark = pytest.mark.timeout(120)
SMALL = ("seed=3", "algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
         "algo.lr=1e-3", "comm.timeout_s=30")


def _train_iterations(rank: int, cfg, iterations: int, shared: bool):
    comm = open_comm(cfg.comm, "gloo", cores=[rank] if shared else None)
    assert (getattr(comm, "shared", None) is not None) == shared
    algo = build_algorithm(cfg, comm)
    initial = parameter_digest(list(algo.model.parameters()))
    episodes = []
    first_obs = torch.as_tensor(algo.collector.obs).clone()
    for i in range(iterations):
        algo.sample(i / iterations)
        episodes += [(e.ret, e.length) for e in algo.collector.take().episodes]
        algo.learn(i / iterations)
    params = list(algo.model.parameters())
    return {"initial": initial, "final": parameter_digest(params), "first_obs": first_obs,
            "episodes": episodes, "obs_mean": algo.obs_norm.mean.clone(), "updates": algo.learner.updates}


@pytest.mark.parametrize("shared", [False, True], ids=["gloo", "shared-memory"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_parameters_bit_identical_and_peers_explore_differently(overlap, shared, compose, peers):
    if shared and not supported():
        pytest.skip("shared-memory sums need x86-64 and memfd_create")
    cfg = compose(*SMALL, "algo.norm_obs=true", f"comm.overlap={str(overlap).lower()}")
    a, b = peers(_train_iterations, 2, cfg, 4, shared)
    per_iteration = cfg.algo.update_epochs * cfg.algo.num_minibatches
    assert a["updates"] == b["updates"] == 4 * per_iteration
    assert a["initial"] == b["initial"]
    assert a["final"] == b["final"], "parameters diverged between peers"
    assert a["final"] != a["initial"], "no update changed the parameters"
    assert torch.equal(a["obs_mean"], b["obs_mean"]), "observation normalizers diverged"
    # Different env seeds per rank: different start states and different episodes.
    assert not torch.equal(a["first_obs"], b["first_obs"])
    assert a["episodes"] != b["episodes"]


def _grads(rank: int, comm_cfg):
    comm = open_comm(comm_cfg, "gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(100 + rank))
    loss = (model(x) ** 2).mean()
    local = torch.autograd.grad(loss, list(model.parameters()))
    bucket = GradientBucket(comm, model.parameters(), n_extras=1)
    bucket.zero_grad()
    (model(x) ** 2).mean().backward()
    bucket.extras[0] = float(rank + 1)
    extras = bucket.sync().clone()
    return [g.clone() for g in local], [p.grad.clone() for p in bucket.params], extras


def test_averaged_gradient_is_mean_of_peer_gradients(compose, peers):
    (l0, s0, e0), (l1, s1, e1) = peers(_grads, 2, compose("comm.timeout_s=30").comm)
    for g0, g1, a, b in zip(l0, l1, s0, s1):
        assert torch.equal(a, b)
        assert torch.allclose(a, (g0 + g1) / 2, atol=1e-7)
        assert not torch.allclose(g0, g1)
    assert e0.item() == e1.item() == 1.5


def _fixed_rollout(cfg):
    """A fixed batch of CartPole transitions with episode ends, from a world of one."""
    algo = build_algorithm(cfg, LocalComm())
    algo.sample(0.0)
    r = algo.rollout
    assert r.dones.any() and not r.valid.all()
    return ({k: v.clone() for k, v in r._asdict().items()}, torch.as_tensor(algo.collector.obs).clone(),
            {k: v.clone() for k, v in algo.model.state_dict().items()})


def _update_on(cfg, rollout: dict, next_obs, state, env_slice, comm):
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, num_envs=env_slice.stop - env_slice.start))
    algo = build_algorithm(cfg, comm)
    algo.model.load_state_dict(state)
    for k, v in rollout.items():
        getattr(algo.rollout, k).copy_(v[:, env_slice])
    algo.collector.obs, algo.collector.length = next_obs[env_slice].numpy().copy(), cfg.algo.num_steps
    algo.learn(progress=0.0)
    return torch.cat([p.detach().reshape(-1) for p in algo.model.parameters()])


def _half_update(rank: int, cfg, rollout, next_obs, state):
    comm = open_comm(cfg.comm, "gloo")
    return _update_on(cfg, rollout, next_obs, state, slice(2 * rank, 2 * rank + 2), comm)


def test_two_peers_with_half_the_batch_equal_one_peer_with_all(compose, peers):
    cfg = compose(*SMALL, "algo.num_envs=4", "algo.num_steps=64", "algo.num_minibatches=1",
                  "algo.update_epochs=1", "algo.max_grad_norm=0.5")
    rollout, next_obs, state = _fixed_rollout(cfg)
    whole = _update_on(cfg, rollout, next_obs, state, slice(0, 4), LocalComm())
    before = torch.cat([v.reshape(-1) for v in state.values()])
    a, b = peers(_half_update, 2, cfg, rollout, next_obs, state)
    assert torch.equal(a, b)
    assert (whole - before).abs().max() > 1e-4, "the update did not move the parameters"
    assert torch.allclose(a, whole, atol=1e-5), (a - whole).abs().max()


def _windows(rank: int, cfg):
    comm = open_comm(cfg.comm, "gloo")
    algo = build_algorithm(cfg, comm)
    carried, separate = ReturnWindow(5), ReturnWindow(5)
    step, calls = 0, []
    for i in range(4):
        algo.sample(i / 4)
        sample = algo.collector.take()
        table = carried.local_table(comm.rank, comm.world_size, step, algo.collector.num_envs, sample.episodes,
                                    sample.steps)
        alone = table.clone()
        before = comm.calls
        comm.sum_with_next(table)
        algo.learn(i / 4)
        comm.settle()
        calls.append(comm.calls - before)
        carried.merge(table)
        comm.all_reduce_sum(alone)
        separate.merge(alone)
        step += sample.steps * comm.world_size
    return carried.items, separate.items, carried.episodes, calls


def test_return_window_rides_in_the_algorithms_first_collective(compose, peers):
    cfg = compose(*SMALL, "algo.num_envs=4", "algo.num_steps=32")
    a, b = peers(_windows, 2, cfg)
    assert a[2] > 5  # episodes finished: the window is full
    assert a[0] == a[1] == b[0] == b[1]  # same window on both peers, however it was summed
    # PPO's statistics collective carried it: one sum for the statistics and the window, one per update.
    assert a[3] == [1 + cfg.algo.update_epochs * cfg.algo.num_minibatches] * 4
