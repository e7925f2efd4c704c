"""`p2prl.load(run_dir)`: a trained run's policy from Python, without a process group, for every
algorithm: one observation or a batch, the greedy action computed by hand from the checkpoint, and
exploring actions drawn from the policy's own generator."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import p2prl
from p2prl import checkpoint
from p2prl.checks import ConfigError
from p2prl.nets import ActorCritic, QNetwork
from p2prl.runner import run

pytestmark = pytest.mark.timeout(180)
TINY = ["train.total_steps=256", "train.log_every_steps=256", "train.target_return=null"]
PPO = ["algo.num_envs=2", "algo.num_steps=32", "algo.num_minibatches=2", "algo.update_epochs=2"]
RUNS = {
    "ppo": ["algo=ppo", *PPO],
    "ppo-continuous": ["algo=ppo", "env=pendulum", *PPO, "algo.norm_obs=true"],
    "dqn": ["algo=dqn", "algo.learning_starts=64", "algo.batch_size=16", "algo.buffer_size=500", "algo.eps_end=0.2"],
    "qlearning": ["algo=qlearning", "env=taxi", "algo.num_envs=2", "algo.sync_every=16"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run dir of a tiny run of each kind, trained once for the module."""
    from p2prl.precheck import compose
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind) / "run"
            run(compose(*RUNS[kind], *TINY), made[kind])
        return made[kind]
    return get


def by_hand(run_dir, obs: np.ndarray) -> np.ndarray:
    """The greedy actions (B, ...) of a batch of observations, from the latest checkpoint's tensors."""
    policy = p2prl.load(run_dir)
    cfg, state = policy.config.algo, checkpoint.load(policy.checkpoint)
    if "q_table" in state:
        return state["q_table"].numpy()[obs].argmax(1)
    x = torch.as_tensor(obs, dtype=torch.float32)
    if "obs_norm" in state:  # (x - mean) / sqrt(var + 1e-8), clipped to +-10, as the sampler normalizes
        n = state["obs_norm"]
        var = n["m2"] / n["count"]
        x = ((x - n["mean"].float()) / torch.sqrt(var + 1e-8).float()).clamp(-10, 10)
    spaces = policy.observation_space, policy.action_space
    with torch.no_grad():
        if cfg.name == "dqn":
            q = QNetwork(spaces[0], int(spaces[1].n), cfg.hidden_sizes, cfg.activation)
            q.load_state_dict(state["model"])
            return q(x).argmax(1).numpy()
        model = ActorCritic(*spaces, cfg.hidden_sizes, cfg.activation)
        model.load_state_dict(state["model"])
        out = model.actor(x)
    return out.argmax(1).numpy() if model.discrete else np.clip(out.numpy(), spaces[1].low, spaces[1].high)


def observations(policy, n: int) -> np.ndarray:
    env = policy.make_env()
    obs = [env.reset(seed=i)[0] for i in range(n)]
    env.close()
    return np.stack(obs) if policy.observation_space.shape else np.asarray(obs)


@pytest.mark.parametrize("kind", list(RUNS))
def test_load_acts_on_one_observation_and_on_a_batch_as_the_greedy_policy(kind, trained):
    run_dir = trained(kind)
    policy = p2prl.load(run_dir)
    assert policy.checkpoint.name == "step_256.pt"
    batch = observations(policy, 6)
    actions = policy.act(batch)
    space = policy.action_space
    assert isinstance(actions, np.ndarray) and actions.shape == (6, *space.shape)
    np.testing.assert_allclose(actions, by_hand(run_dir, batch), rtol=1e-6, atol=1e-6)
    for obs, a in zip(batch, actions):
        one = policy.act(obs)
        assert np.shape(one) == space.shape and space.contains(one)
        np.testing.assert_allclose(one, a, rtol=1e-6, atol=1e-6)
    env = policy.make_env()  # the README's lines: an env as trained, stepped with the policy's actions
    obs, _ = env.reset(seed=0)
    env.step(policy.act(obs))
    env.close()
    assert not torch.distributed.is_initialized()


def test_ppo_samples_its_distribution_with_its_own_generator(trained):
    run_dir = trained("ppo")
    policy = p2prl.load(run_dir, seed=7)
    obs = observations(policy, 1)[0]
    many = np.repeat(obs[None], 4000, 0)
    first = policy.act(many, deterministic=False)
    torch.manual_seed(0)  # the global streams play no part
    assert np.array_equal(first, p2prl.load(run_dir, seed=7).act(many, deterministic=False))
    cfg, state = policy.config.algo, checkpoint.load(policy.checkpoint)
    model = ActorCritic(policy.observation_space, policy.action_space, cfg.hidden_sizes, cfg.activation)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        probs = torch.softmax(model.actor(torch.as_tensor(obs[None], dtype=torch.float32)), -1)[0].numpy()
    freq = np.bincount(first, minlength=len(probs)) / len(first)
    assert np.abs(freq - probs).max() < 0.03, (freq, probs)


@pytest.mark.parametrize("kind", ["dqn", "qlearning"])
def test_value_based_policies_explore_with_the_final_epsilon(kind, trained):
    run_dir = trained(kind)
    policy = p2prl.load(run_dir, seed=1)
    batch = np.repeat(observations(policy, 1), 4000, 0)
    greedy = policy.act(batch)
    explored = policy.act(batch, deterministic=False)
    eps, n = policy.config.algo.eps_end, policy.action_space.n
    # A random action (uniform over n) replaces the greedy one with probability eps.
    assert abs((explored != greedy).mean() - eps * (n - 1) / n) < 0.03


def test_load_refuses_what_it_cannot_load(trained, tmp_path):
    run_dir = trained("ppo")
    with pytest.raises(ConfigError, match="checkpoint=best: .* has no checkpoints/best.pt"):
        p2prl.load(run_dir, checkpoint="best")
    with pytest.raises(ConfigError, match="not a p2prl run dir"):
        p2prl.load(tmp_path)
    with pytest.raises(ValueError, match=r"obs of shape \(3,\): expected \(4,\)"):
        p2prl.load(run_dir).act(np.zeros(3))
    rank_file = next((run_dir / "checkpoints" / "rank0").glob("step_*.pt"))
    with pytest.raises(ConfigError, match="is not a shared checkpoint of a p2prl run"):
        p2prl.load(run_dir, checkpoint=rank_file)
    other = next((trained("dqn") / "checkpoints").glob("step_*.pt"))  # another run's: a Q-network
    with pytest.raises(ConfigError, match="was trained with algo=dqn on CartPole-v1, this run is algo=ppo"):
        p2prl.load(run_dir, checkpoint=other)
    wider = torch.load(next((run_dir / "checkpoints").glob("step_*.pt")), weights_only=True)
    wider["model"] = {k: torch.cat([v, v]) for k, v in wider["model"].items()}  # the same run, other shapes
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(ConfigError, match="does not fit this run's model: Error\\(s\\) in loading state_dict"):
        p2prl.load(run_dir, checkpoint=tmp_path / "wider.pt")


def test_import_p2prl_stays_cheap():
    for code, torch_imported in (("import sys, p2prl", False), ("import sys, p2prl; p2prl.load", True)):
        out = subprocess.run([sys.executable, "-c", f"{code}; print('torch' in sys.modules)"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == str(torch_imported), out.stderr
