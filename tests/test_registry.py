"""The algorithm registry: a tiny algorithm from the test suite registered and trained on 2 spawned gloo
peers through the runner; refusals read the registry; Discrete spaces that do not start at 0."""
import dataclasses
import json
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch

from p2prl import algos, checkpoint
from p2prl.algos.base import Algorithm, Peer
from p2prl.checks import ConfigError
from p2prl.collect import Collector
from p2prl.comm import LocalComm
from p2prl.runner import build_algorithm, run
from p2prl.sync.optim import FlatAdam

pytestmark = pytest.mark.timeout(120)


@dataclass
class TinyConfig:
    name: str
    lr: float
    num_envs: int
    num_steps: int


class MeanReward(Algorithm):
    """Acts at random and learns, by gradient, the mean reward per step over all peers' envs."""

    def __init__(self, cfg: TinyConfig, collector: Collector, peer: Peer) -> None:
        self.cfg, self.collector, self.clock = cfg, collector, peer.clock
        self.estimate = torch.nn.Parameter(torch.zeros(1))
        self.learner = peer.learner([self.estimate], lambda p: FlatAdam(p, lr=cfg.lr), None, ("loss",))
        self.rng = peer.rng("explore")
        self.rewards = np.zeros((cfg.num_steps, cfg.num_envs))

    def sample(self, progress: float) -> None:
        c = self.collector
        for t in c.rollout(self.cfg.num_steps):
            with self.clock("inference"):
                actions = self.rng.integers(0, 2, c.num_envs)
            self.rewards[t] = c.step(actions).rewards

    def learn(self, progress: float) -> dict[str, float]:
        with self.clock("forward"):
            loss = (self.estimate - torch.as_tensor(self.rewards.mean(), dtype=torch.float32)).pow(2).sum()
        self.learner.step(loss, {"loss": loss.detach()})
        self.learner.finish()
        return {**self.learner.take_means(), "estimate": float(self.estimate)}

    def shared_tensors(self) -> list[torch.Tensor]:
        return [self.estimate]

    def state_dict(self) -> dict:
        return {"model": {"estimate": self.estimate.detach().clone()}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.estimate.copy_(state["model"]["estimate"])


TINY = algos.AlgorithmSpec(TinyConfig, MeanReward, observations=(gym.spaces.Box,), actions=(gym.spaces.Discrete,),
                           policy=lambda cfg, state, obs_space, act_space, device: (
                               lambda obs, deterministic, rng: np.zeros(len(obs), dtype=np.int64)),
                           fixed_on_resume=(), hint="")
algos.register("mean_reward", TINY)  # at import: spawned peers import this module too


def tiny_config(compose, **keys):
    base = compose("env=cartpole", "train.total_steps=640", "train.target_return=null", "train.log_every_steps=64",
                   "checkpoint.every_steps=320", "comm.timeout_s=30")
    return dataclasses.replace(base, algo=TinyConfig(**{"name": "mean_reward", "lr": 0.1, "num_envs": 2,
                                                        "num_steps": 16, **keys}))


def _train(rank: int, cfg, run_dir):
    summary = run(cfg, run_dir)
    return summary, float(build_algorithm(cfg, LocalComm()).estimate)


def test_a_registered_algorithm_trains_on_two_peers(tmp_path, compose, peers):
    cfg = tiny_config(compose)
    run_dir = tmp_path / "run"
    (s0, fresh), (s1, _) = peers(_train, 2, cfg, run_dir)
    assert s0["world_size"] == s1["world_size"] == 2 and s0["final_step"] == s1["final_step"] == 640
    saved = checkpoint.load(checkpoint.shared_path(run_dir / "checkpoints", 640))
    # Every iteration applied one averaged update; CartPole pays 1 per step, so the estimate rose toward 1.
    assert saved["learner"]["updates"] == 640 // (2 * 2 * 16)
    assert fresh == 0.0 and 0.5 < float(saved["model"]["estimate"]) <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["estimate"] == pytest.approx(float(saved["model"]["estimate"]))
    assert json.loads((run_dir / "summary.json").read_text())["config"]["algo"]["name"] == "mean_reward"


def test_spaces_are_checked_against_the_registry():
    box, disc = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(4)
    algos.check_spaces("mean_reward", box, disc)
    with pytest.raises(ConfigError, match=r"algo=mean_reward: needs Discrete actions, the env has Box"):
        algos.check_spaces("mean_reward", box, box)
    with pytest.raises(ConfigError, match=r"algo.name=nosuch: allowed: .*mean_reward"):
        algos.spec("nosuch")


def test_what_a_spec_declares_is_what_config_resume_and_precheck_use(compose, monkeypatch):
    from p2prl.config import upgrade
    from p2prl.precheck import preflight
    from p2prl.resume import _same_ranks, rank_keys

    def refuse(algo, space):
        raise ConfigError("algo.num_steps", algo.num_steps, "refused by the spec's observation check")
    monkeypatch.setitem(algos.REGISTRY, "mean_reward", dataclasses.replace(
        TINY, rank_keys=("num_envs", "num_steps"), added_keys={"lr": 0.1}, check_observations=refuse))
    cfg = tiny_config(compose)
    assert rank_keys("mean_reward")[:2] == ("algo.num_envs", "algo.num_steps")
    assert rank_keys("dqn")[:2] == ("algo.num_envs", "algo.n_step") and rank_keys("ppo")[1] == "env.max_episode_steps"
    saved = cfg.to_dict()
    assert _same_ranks({"config": saved, "world_size": 1}, cfg, 1)
    assert not _same_ranks({"config": saved, "world_size": 1}, dataclasses.replace(
        cfg, algo=dataclasses.replace(cfg.algo, num_steps=8)), 1)  # its own rank key changed
    del saved["algo"]["lr"]  # a run saved before the key was added
    assert upgrade(saved, algos.algo_sections(), algos.added_keys())["algo"]["lr"] == 0.1
    with pytest.raises(ConfigError, match="refused by the spec's observation check"):
        preflight(cfg, None)


# -- Discrete spaces that do not start at 0 --------------------------------------------------------
class Shifted(gym.Env):
    """Observations Discrete(3, start=10) or a Box; actions Discrete(2, start=-1); refuses anything else."""

    action_space = gym.spaces.Discrete(2, start=-1)

    def __init__(self, box: bool = False) -> None:
        self.box = box
        self.observation_space = gym.spaces.Box(-1, 1, (2,)) if box else gym.spaces.Discrete(3, start=10)

    def _obs(self):
        return np.full(2, self.t / 10, dtype=np.float32) if self.box else 10 + self.t % 3

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(action), f"action {action} is not in {self.action_space}"
        self.t += 1
        return self._obs(), float(action == 0), self.t >= 5, False, {}


gym.register("p2prl-test/Shifted-v0", entry_point=Shifted, max_episode_steps=50)


@pytest.mark.parametrize("algo, box", [("ppo", True), ("dqn", True), ("qlearning", False)])
def test_discrete_spaces_starting_elsewhere_than_0(algo, box, compose):
    cfg = compose(f"algo={algo}", "env.id=p2prl-test/Shifted-v0", f"+env.kwargs.box={str(box).lower()}",
                  "algo.num_envs=2")
    a = build_algorithm(cfg, LocalComm())
    for i in range(3):  # the env asserts every action is in Discrete(2, start=-1)
        a.sample(i / 3)
        a.learn(i / 3)
    if algo == "qlearning":
        assert a.q.shape == (3, 2) and a.q.any()  # states 10, 11, 12 index rows 0, 1, 2
