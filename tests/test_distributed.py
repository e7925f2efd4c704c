"""Real 2-peer gloo runs: identical parameters, averaged gradients, 2 peers == 1 peer, exploration."""
import numpy as np
import pytest
import torch

from peers import run_peers
from p2prl.comm import GradientAllReduce, LocalComm, open_comm
from p2prl.config import CommConfig, EnvConfig, PPOConfig, RunConfig, TrainConfig, CheckpointConfig
from p2prl.comm.peers import parameter_digest
from p2prl.comm.shm import supported
from p2prl.runner import build_algorithm

pytestmark = pytest.mark.timeout(120)


def small_run_config(**algo) -> RunConfig:
    a = dict(num_envs=2, num_steps=16, num_minibatches=2, update_epochs=2, lr=1e-3)
    a.update(algo)
    return RunConfig(seed=3, algo=PPOConfig(**a), env=EnvConfig(), train=TrainConfig(),
                     comm=CommConfig(timeout_s=30), checkpoint=CheckpointConfig())


def _train_iterations(rank: int, iterations: int, overlap: bool = False, shared: bool = False):
    cfg = small_run_config(norm_obs=True)
    cfg.comm.overlap = overlap
    comm = open_comm(cfg.comm, spin=shared)
    assert (getattr(comm, "shared", None) is not None) == shared
    algo = build_algorithm(cfg, comm)
    initial = parameter_digest(list(algo.model.parameters()))
    episodes = []
    first_obs = algo.next_obs.clone()
    for i in range(iterations):
        res = algo.iteration(progress=i / iterations)
        episodes += [(e.ret, e.length) for e in res.episodes]
    params = list(algo.model.parameters())
    return {"initial": initial, "final": parameter_digest(params), "first_obs": first_obs,
            "episodes": episodes, "obs_mean": algo.obs_norm.mean.clone(), "updates": algo.learner.updates}


@pytest.mark.parametrize("shared", [False, True], ids=["gloo", "shared-memory"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_parameters_bit_identical_and_peers_explore_differently(overlap, shared):
    if shared and not supported():
        pytest.skip("shared-memory sums need x86-64 and /dev/shm")
    a, b = run_peers(_train_iterations, 2, 4, overlap, shared)
    assert a["updates"] == b["updates"] == 4 * 2 * 2
    assert a["initial"] == b["initial"]
    assert a["final"] == b["final"], "parameters diverged between peers"
    assert a["final"] != a["initial"], "no update changed the parameters"
    assert torch.equal(a["obs_mean"], b["obs_mean"]), "observation normalizers diverged"
    # Different env seeds per rank: different start states and different episodes.
    assert not torch.equal(a["first_obs"], b["first_obs"])
    assert a["episodes"] != b["episodes"]


def _grads(rank: int):
    comm = open_comm(CommConfig(timeout_s=30))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(100 + rank))
    loss = (model(x) ** 2).mean()
    local = torch.autograd.grad(loss, list(model.parameters()))
    bucket = GradientAllReduce(comm, model.parameters(), n_extras=1)
    bucket.zero_grad()
    (model(x) ** 2).mean().backward()
    bucket.extras[0] = float(rank + 1)
    extras = bucket.sync().clone()
    return [g.clone() for g in local], [p.grad.clone() for p in bucket.params], extras


def test_averaged_gradient_is_mean_of_peer_gradients():
    (l0, s0, e0), (l1, s1, e1) = run_peers(_grads, 2)
    for g0, g1, a, b in zip(l0, l1, s0, s1):
        assert torch.equal(a, b)
        assert torch.allclose(a, (g0 + g1) / 2, atol=1e-7)
        assert not torch.allclose(g0, g1)
    assert e0.item() == e1.item() == 1.5


def _fixed_rollout(num_envs: int):
    """A fixed batch of CartPole transitions with episode ends, from a world of one."""
    cfg = small_run_config(num_envs=num_envs, num_steps=64, num_minibatches=1, update_epochs=1)
    algo = build_algorithm(cfg, LocalComm())
    r = algo.collect()
    assert r.dones.any() and not r.valid.all()
    return ({k: v.clone() for k, v in r._asdict().items()}, algo.next_obs.clone(),
            {k: v.clone() for k, v in algo.model.state_dict().items()})


def _update_on(rollout: dict, next_obs, state, env_slice, comm):
    cfg = small_run_config(num_envs=env_slice.stop - env_slice.start, num_steps=64, num_minibatches=1,
                           update_epochs=1, max_grad_norm=0.5)
    algo = build_algorithm(cfg, comm)
    algo.model.load_state_dict(state)
    for k, v in rollout.items():
        getattr(algo.rollout, k).copy_(v[:, env_slice])
    algo.next_obs = next_obs[env_slice].clone()
    algo.update(algo.rollout, progress=0.0)
    return torch.cat([p.detach().reshape(-1) for p in algo.model.parameters()])


def _half_update(rank: int, rollout, next_obs, state):
    comm = open_comm(CommConfig(timeout_s=30))
    return _update_on(rollout, next_obs, state, slice(2 * rank, 2 * rank + 2), comm)


def test_two_peers_with_half_the_batch_equal_one_peer_with_all():
    rollout, next_obs, state = _fixed_rollout(4)
    whole = _update_on(rollout, next_obs, state, slice(0, 4), LocalComm())
    before = torch.cat([v.reshape(-1) for v in state.values()])
    a, b = run_peers(_half_update, 2, rollout, next_obs, state)
    assert torch.equal(a, b)
    assert (whole - before).abs().max() > 1e-4, "the update did not move the parameters"
    assert torch.allclose(a, whole, atol=1e-5), (a - whole).abs().max()


@pytest.mark.parametrize("allowed, local_peers, threads, local_rank, expected", [
    ({0, 1}, 2, 1, 1, [1]),              # 2 peers, 2 cores: one each
    ({2, 3, 5, 7}, 2, 2, 1, [5, 7]),     # 2 threads each, from the cores this process may use
    ({0, 1}, 3, 1, 0, None),             # more peers than cores: nobody is pinned
    ({0, 1, 2, 3}, 2, 3, 0, None),       # not enough cores for every peer's threads
    ({0, 1}, 2, 2, 1, None),             # this peer's share would be empty
])
def test_pin_cores_gives_each_local_peer_its_own_cores(monkeypatch, allowed, local_peers, threads,
                                                       local_rank, expected):
    from p2prl.comm import pin_cores
    import p2prl.comm.peers as peers_mod
    pinned = []
    monkeypatch.setattr(peers_mod.os, "sched_getaffinity", lambda pid: set(allowed))
    monkeypatch.setattr(peers_mod.os, "sched_setaffinity", lambda pid, cpus: pinned.append(list(cpus)))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_peers))
    assert pin_cores(threads) == expected
    assert pinned == ([] if expected is None else [expected])


def test_pin_cores_needs_torchruns_local_layout(monkeypatch):
    from p2prl.comm import pin_cores
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pin_cores(1) is None


def _windows(rank: int):
    from p2prl.metrics import ReturnWindow
    cfg = small_run_config(num_envs=4, num_steps=32)
    comm = open_comm(cfg.comm)
    algo = build_algorithm(cfg, comm)
    carried, separate = ReturnWindow(5), ReturnWindow(5)
    step = 0
    for i in range(4):
        res = algo.iteration(i / 4, lambda eps: carried.local_table(comm, step, algo.num_envs, eps))
        carried.merge(res.episode_table)
        separate.sync(comm, step, algo.num_envs, res.episodes)
        step += res.steps * comm.world_size
    return carried.items, separate.items, carried.episodes, comm.calls


def test_return_window_carried_in_ppo_statistics_equals_its_own_collective():
    a, b = run_peers(_windows, 2)
    assert a[2] > 5  # episodes finished: the window is full
    assert a[0] == a[1] == b[0] == b[1]  # same window on both peers, however it was summed
    assert a[2] == b[2]
