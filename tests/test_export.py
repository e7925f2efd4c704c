"""`p2prl export`: the greedy policy of a run as an ONNX file (run with onnxruntime), a torch.export .pt2
or, for tabular Q-learning, the Q table as .npy. The exported policies act as `p2prl.load(run).act(obs,
deterministic=True)` on 1,000 observations of the run's own env (MLP and CNN encoders, observation
normalization, action bounds), on a batch of any size, and carry their metadata; bad inputs are one
line and exit 2, as docs/validation.md lists them. The ONNX cases skip without the onnx extra."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import p2prl
from p2prl import algos, checkpoint, export
from p2prl.algos.greedy import GreedyPolicy, ObsNormalization
from p2prl.normalize import RunningNormalizer
from p2prl.runner import run

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")


class Square(gym.Env):
    """Frames 36x36 (the smallest the Nature CNN takes), grey or colour: a white 12x12 square at a random
    place on black; 3 actions, the one that names the third the square's centre is in (left, middle,
    right) rewarded. Frames that differ by where things are, not only by how bright they are (which a
    CNN of ReLUs, its biases 0 at first, would answer with the same action scaled), so that the
    policy's action changes from frame to frame. Episodes of 3 to 20 steps."""

    action_space = gym.spaces.Discrete(3)

    def __init__(self, shape=(36, 36)) -> None:
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.left, self.x = 0, 0

    def _frame(self) -> np.ndarray:
        y, self.x = (int(v) for v in self.np_random.integers(0, 25, 2))
        frame = np.zeros(self.observation_space.shape, np.uint8)
        frame[y:y + 12, self.x:self.x + 12] = 255
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = int(self.np_random.integers(3, 21))
        return self._frame(), {}

    def step(self, action):
        self.left -= 1
        reward = float(action == (self.x + 6) // 12)
        return self._frame(), reward, self.left <= 0, False, {}


gym.register("P2prlTestSquare-v0", entry_point=Square)
gym.register("P2prlTestColourSquare-v0", entry_point=Square, kwargs={"shape": (36, 36, 3)})

TINY = ["train.log_every_steps=64", "train.target_return=null"]
PPO = ["algo.num_envs=2", "algo.num_steps=32", "algo.num_minibatches=2", "algo.update_epochs=2"]
DQN = ["algo=dqn", "algo.num_envs=2", "algo.learning_starts=64", "algo.batch_size=16", "algo.buffer_size=500"]
RUNS = {
    "ppo": ["algo=ppo", *PPO],
    "ppo-continuous": ["algo=ppo", "env=pendulum", *PPO, "algo.norm_obs=true"],
    "a2c": ["algo=a2c", "algo.num_envs=2", "algo.num_steps=8"],
    "dqn": DQN,
    # stacked grey frames (4, 36, 36), channels first; colour frames (36, 36, 3), channels last
    "ppo-cnn": ["algo=ppo", *PPO, "env=gym", "env.id=P2prlTestSquare-v0", "env.frame_stack=4", "algo.encoder=cnn"],
    "dqn-cnn": [*DQN, "env=gym", "env.id=P2prlTestColourSquare-v0", "algo.encoder=cnn"],
    "qlearning": ["algo=qlearning", "env=taxi", "algo.num_envs=2", "algo.sync_every=16"],
    # tanh-squashed actions scaled to Pendulum's torque bounds
    "sac": ["algo=sac", "env=pendulum", "algo.learning_starts=64", "algo.batch_size=16", "algo.buffer_size=500",
            "algo.hidden_sizes=[32,32]"],
    "td3": ["algo=td3", "env=pendulum", "algo.learning_starts=64", "algo.batch_size=16", "algo.buffer_size=500",
            "algo.hidden_sizes=[32,32]", "algo.train_freq=1", "algo.gradient_steps=1"],
}
NETWORKS = [k for k in RUNS if k != "qlearning"]
# Global steps of each run: 256, but one PPO update for the CNN, whose actions are still varied then
# (a few more updates and it already prefers one action on most frames, which would test little).
STEPS = {kind: 64 if kind == "ppo-cnn" else 256 for kind in RUNS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run dir of a tiny run of each kind, trained once for the module."""
    from p2prl.precheck import compose
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind) / "run"
            run(compose(*RUNS[kind], *TINY, f"train.total_steps={STEPS[kind]}"), made[kind])
        return made[kind]
    return get


def observations(policy, n: int) -> np.ndarray:
    """n observations of the run's env (p2prl's wrappers included), stepped with random actions."""
    env = policy.make_env()
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    seen = []
    for _ in range(n):
        seen.append(obs)
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return np.stack(seen)


def actor(fmt: str, path: Path):
    """The exported file as a function of a batch of observations (numpy in, numpy out), as a user
    outside p2prl runs it."""
    if fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path))
        return lambda obs: session.run(None, {"obs": obs})[0]
    module = torch.export.load(path).module()
    return lambda obs: module(torch.as_tensor(obs)).numpy()


def stored_metadata(fmt: str, path: Path) -> dict:
    if fmt == "onnx":
        import onnxruntime
        meta = onnxruntime.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
        return {k: v if k in ("format", "algo", "env", "env_id", "p2prl_version", "checkpoint") else json.loads(v)
                for k, v in meta.items()}
    extra = {export.METADATA: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[export.METADATA])


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_onnx), "pt2"])
@pytest.mark.parametrize("kind", NETWORKS)
def test_the_exported_policy_acts_as_p2prl_load_does(kind, fmt, trained, tmp_path):
    run_dir = trained(kind)
    policy = p2prl.load(run_dir)
    obs = observations(policy, 1000)
    expected = policy.act(obs, deterministic=True)
    out, meta = export.export(run_dir, fmt, out=tmp_path / f"policy.{fmt}")
    act = actor(fmt, out)
    got = act(obs)
    space = policy.action_space
    if isinstance(space, gym.spaces.Discrete):
        assert got.dtype == np.int64 and got.shape == (1000,)
        # Where the best two actions are nearly tied, float rounding in another runtime may pick either.
        state = checkpoint.load(policy.checkpoint)
        module = algos.spec(policy.config.algo.name).greedy_module(policy.config.algo, state,
                                                                    policy.observation_space, space)
        top = torch.topk(module.scores(torch.as_tensor(obs)), 2).values.numpy()
        clear = top[:, 0] - top[:, 1] > 1e-4
        assert clear.mean() > 0.5, clear.mean()  # the comparison covers most observations
        assert len(np.unique(expected[clear])) > 1, "one constant action would prove little"
        agree = lambda a, b, rows: np.testing.assert_array_equal(a[clear[rows]], b[clear[rows]])
    else:
        assert got.dtype == np.float32 and got.shape == (1000, *space.shape)
        assert (got >= space.low).all() and (got <= space.high).all()
        agree = lambda a, b, rows: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    agree(got, expected, slice(None))
    for rows in (slice(0, 1), slice(500, 507)):  # the batch axis is dynamic: any batch gives the same actions
        agree(act(obs[rows]), got[rows], rows)
    stored = stored_metadata(fmt, out)
    assert stored == json.loads(json.dumps(meta))
    assert stored["algo"] == policy.config.algo.name and stored["env_id"] == policy.config.env.id
    assert stored["step"] == STEPS[kind] and stored["p2prl_version"] == p2prl.__version__ and stored["format"] == fmt
    assert stored["observation_space"]["shape"] == list(policy.observation_space.shape)
    assert stored["observation_space"]["dtype"] == str(policy.observation_space.dtype)
    assert stored["obs_norm"] == (kind == "ppo-continuous")
    if isinstance(space, gym.spaces.Discrete):
        assert stored["action_space"] == {"type": "Discrete", "n": int(space.n), "dtype": "int64"}
    else:
        assert stored["action_space"]["low"] == -2.0 and stored["action_space"]["high"] == 2.0  # Pendulum's torque


@needs_onnx
def test_onnx_declares_a_dynamic_batch_of_the_envs_dtype(trained, tmp_path):
    import onnxruntime
    out, _ = export.export(trained("ppo-cnn"), "onnx", out=tmp_path / "cnn.onnx")
    session = onnxruntime.InferenceSession(str(out))
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("obs", ["batch", 4, 36, 36], "tensor(uint8)")
    assert (outp.name, outp.shape, outp.type) == ("action", ["batch"], "tensor(int64)")


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_onnx), "pt2"])
def test_normalization_and_bounds_are_inside_the_file(fmt, tmp_path):
    """By hand: a linear policy on normalized observations (x - mean) / std clipped to +-10, its
    actions clipped to bounds of their own per dimension; outputs far outside them, inputs far from
    the mean, on float64 observations (the file casts them)."""
    obs_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    act_space = gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([2.0, 0.5], np.float32))
    stats = RunningNormalizer((3,))
    stats.observe(np.random.default_rng(0).normal([1.0, -2.0, 0.5], [2.0, 0.1, 1.0], (500, 3)))
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -0.5, 0.0], [0.2, 0.3, -1.0]]))
        net.bias.copy_(torch.tensor([0.1, -0.2]))
    module = GreedyPolicy(net, act_space, ObsNormalization(stats)).eval().requires_grad_(False)
    example, dynamic = export.traced_inputs(obs_space)
    path = tmp_path / f"linear.{fmt}"
    if fmt == "onnx":
        path.write_bytes(export.onnx_bytes(module, example, dynamic, {"algo": "linear"}))
    else:
        torch.export.save(torch.export.export(module, example, dynamic_shapes=dynamic), path)
    obs = np.random.default_rng(1).normal(0.0, 3.0, (50, 3))
    x = np.clip((obs.astype(np.float32) - stats.mean.numpy()) / stats.std.numpy(), -10, 10)
    assert (np.abs(x) == 10).any()  # some inputs clipped
    raw = x @ net.weight.numpy().T + net.bias.numpy()
    expected = np.clip(raw, act_space.low, act_space.high)
    assert (expected != raw).any(axis=0).all()  # every action dimension clipped somewhere
    np.testing.assert_allclose(actor(fmt, path)(obs), expected, rtol=0, atol=1e-5)


def test_qlearning_exports_its_table_as_npy_with_a_sidecar(trained, tmp_path):
    run_dir = trained("qlearning")
    out, meta = export.export(run_dir, "npy", out=tmp_path / "taxi.npy")
    policy = p2prl.load(run_dir)
    table = np.load(out)
    assert np.array_equal(table, checkpoint.load(policy.checkpoint)["q_table"].numpy())
    states = np.arange(policy.observation_space.n)
    assert np.array_equal(table[states].argmax(1), policy.act(states))
    side = json.loads((tmp_path / "taxi.json").read_text())
    assert side == meta and side["algo"] == "qlearning" and side["step"] == 256
    assert side["observation_space"] == {"type": "Discrete", "n": 500, "dtype": "int64"}


def test_the_command_writes_beside_the_run_by_default(trained):
    run_dir = trained("ppo")
    p = subprocess.run([sys.executable, "-m", "p2prl", "export", str(run_dir), "--format", "pt2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = run_dir / "export" / "step_256.pt2"
    assert p.stdout == f"{out}: algo=ppo on CartPole-v1, step 256; obs (B, 4) float32 -> action (B,) int64\n"
    assert out.is_file()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# (arguments, the one line); {ppo}, {qlearning}, {tmp} are filled in by the test.
BAD = [
    (["{tmp}/no_such_run", "--format", "pt2"],
     "p2prl: error: run_dir={tmp}/no_such_run: no summary.json or .hydra/config.yaml: not a p2prl run dir"),
    (["{ppo}", "--format", "tflite"], "p2prl: error: --format=tflite: allowed: onnx, pt2, npy"),
    (["{ppo}", "--format", "npy"], "p2prl: error: --format=npy: algo=ppo learns a network; allowed: onnx, pt2"),
    (["{qlearning}", "--format", "onnx"],
     "p2prl: error: --format=onnx: algo=qlearning learns a table, not a network; allowed: npy"),
    (["{qlearning}", "--format", "pt2"],
     "p2prl: error: --format=pt2: algo=qlearning learns a table, not a network; allowed: npy"),
    (["{ppo}", "--format", "pt2", "--checkpoint", "best"],
     "p2prl: error: checkpoint=best: {ppo} has no checkpoints/best.pt (training keeps one with "
     "train.eval_every_steps); allowed here: latest, or a checkpoint file"),
    (["{ppo}", "--format", "pt2", "--out", "{tmp}"],
     "p2prl: error: --out={tmp}: is a directory; allowed: the path of the file to write"),
]


@pytest.mark.parametrize("args,line", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, line, trained, tmp_path, capsys):
    names = {"ppo": trained("ppo"), "qlearning": trained("qlearning"), "tmp": tmp_path}
    before = {k: _snapshot(v) for k, v in names.items()}
    assert export.main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err
    assert err == line.format(**names) + "\n"
    assert {k: _snapshot(v) for k, v in names.items()} == before


def test_onnx_without_the_extra_is_refused(trained, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    assert export.main([str(trained("ppo")), "--format", "onnx"]) == 2
    assert capsys.readouterr().err == ('p2prl: error: --format=onnx: needs the onnx extra (onnx, onnxscript missing): '
                                       'pip install -e ".[onnx]"; allowed here: pt2\n')


def test_validation_md_lists_each_refusal():
    doc = (ROOT / "docs" / "validation.md").read_text()
    for _, line in BAD[1:5]:  # the lines without a path in them, verbatim
        assert f"`{line}`" in doc, line
    assert '`p2prl: error: --format=onnx: needs the onnx extra (onnx, onnxscript missing): pip install -e ".[onnx]"; ' \
           'allowed here: pt2`' in doc
