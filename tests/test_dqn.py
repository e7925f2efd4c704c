"""DQN: n-step windows across episode ends (TransitionWriter), per-peer replay, target sync on the same
update."""
import numpy as np
import pytest
import torch

from p2prl.algos.returns import nstep_return
from p2prl.algos.schedules import peer_epsilon
from p2prl.algos.transitions import TransitionWriter
from p2prl.comm import LocalComm, open_comm, parameter_digest
from p2prl.data import ReplayBuffer
from p2prl.runner import build_algorithm

pytestmark = pytest.mark.timeout(120)
SMALL = {"num_envs": 1, "learning_starts": 32, "train_freq": 8, "gradient_steps": 4, "target_update_interval": 3,
         "batch_size": 16, "buffer_size": 1000, "hidden_sizes": "[16,16]"}


@pytest.fixture
def dqn_config(compose):
    """`dqn_config(**algo_keys)`: a small DQN config on CartPole."""
    def make(**kw):
        keys = {**SMALL, **kw}
        return compose("algo=dqn", "env=cartpole", "seed=5", "train.total_steps=2000", "comm.timeout_s=30",
                       *(f"algo.{k}={v}" for k, v in keys.items()))
    return make


def iterate(algo, progress: float) -> None:
    algo.sample(progress)
    algo.collector.take()  # as the runner does
    algo.learn(progress)


def test_nstep_return_hand_computed():
    assert nstep_return([1.0, 2.0, 3.0], 0.5) == (1 + 0.5 * 2 + 0.25 * 3, 0.125)
    assert nstep_return([4.0], 0.9) == (4.0, 0.9)


@pytest.mark.parametrize("terminated", [False, True])
def test_nstep_windows_flush_at_episode_end(terminated):
    b = ReplayBuffer(100, (4,), np.random.default_rng(0))
    o = lambda t: np.full((1, 4), float(t), dtype=np.float32)
    writer = TransitionWriter(b, o(0), num_envs=1, n_step=3, gamma=0.5)  # the plain buffer keys by observations
    # Steps 0..3 with rewards 1..4; step 3 ends the episode; step 4 is the autoreset step (invalid).
    for t in range(5):
        end = np.array([t == 3])
        writer.add(np.array([t % 2]), np.array([t + 1.0], dtype=np.float32), o(t + 1),
                   end & terminated, end & (not terminated), np.array([t != 4]))
    assert b.size == 4
    expected = [  # (first obs, reward sum, discount, bootstrap obs, terminated)
        (0, 1 + 0.5 * 2 + 0.25 * 3, 0.125, 3, 0.0),
        (1, 2 + 0.5 * 3 + 0.25 * 4, 0.125, 4, float(terminated)),
        (2, 3 + 0.5 * 4, 0.25, 4, float(terminated)),
        (3, 4.0, 0.5, 4, float(terminated)),
    ]
    for i, (first, ret, disc, boot, term) in enumerate(expected):
        assert b.obs[i, 0] == first and b.next_obs[i, 0] == boot
        assert b.rewards[i] == pytest.approx(ret) and b.discounts[i] == pytest.approx(disc)
        assert b.terminated[i] == term and b.actions[i] == first % 2


def test_one_step_transitions_skip_the_reset_step(dqn_config):
    algo = build_algorithm(dqn_config(num_envs=2, buffer_size=5000, n_step=1), LocalComm())
    algo.collect(600)  # many CartPole episodes end in 600 steps under a random-ish policy
    b = algo.buffer
    ended = algo.collector.take().episodes
    resets = sum(1 for e in ended if e.t < 599)  # each end is followed by one dropped reset step
    assert resets > 5
    assert b.size == 2 * 600 - resets
    assert int(b.terminated[:b.size].sum()) == sum(1 for e in ended if e.length < 500)
    # Every stored transition follows CartPole dynamics: a reset would jump the state.
    jump = np.abs(b.next_obs[:b.size] - b.obs[:b.size]).max(1)
    assert jump.max() < 1.0, "a stored transition crosses a reset"


@pytest.mark.parametrize("epsilon", [1.0, 0.5, 0.0])
def test_acting_draws_as_before_and_skips_the_network_when_every_env_explores(epsilon, dqn_config):
    """Actions are epsilon-greedy from the same draws (explore flags, then random actions) whether or not
    the network runs; it runs only when some env takes its greedy action."""
    algo = build_algorithm(dqn_config(num_envs=3), LocalComm())
    algo.epsilon = epsilon
    calls = []
    algo.q.register_forward_hook(lambda *_: calls.append(1))
    twin = np.random.Generator(np.random.PCG64())
    for _ in range(20):
        twin.bit_generator.state = algo.rng.bit_generator.state
        with torch.no_grad():
            greedy = algo.q(torch.from_numpy(algo.obs)).argmax(1).numpy()
        calls.clear()
        explore = twin.random(3) < epsilon
        expected = np.where(explore, twin.integers(0, algo.n_actions, 3), greedy)
        assert np.array_equal(algo._act(), expected)
        assert len(calls) == (0 if explore.all() else 1)
        assert algo.rng.bit_generator.state == twin.bit_generator.state
        algo.collector.obs = algo.obs + np.float32(0.1)


def test_ape_x_epsilons():
    assert peer_epsilon(0.4, 0, 1, 7.0) == 0.4
    assert peer_epsilon(0.4, 0, 4, 7.0) == 0.4
    assert peer_epsilon(0.4, 3, 4, 7.0) == pytest.approx(0.4 ** 8)
    assert peer_epsilon(0.4, 3, 4, None) == 0.4


def _dqn_peer(rank: int, cfg):
    comm = open_comm(cfg.comm, "gloo")
    algo = build_algorithm(cfg, comm)
    trace = []
    for i in range(12):
        iterate(algo, i / 12)
        trace.append((algo.learner.updates, parameter_digest(list(algo.q.parameters())),
                      parameter_digest(list(algo.target.parameters()))))
    b = algo.buffer
    return trace, torch.from_numpy(b.obs[:b.size].copy())


def test_two_peers_identical_networks_own_buffers_target_synced_together(dqn_config, peers):
    (ta, buf_a), (tb, buf_b) = peers(_dqn_peer, 2, dqn_config(num_envs=2))
    assert ta == tb, "online or target networks differ between peers"
    assert ta[-1][0] > 0
    assert buf_a.shape[0] > 0 and not (buf_a.shape == buf_b.shape and torch.equal(buf_a, buf_b)), \
        "peers share replay data"
    # The target changes only on iterations whose updates crossed a multiple of target_update_interval.
    for (u0, _, tgt0), (u1, _, tgt1) in zip(ta, ta[1:]):
        synced = u1 // 3 > u0 // 3
        assert (tgt0 != tgt1) == synced, (u0, u1)


def test_checkpointed_state_resumes_bit_for_bit(tmp_path, dqn_config):
    cfg = dqn_config(num_envs=2, n_step=3)
    a = build_algorithm(cfg, LocalComm())
    for i in range(6):
        iterate(a, i / 12)
    path = tmp_path / "state.pt"
    torch.save({"shared": a.state_dict(), "learner": a.learner.state_dict(), "own": a.rank_state_dict(replay=True),
                "collector": a.collector.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    b = build_algorithm(cfg, LocalComm())
    b.load_state_dict(saved["shared"])
    b.learner.load_state_dict(saved["learner"])
    b.collector.load_state_dict(saved["collector"])
    b.load_rank_state_dict(saved["own"])
    torch.manual_seed(123)
    iterate(a, 0.5)
    torch.manual_seed(123)
    iterate(b, 0.5)
    assert parameter_digest(list(a.q.parameters())) == parameter_digest(list(b.q.parameters()))
    assert a.buffer.size == b.buffer.size and np.array_equal(a.buffer.obs, b.buffer.obs)
    for da, db in zip(a.writer.windows, b.writer.windows):
        assert len(da) == len(db) and all(np.array_equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(da, db))


def test_resume_without_replay_refills_before_learning(dqn_config):
    cfg = dqn_config(num_envs=2, n_step=3, train_freq=2, learning_starts=32)
    a = build_algorithm(cfg, LocalComm())
    for i in range(12):
        iterate(a, i / 24)
    assert a.learner.updates > 0
    b = build_algorithm(cfg, LocalComm())
    b.load_state_dict(a.state_dict())  # shared state only: this peer's replay buffer starts empty
    before = b.learner.updates
    for i in range(7):  # the 8th iteration brings 8 x 2 vector steps x 2 envs = 32 fresh steps
        iterate(b, 0.5)
        assert b.learner.updates == before, "learned from an unfilled buffer"
    iterate(b, 0.5)
    assert b.learner.updates > before and b.buffer.size > 0


def _ring(capacity: int, first: int, last: int, buf=None) -> ReplayBuffer:
    """Transitions first..last added one by one: transition i has obs (i, -i), reward i, discount 1."""
    buf = buf or ReplayBuffer(capacity, (2,), np.random.default_rng(0))
    for i in range(first, last + 1):
        buf.add(np.array([[i, -i]], np.float32), np.array([i % 2]), np.array([i], np.float32),
                np.array([[i + 1, -i - 1]], np.float32), np.ones(1, np.float32), np.zeros(1, np.float32))
    return buf


def _held(buf: ReplayBuffer) -> list[int]:
    """The rewards (transition numbers) the ring holds, oldest first: the next add overwrites the first."""
    slots = (buf.pos - buf.size + np.arange(buf.size)) % buf.capacity
    assert np.array_equal(buf.obs[slots, 0], buf.rewards[slots]) and (buf.discounts[slots] == 1).all()
    return buf.rewards[slots].astype(int).tolist()


@pytest.mark.parametrize("capacity, adds, then", [(8, 8, [5, 6, 7, 8, 9, 10, 11, 12]), (3, 8, [10, 11, 12]),
                                                  (3, 7, [9, 10, 11])])
def test_a_wrapped_ring_resumed_with_another_capacity_keeps_its_newest_transitions_in_order(capacity, adds, then):
    saved = _ring(5, 1, adds).state_dict()  # wrapped: holds the last 5, the oldest at slot adds % 5
    held = list(range(adds - min(5, capacity) + 1, adds + 1))
    buf = ReplayBuffer(capacity, (2,), np.random.default_rng(0))
    buf.load_state_dict(torch.load(_save(saved), weights_only=True))
    assert _held(buf) == held and buf.size == len(held)
    b = buf.sample(500)  # never an unwritten row (obs 0, reward 0, discount 0)
    assert set(b.rewards.int().tolist()) == set(held) and (b.discounts == 1).all()
    assert torch.equal(b.obs[:, 0], b.rewards) and torch.equal(b.next_obs[:, 0], b.rewards + 1)
    _ring(capacity, adds + 1, adds + 4, buf)  # new transitions overwrite the oldest
    assert _held(buf) == then and set(buf.sample(500).rewards.int().tolist()) == set(then)


def test_a_ring_resumed_with_its_own_capacity_keeps_every_slot():
    for adds in (3, 5, 8):  # partly filled, just full, wrapped
        saved = _ring(5, 1, adds)
        buf = ReplayBuffer(5, (2,), np.random.default_rng(0))
        buf.load_state_dict(torch.load(_save(saved.state_dict()), weights_only=True))
        assert (buf.pos, buf.size) == (saved.pos, saved.size)
        for k in ("obs", "next_obs", "actions", "rewards", "discounts", "terminated"):
            assert np.array_equal(getattr(buf, k), getattr(saved, k)), k
        saved.rng = np.random.default_rng(1)
        buf.rng = np.random.default_rng(1)
        assert all(torch.equal(x, y) for x, y in zip(saved.sample(64), buf.sample(64)))


def _save(state: dict):
    import io
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return f


def _poisoned_dqn(cfg) -> dict:
    """Two DQN iterations on one peer where every second update's loss is NaN: the logged losses are the
    mean over the updates that were applied, not divided by algo.gradient_steps."""
    algo = build_algorithm(cfg, LocalComm())
    real = algo.loss
    calls = []

    def loss(batch):
        value, terms = real(batch)
        calls.append(float(terms["loss_td"]))
        return (value * float("nan"), terms) if len(calls) % 2 == 0 else (value, terms)
    algo.loss = loss
    while algo.learner.attempts == 0:
        iterate(algo, 0.0)
    return {"logs": algo.learn(0.0), "calls": calls, "skipped": algo.learner.skipped}


def test_logged_losses_average_only_the_applied_updates(dqn_config):
    out = _poisoned_dqn(dqn_config(gradient_steps=4, learning_starts=8))
    applied = out["calls"][-4:][0::2]  # the last learn(): updates 1 and 3 applied, 2 and 4 skipped
    assert out["skipped"] >= 2
    assert out["logs"]["loss_td"] == pytest.approx(sum(applied) / len(applied), rel=1e-6)
