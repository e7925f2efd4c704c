"""Learning from pixels: encoders, uint8 storage, frame-stack reconstruction, the Atari wrapper stack,
any env by id, and a smoke test of every Atari preset (skipped without the atari extra)."""
import importlib.util
import io
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from p2prl.checks import ConfigError
from p2prl.comm import LocalComm
from p2prl.data import allocate_rollout
from p2prl.frame_replay import FrameReplay
from p2prl.metrics import EpisodeCounter
from p2prl.nets import ActorCritic, NatureCNN, QNetwork, resolve_encoder
from p2prl.wrappers import GAME_OVER, SCORE, episode_signal, scored

pytestmark = pytest.mark.timeout(180)
HAS_ALE = importlib.util.find_spec("ale_py") is not None and importlib.util.find_spec("cv2") is not None
HAS_BOX2D = importlib.util.find_spec("Box2D") is not None


class Frames(gym.Env):
    """36x36 frames (the smallest the Nature CNN takes) that name themselves: pixel [0, 0] the env's
    tag, [0, 1] the episode, [0, 2] the step; episodes of 2-6 steps end by termination, chosen by the
    env's seed, or by the 5-step time limit."""

    observation_space = gym.spaces.Box(0, 255, (36, 36), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, tag: int = 0) -> None:
        self.tag, self.episode, self.t, self.length = tag, -1, 0, 0

    def _frame(self) -> np.ndarray:
        f = np.zeros((36, 36), np.uint8)
        f[0, :3] = self.tag, self.episode % 256, self.t
        return f

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None and self.tag == 0:  # copies made by gym.make_vec: named by their seeds
            self.tag = seed % 250 + 1
        self.episode, self.t = self.episode + 1, 0
        self.length = int(self.np_random.integers(2, 7))
        return self._frame(), {}

    def step(self, action):
        self.t += 1
        return self._frame(), float(action), self.t >= self.length, False, {}


gym.register("P2prlTestFrames-v0", entry_point=Frames, max_episode_steps=5)  # some episodes truncate


class Colour(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (40, 40, 3), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros((40, 40, 3), np.uint8), {}

    def step(self, action):
        return np.zeros((40, 40, 3), np.uint8), 0.0, False, False, {}


gym.register("P2prlTestColour-v0", entry_point=Colour, max_episode_steps=10)


def stacked_envs(n: int, k: int = 4) -> gym.vector.VectorEnv:
    return gym.vector.SyncVectorEnv([lambda i=i: gym.wrappers.FrameStackObservation(
        gym.wrappers.TimeLimit(Frames(tag=i + 1), 5), k) for i in range(n)])


# -- encoders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 84, 84), (84, 84, 4), (96, 96, 3), (3, 64, 64)])
def test_cnn_gives_512_features_for_channels_first_and_last(shape):
    cnn = NatureCNN(shape)
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    assert cnn(x).shape == (5, 512)
    assert cnn.channels_last == (shape[-1] < shape[0])


def test_hwc_and_chw_of_the_same_pixels_give_the_same_features():
    chw, hwc = NatureCNN((4, 84, 84)), NatureCNN((84, 84, 4))
    hwc.load_state_dict(chw.state_dict())
    x = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    assert torch.allclose(chw(x), hwc(x.permute(0, 2, 3, 1)), atol=1e-5)
    # uint8 and the same values as floats: scaled to [0, 1] inside either way
    assert torch.allclose(chw(x), chw(x.float()), atol=1e-6)


def test_channels_last_convolutions_match_the_nchw_ones():
    """The CNN converts its input to channels-last floats (faster oneDNN kernels): features and
    gradients equal those of plain NCHW convolutions to float tolerance, and a float input is left alone."""
    torch.manual_seed(0)
    cnn = NatureCNN((4, 84, 84))
    x = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    out = cnn(x)
    grads = torch.autograd.grad(out.square().sum(), list(cnn.parameters()))
    nchw = x.float() * (1.0 / 255.0)
    assert nchw.is_contiguous() and not nchw.is_contiguous(memory_format=torch.channels_last)
    ref = cnn.fc(cnn.conv(nchw))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(cnn.parameters()))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-5)
    floats = x.float().contiguous(memory_format=torch.channels_last)  # needs no conversion
    kept = floats.clone()
    assert torch.allclose(cnn(floats), out, atol=1e-6)
    assert torch.equal(floats, kept)  # scaled into a copy, not in place


def test_encoder_choice_and_heads():
    image = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    vector = gym.spaces.Box(-1, 1, (3, 4), np.float32)
    assert resolve_encoder("auto", image) == "cnn" and resolve_encoder("auto", vector) == "mlp"
    assert resolve_encoder("mlp", image) == "mlp"
    with pytest.raises(ConfigError, match=r"algo.encoder=cnn: needs uint8 image observations.*allowed: auto, mlp"):
        resolve_encoder("cnn", vector)
    ac = ActorCritic(image, gym.spaces.Discrete(6), [64, 64], "tanh", "cnn")
    d, v = ac.dist_value(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert d.logits.shape == (2, 6) and v.shape == (2,)
    assert QNetwork(image, 6, [64], "relu", "cnn")(torch.zeros(7, 4, 84, 84)).shape == (7, 6)
    flat = ActorCritic(vector, gym.spaces.Discrete(2), [8], "tanh", "mlp")  # multi-dim Box: flattened
    assert flat.critic[0].in_features == 12 and flat.value(torch.zeros(5, 3, 4)).shape == (5,)


# -- uint8 storage ---------------------------------------------------------------------------------
def test_rollout_keeps_uint8_and_shares_raw_obs_without_normalization():
    r = allocate_rollout(3, 2, (4, 84, 84), (), torch.int64, torch.uint8, raw=False)
    assert r.obs.dtype == torch.uint8 and r.raw_obs is r.obs
    assert allocate_rollout(3, 2, (4,), (), torch.int64).raw_obs is not None


def test_channels_last_rollout_minibatches_reach_the_cnn_without_a_transposing_copy():
    r = allocate_rollout(3, 2, (4, 84, 84), (), torch.int64, torch.uint8, raw=False, channels_last=True)
    frames = torch.randint(0, 256, (3, 2, 4, 84, 84), dtype=torch.uint8)
    for t in range(3):
        r.obs[t] = frames[t]
    assert r.obs.shape == (3, 2, 4, 84, 84) and torch.equal(r.obs, frames)
    flat = r.obs[:2].reshape(4, 4, 84, 84)  # a shortened rollout, flattened as PPO.learn does
    batch = flat[torch.tensor([3, 0, 2])]
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, frames[:2].reshape(4, 4, 84, 84)[torch.tensor([3, 0, 2])])


def test_ppo_rollout_holds_the_env_frames_as_uint8(compose):
    from p2prl.runner import build_algorithm
    cfg = compose("algo=ppo", "env=gym", "env.id=P2prlTestFrames-v0", "env.frame_stack=4", "algo.num_envs=2",
                  "algo.num_steps=12", "algo.num_minibatches=2")
    algo = build_algorithm(cfg, LocalComm())
    assert algo.model.encoder.cnn is not None  # auto: a CNN for uint8 frames
    seen, step = [torch.as_tensor(algo.collector.obs).clone()], algo.collector.envs.step

    def recording(a):
        out = step(a)
        seen.append(torch.as_tensor(out[0]))
        return out
    algo.collector.envs.step = recording
    algo.sample(0.0)
    r = algo.rollout
    assert r.obs.dtype == torch.uint8 and r.raw_obs is r.obs and r.obs.shape == (12, 2, 4, 36, 36)
    assert torch.equal(r.obs, torch.stack(seen[:12]))
    algo.learn(0.0)  # minibatches of bytes through the CNN


def test_frame_replay_rebuilds_every_stack_across_episode_ends_and_wraparound():
    n, k = 3, 4
    envs = stacked_envs(n, k)
    obs, _ = envs.reset(seed=0)
    buf = FrameReplay(capacity=45, obs_shape=obs.shape[1:], num_envs=n, stack=k, rng=np.random.default_rng(0))
    key, valid = buf.begin(obs), np.ones(n, bool)
    assert np.array_equal(buf.stacks(key), obs)
    truth, order = {}, []
    for t in range(120):
        a = np.arange(n) % 2
        nxt, r, term, trunc, _ = envs.step(a)
        nkey = buf.observe(nxt, valid)
        assert np.array_equal(buf.stacks(nkey), nxt), t  # incl. the reset frames padding a new episode
        v = valid
        buf.add(key[v], a[v], r[v], nkey[v], np.full(int(v.sum()), 0.9, np.float32), term[v].astype(np.float32))
        for i in np.flatnonzero(v):
            truth[obs[i].tobytes()] = (nxt[i].tobytes(), int(a[i]), float(term[i]))
            order.append(obs[i].tobytes())
        obs, key, valid = nxt, nkey, ~(term | trunc)
    assert buf.count > 2 * buf.capacity  # wrapped around
    b = buf.sample(200)
    recent = set(order[-(buf.capacity - k * n):])
    for o, a, nx, term in zip(b.obs.numpy(), b.actions.numpy(), b.next_obs.numpy(), b.terminated.numpy()):
        assert truth[o.tobytes()] == (nx.tobytes(), int(a), float(term))
    assert {o.tobytes() for o in b.obs.numpy()} <= set(order[-buf.capacity:])
    assert len({o.tobytes() for o in b.obs.numpy()} & recent) > 10
    assert b.obs.dtype == torch.uint8 and b.obs.shape == (200, k, 36, 36)


def test_frame_replay_of_100k_atari_transitions_stores_each_frame_once():
    buf = FrameReplay(100_000, (4, 84, 84), 1, 4, np.random.default_rng(0))
    assert buf.frames.nbytes == 100_000 * 84 * 84  # 0.71 GB, not 2 x 4 frames per transition
    state = FrameReplay(8, (2, 3, 3), 2, 2, np.random.default_rng(0))
    state.begin(np.arange(36, dtype=np.uint8).reshape(2, 2, 3, 3))
    copy = FrameReplay(8, (2, 3, 3), 2, 2, np.random.default_rng(0))
    copy.load_state_dict(state.state_dict())
    assert copy.count == state.count and np.array_equal(copy.stacks(np.array([2, 3])), state.stacks(np.array([2, 3])))


def _fill(buf: FrameReplay, envs, obs, key, valid, steps: int, truth: dict) -> tuple:
    """`steps` vector steps of one-step transitions into buf, as DQN stores them; truth maps each
    observation (bytes) to its next observation and action. Returns (obs, key, valid) to go on from."""
    for t in range(steps):
        a = (np.arange(len(obs)) + t) % 2
        nxt, r, term, trunc, _ = envs.step(a)
        nkey = buf.observe(nxt, valid)
        assert np.array_equal(buf.stacks(nkey), nxt), t
        buf.add(key[valid], a[valid], r[valid], nkey[valid], np.full(int(valid.sum()), 0.9, np.float32),
                term[valid].astype(np.float32))
        truth.update((obs[i].tobytes(), (nxt[i].tobytes(), int(a[i]))) for i in np.flatnonzero(valid))
        obs, key, valid = nxt, nkey, ~(term | trunc)
    return obs, key, valid


def _sampleable(buf: FrameReplay) -> np.ndarray:
    """The global indices of the transitions `sample` draws from, oldest first."""
    g = np.arange(max(0, buf.count - buf.capacity), buf.count)
    return g[buf.has[g % buf.capacity] & (g >= buf.count - buf.capacity + (buf.k - 1) * buf.n)]


def _replays_only(buf: FrameReplay, truth: dict) -> None:
    b = buf.sample(300)
    for o, a, nx in zip(b.obs.numpy(), b.actions.numpy(), b.next_obs.numpy()):
        assert truth[o.tobytes()] == (nx.tobytes(), int(a))


@pytest.mark.parametrize("capacity", [45, 90, 30])
def test_frame_replay_resumed_with_another_capacity_keeps_its_newest_stacks(capacity):
    n, k = 3, 4
    envs = stacked_envs(n, k)
    obs, _ = envs.reset(seed=0)
    buf, truth = FrameReplay(45, obs.shape[1:], n, k, np.random.default_rng(0)), {}
    obs, key, valid = _fill(buf, envs, obs, buf.begin(obs), np.ones(n, bool), 50, truth)
    assert buf.count > buf.capacity  # wrapped around
    state = io.BytesIO()
    torch.save(buf.state_dict(), state)
    state.seek(0)
    copy = FrameReplay(capacity, obs.shape[1:], n, k, np.random.default_rng(0))
    copy.begin(obs)  # as DQN's constructor does before loading
    copy.load_state_dict(torch.load(state, weights_only=True))
    if capacity == buf.capacity:  # every slot where it was: a resumed run samples what the uninterrupted would
        assert copy.size == buf.size and all(np.array_equal(getattr(copy, a), getattr(buf, a)) for a in buf.ARRAYS)
    else:  # re-keyed: counts only the transitions whose frames it holds
        assert copy.size == copy.has.sum() == len(_sampleable(copy))
    before = _sampleable(buf)
    kept = before[before >= buf.count - capacity + (k - 1) * n]  # the newest that fit
    assert len(kept) > 0 and np.array_equal(_sampleable(copy), kept)
    s, c = kept % buf.capacity, kept % capacity
    assert np.array_equal(copy.stacks(kept), buf.stacks(kept))
    assert np.array_equal(copy.stacks(copy.next[c]), buf.stacks(buf.next[s]))
    assert np.array_equal(copy.actions[c], buf.actions[s]) and np.array_equal(copy.rewards[c], buf.rewards[s])
    _replays_only(copy, truth)
    # The sampler's keys (global indices) stay valid; new frames overwrite the oldest.
    obs, key, valid = _fill(copy, envs, obs, key, valid, 40, truth)
    _replays_only(copy, truth)
    assert _sampleable(copy).min() >= copy.count - capacity


def test_dqn_replays_the_frames_its_env_gave(compose):
    """DQN's own sampler on stacked uint8 frames, 2-step returns: every replayed transition is one the
    env made, its next observation 1 or 2 steps on (fewer at an episode's end)."""
    from p2prl.runner import build_algorithm
    cfg = compose("algo=dqn", "env=gym", "env.id=P2prlTestFrames-v0", "env.frame_stack=4", "algo.num_envs=2",
                  "algo.buffer_size=40", "algo.batch_size=16", "algo.learning_starts=0", "algo.n_step=2")
    algo = build_algorithm(cfg, LocalComm())
    assert isinstance(algo.buffer, FrameReplay) and algo.buffer.k == 4 and algo.obs.dtype == np.uint8
    step = algo.collector.envs.step
    history = {i: [algo.obs[i].tobytes()] for i in range(2)}

    def recording(a):
        out = step(a)
        for i in range(2):
            history[i].append(np.asarray(out[0][i]).tobytes())
        return out
    algo.collector.envs.step = recording
    for _ in range(30):
        algo.collect(1)
    b = algo.buffer.sample(64)
    for o, nx, disc in zip(b.obs.numpy(), b.next_obs.numpy(), b.discounts.numpy()):
        i = next(i for i in history if o.tobytes() in history[i])
        at = history[i].index(o.tobytes())
        hops = round(float(np.log(disc) / np.log(cfg.algo.gamma)))
        assert hops in (1, 2) and history[i][at + hops] == nx.tobytes()
    algo.learn(1.0)  # a CNN update from the frame store


def test_dqn_resumed_with_another_buffer_size_keeps_its_newest_frames(compose):
    from p2prl.runner import build_algorithm

    def build(size: int):
        return build_algorithm(compose("algo=dqn", "env=gym", "env.id=P2prlTestFrames-v0", "env.frame_stack=4",
                                       "algo.num_envs=2", f"algo.buffer_size={size}", "algo.batch_size=16",
                                       "algo.n_step=2"), LocalComm())
    a = build(40)
    for _ in range(30):
        a.collect(1)
    state = io.BytesIO()
    torch.save({"own": a.rank_state_dict(replay=True), "collector": a.collector.state_dict()}, state)
    for size in (80, 24):
        state.seek(0)
        b = build(size)
        saved = torch.load(state, weights_only=True)
        b.collector.load_state_dict(saved["collector"])
        b.load_rank_state_dict(saved["own"])
        g = _sampleable(b.buffer)
        assert len(g) > 0 and b.fill_from == 0, size  # not a buffer restarted empty
        assert np.array_equal(g, _sampleable(a.buffer)[-len(g):])
        assert np.array_equal(b.buffer.stacks(g), a.buffer.stacks(g))
        assert np.array_equal(b.buffer.stacks(b.buffer.next[g % size]), a.buffer.stacks(a.buffer.next[g % 40]))
        b.collect(8)  # frame stacks are not restorable: fresh episodes, fresh keys
        assert np.array_equal(b.buffer.stacks(b.writer.keys), b.obs)


# -- the Atari wrapper stack -----------------------------------------------------------------------
class FakeAle(gym.Env):
    """An Atari-shaped game: 3 lives, scripted rewards (4s and 7s, as Breakout's upper rows), a life
    lost every 4 steps, and the actions it was given recorded."""

    observation_space = gym.spaces.Box(0, 255, (4, 4), np.uint8)
    action_space = gym.spaces.Discrete(4)
    REWARDS = [0, 4, 0, 7, 1, 0, 4, 0, 7, 7, 0, 1]

    def __init__(self) -> None:
        self.t, self.lives_left, self.actions = 0, 3, []
        outer = self

        class Ale:
            def lives(self):
                return outer.lives_left
        self.ale = Ale()

    def get_action_meanings(self):
        return ["NOOP", "FIRE", "RIGHT", "LEFT"]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.lives_left = 0, 3
        return np.zeros((4, 4), np.uint8), {}

    def step(self, action):
        self.actions.append(int(action))
        r = self.REWARDS[self.t % len(self.REWARDS)]
        self.t += 1
        if self.t % 4 == 0:
            self.lives_left -= 1
        return np.zeros((4, 4), np.uint8), float(r), self.lives_left == 0, False, {}


def test_learner_sees_clipped_rewards_and_life_ends_while_the_log_counts_whole_games():
    games = []
    envs = gym.vector.SyncVectorEnv([lambda: scored(games.append(FakeAle()) or games[-1], True)])
    envs.reset(seed=0)
    assert games[0].actions == [1]  # FIRE after the reset
    counter, valid, learner_rewards, life_ends = EpisodeCounter(1), np.ones(1, bool), [], 0
    for t in range(40):
        _, r, term, trunc, infos = envs.step(np.array([2]))
        counter.step(t, *episode_signal(r, term | trunc, infos), valid)
        if valid[0]:
            learner_rewards.append(float(r[0]))
            life_ends += int(term[0])
        valid = ~(term | trunc)
    assert set(learner_rewards) == {0.0, 1.0}  # the 4s and 7s clipped for the learner
    games_done = counter.take()
    assert len(games_done) >= 2 and life_ends >= 3 * len(games_done) - 1  # every lost life ended an episode
    # a game is 12 agent steps (3 lives x 4) whose unclipped rewards sum to 31
    assert [g.ret for g in games_done[:2]] == [31.0, 31.0]


def test_without_the_score_the_learners_rewards_are_counted():
    r, d = np.array([1.0, 2.0]), np.array([True, False])
    assert episode_signal(r, d, {}) == (r, d)
    infos = {SCORE: np.array([4.0, 7.0]), GAME_OVER: np.array([False, True])}
    s, g = episode_signal(r, d, infos)
    assert s.tolist() == [4.0, 7.0] and g.tolist() == [False, True]


# -- any env by id, and the Atari presets ----------------------------------------------------------
def test_env_gym_needs_an_id_and_names_the_run_by_it(tmp_path, cli):
    out = cli(["env=gym", f"hydra.run.dir={tmp_path / 'x'}"])
    assert out.returncode == 2 and "env.id=???: env=gym needs the gymnasium id" in out.stderr
    from p2prl.precheck import env_label
    assert env_label("gym", "ale_py:ALE/Pong-v5") == "ALE-Pong-v5" and env_label("cartpole", "X-v1") == "cartpole"


def test_env_gym_trains_any_registered_id_with_module_prefix(tmp_path, cli):
    run = tmp_path / "run"
    out = cli(["env=gym", "env.id=gymnasium.envs.classic_control:Acrobot-v1", "algo.num_envs=2", "algo.num_steps=16",
               "algo.num_minibatches=2", "train.total_steps=64", f"hydra.run.dir={run}"])
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["final_step"] == 64 and s["config"]["env"]["target_return"] is None and s["max_rss_mb"][0] > 50


@pytest.mark.skipif(not HAS_BOX2D, reason="needs the box2d extra")
def test_car_racing_trains_from_pixels_on_two_peers(tmp_path, cli):
    run = tmp_path / "run"
    out = cli(["env=gym", "env.id=CarRacing-v3", "algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2",
               "algo.update_epochs=1", "train.total_steps=128", f"hydra.run.dir={run}"], nproc=2, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["final_step"] == 128 and len(s["max_rss_mb"]) == 2


@pytest.mark.skipif(not HAS_ALE, reason="needs the atari extra")
@pytest.mark.parametrize("algo,env,nproc", [("ppo", "breakout", 2), ("dqn", "breakout", 2), ("ppo", "pong", 1),
                                            ("dqn", "pong", 1)])
def test_atari_preset_smoke(algo, env, nproc, tmp_path, cli):
    run = tmp_path / "run"
    tiny = {"ppo": ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=1"],
            "dqn": ["algo.learning_starts=64", "algo.buffer_size=500"]}[algo]
    out = cli([f"algo={algo}", f"env={env}", *tiny, "train.total_steps=128", "train.log_every_steps=64",
               f"hydra.run.dir={run}"], nproc=nproc, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["final_step"] >= 128 and s["updates"] > 0 and len(s["max_rss_mb"]) == nproc
    assert s["config"]["env"]["wrapper"] == "atari" and s["config"]["env"]["frame_stack"] == 4


def test_evaluation_counts_whole_games_through_lost_lives():
    from p2prl.evaluate import run_episodes
    env = scored(FakeAle(), True)
    assert run_episodes(env, lambda obs: 2, episodes=2, seed=0) == [31.0, 31.0]
    plain = gym.wrappers.TimeLimit(Frames(), 5)  # no score in the info: the rewards, to the episode's end
    assert run_episodes(plain, lambda obs: 1, episodes=1, seed=0) == [float(min(5, plain.unwrapped.length))]


@pytest.mark.skipif(not HAS_ALE, reason="needs the atari extra")
def test_observation_normalization_is_refused_for_images(tmp_path):
    from p2prl.launch import check_command_line
    error = check_command_line(["env=breakout", "algo.norm_obs=true", f"hydra.run.dir={tmp_path / 'r'}"])
    assert error.startswith("algo.norm_obs=true: does not apply to image observations") and "allowed here: false" in error


def test_refusals_of_stacked_colour_frames_and_frames_too_small_for_the_cnn(tmp_path):
    from p2prl.launch import check_command_line
    run = f"hydra.run.dir={tmp_path / 'r'}"
    error = check_command_line(["env=gym", "env.id=P2prlTestColour-v0", "env.frame_stack=4", run])
    assert error.startswith("env.frame_stack=4: stacks vectors or 2-D (grey) frames; the env's frames are (40, 40, 3)")
    error = check_command_line(["env=gym", "env.id=P2prlTestColour-v0", run])
    assert error is None  # 40x40x3 colour: the CNN, channels last
    small = gym.spaces.Box(0, 255, (4, 20, 20), np.uint8)
    assert resolve_encoder("auto", small) == "mlp"
    with pytest.raises(ConfigError, match="at least 36x36, the env's are 20x20; allowed: auto, mlp"):
        resolve_encoder("cnn", small)


def test_dqn_resume_keeps_the_frame_replay_and_restarts_the_frame_stacks(compose):
    """Frame queues live outside the saved env state: the envs start afresh, the replay is kept and
    every transition replayed after the resume is still one the envs made."""
    from p2prl.runner import build_algorithm
    args = ("algo=dqn", "env=gym", "env.id=P2prlTestFrames-v0", "env.frame_stack=4", "algo.num_envs=2",
            "algo.batch_size=16", "algo.buffer_size=60", "algo.learning_starts=0")
    cfg = compose(*args)
    algo = build_algorithm(cfg, LocalComm())
    for _ in range(20):
        algo.collect(1)
    saved, envs_saved = algo.rank_state_dict(replay=True), algo.collector.state_dict()
    held = algo.buffer.size
    again = build_algorithm(cfg, LocalComm())
    again.collector.load_state_dict(envs_saved)
    again.load_rank_state_dict(saved)
    assert again.buffer.size == held and again.fill_from == 0
    assert np.array_equal(again.buffer.stacks(again.writer.keys), again.obs)  # the fresh envs' frames, begun anew
    seen = {}
    step = again.collector.envs.step

    def recording(a):
        before = again.obs.copy()
        out = step(a)
        for i in range(2):
            seen[before[i].tobytes()] = np.asarray(out[0][i]).tobytes()
        return out
    again.collector.envs.step = recording
    for _ in range(10):
        again.collect(1)
    # The transitions stored since the resume (frame indices only grow), looked up by their frames: the
    # fresh episodes continue the envs' random streams, so their frames may repeat the saved ones' names
    # (tag, episode, step) with other episode lengths, and only the new ones are the envs' since.
    buf = again.buffer
    g = _sampleable(buf)
    g = g[g >= int(saved["replay"]["count"])]
    pairs = zip(buf.stacks(g), buf.stacks(buf.next[g % buf.capacity]))
    assert len(g) >= 10 and all(seen[o.tobytes()] == n.tobytes() for o, n in pairs)
    # a resize cannot load into frame indices modulo another capacity: the run goes on with a fresh one
    bigger = build_algorithm(compose(*args[:-2], "algo.buffer_size=90", "algo.learning_starts=0"), LocalComm())
    bigger.collector.load_state_dict(envs_saved)
    bigger.load_rank_state_dict(saved)
    assert bigger.fill_from == bigger.vector_steps and bigger.buffer.capacity == 90


def test_a_config_saved_before_the_pixel_keys_resumes_with_its_own_behaviour(compose):
    from p2prl import algos
    from p2prl.config import upgrade
    from p2prl.resume import _same_ranks
    cfg = compose("algo=ppo")
    old = cfg.to_dict()
    for k in ("wrapper", "frame_stack", "terminal_on_life_loss"):
        del old["env"][k]
    del old["algo"]["encoder"]
    up = upgrade(old, algos.algo_sections(), algos.added_keys())
    assert up["env"]["wrapper"] == "none" and up["algo"]["encoder"] == "mlp"
    assert _same_ranks({"config": old, "world_size": 1}, cfg, 1)  # its per-rank state still fits
