"""Bad input (docs/validation.md): one line naming the key and what is allowed, exit 2, before training,
on every peer, and nothing of an existing run overwritten."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from p2prl.checkpoint import save_atomic
from p2prl.resume import FORMAT
from p2prl.launch import check_command_line

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        "train.total_steps=128", "train.log_every_steps=64", "train.target_return=null"]

# (overrides, what the line must contain); {tmp} is the test's tmp dir, prepared by `fixtures`.
BAD = [
    (["env=nosuchenv"], ["env=nosuchenv", "allowed: acrobot, breakout, cartpole"]),
    (["env=CartPole-v1"], ["env=CartPole-v1: unknown env", "(a gymnasium id: env=gym env.id=CartPole-v1)"]),
    (["algo=nosuchalgo"], ["algo=nosuchalgo", "allowed: a2c, dqn, ppo"]),
    (["comm=nosuchcomm"], ["comm=nosuchcomm", "allowed: allreduce"]),
    (["checkpoint=nosuch"], ["checkpoint=nosuch", "allowed: default"]),
    (["device=tpu"], ["device=tpu", "allowed: auto, cpu, cuda"]),
    (["device=cuda"], ["device=cuda", "needs a CUDA GPU, found none; allowed here: auto, cpu"]),
    (["comm.topology=ring"], ["comm.topology=ring", "allowed: auto, flat, hierarchical"]),
    (["algo=qlearning", "env=taxi", "comm=gossip"],
     ["comm=gossip", "algo=qlearning cannot share its updates this way; allowed: allreduce"]),
    (["comm=gossip", "comm.overlap=true"], ["comm.overlap=true", "only comm=allreduce overlaps", "allowed: false"]),
    (["comm=param_server", "comm.compress=int8"],
     ["comm.compress=int8", "only comm=allreduce or comm=local_sgd compresses its sums, not comm=param_server",
      "allowed: none"]),
    (["comm=gossip", "comm.compress=lowrank"], ["comm.compress=lowrank", "not comm=gossip", "allowed: none"]),
    (["comm.overlap=true", "comm.compress=int8"], ["comm.compress=int8", "blocking sums only", "allowed here: none"]),
    (["algo=qlearning", "env=taxi", "comm.compress=int8"],
     ["comm.compress=int8", "algo=qlearning sums exact tables, not gradients", "allowed: none"]),
    (["comm.compress_rank=0"], ["comm.compress_rank=0", "positive integer"]),
    (["comm=gossip", "comm.graph=flat"], ["comm.graph=flat", "allowed: ring, hypercube"]),
    (["comm=gossip", "comm.topology=ring"], ["comm.topology=ring", "allowed: auto, flat, hierarchical"]),
    (["comm.outer_momentum=1"], ["comm.outer_momentum=1", "must be in [0, 1)"]),
    (["comm.straggler_frac=0"], ["comm.straggler_frac=0", "must be in (0, 1]"]),
    (["comm.min_rollout_frac=0"], ["comm.min_rollout_frac=0", "must be in (0, 1]"]),
    (["comm.compress=fp8"], ["comm.compress=fp8", "allowed: none, bf16, int8, lowrank"]),
    (["env=gym"], ["env.id=???", "env=gym needs the gymnasium id to train on"]),
    (["env.wrapper=mujoco"], ["env.wrapper=mujoco", "allowed: none, atari"]),
    (["env.terminal_on_life_loss=true"], ["env.terminal_on_life_loss=true", "needs env.wrapper=atari"]),
    (["env.frame_stack=0"], ["env.frame_stack=0", "positive integer"]),
    (["env.vectorization=threads"], ["env.vectorization=threads", "allowed: sync, async, envpool"]),
    (["env.vectorization=envpool", "env.frame_stack=4"],
     ["env.vectorization=envpool: steps EnvPool's own envs, without p2prl's wrappers",
      "allowed here (env.frame_stack=4): sync, async"]),
    (["algo.log_std_init=nan"], ["algo.log_std_init=nan", "must be a number"]),
    (["algo.encoder=cnn"], ["algo.encoder=cnn", "needs uint8 image observations", "allowed: auto, mlp"]),
    (["algo.encoder=resnet"], ["algo.encoder=resnet", "allowed: auto, mlp, cnn"]),
    (["env=gym", "env.id=nosuchmodule:Foo-v0"], ["env.id=nosuchmodule:Foo-v0", "needs the module nosuchmodule"]),
    (["comm.average_every=0"], ["comm.average_every=0", "positive integer"]),
    (["algo=dqn", "comm.straggler_frac=0.5"], ["comm.straggler_frac=0.5", "algo=dqn does not collect rollouts", "allowed: null"]),
    (["+nosuchsection=1"], ["nosuchsection=1", "unknown key; allowed: seed, device, algo, env, train, comm, checkpoint, logger"]),
    (["comm.backend=mpi"], ["comm.backend=mpi", "allowed: auto, gloo, nccl"]),
    (["env.id=NoSuchEnv-v9"], ["env.id=NoSuchEnv-v9", "not a registered gymnasium env"]),
    (["algo.nosuchkey=1"], ["algo.nosuchkey=1", "unknown key; allowed:"]),
    (["seed=-1"], ["seed=-1", "integer in [0, 2**31)"]),
    (["seed=4294967296"], ["seed=4294967296", "integer in [0, 2**31)"]),
    (["+env.kwargs.nosuchkwarg=1"], ["env.kwargs=", "rejected by CartPole-v1"]),
    (["algo.lr=-1"], ["algo.lr=-1", "positive number"]),
    (["algo.lr=0"], ["algo.lr=0", "positive number"]),
    (["algo.num_envs=0"], ["algo.num_envs=0", "positive integer"]),
    (["algo.gamma=1.5"], ["algo.gamma=1.5", "(0, 1]"]),
    (["train.total_steps=0"], ["train.total_steps=0", "positive integer"]),
    (["train.log_every_steps=-64"], ["train.log_every_steps=-64", "positive integer"]),
    (["train.max_skipped_updates=0"], ["train.max_skipped_updates=0", "positive integer"]),
    (["train.eval_every_steps=-1"], ["train.eval_every_steps=-1", "must be an integer >= 0"]),
    (["train.eval_every_steps=0.5"], ["train.eval_every_steps=0.5", "must be an integer >= 0"]),
    (["train.eval_episodes=0"], ["train.eval_episodes=0", "positive integer"]),
    (["train.profile_iterations=0"], ["train.profile_iterations=0", "positive integer"]),
    (["train.pin_cores=maybe"], ["train.pin_cores=maybe", "must be true or false"]),
    (["comm.timeout_s=0"], ["comm.timeout_s=0", "positive number"]),
    (["comm.timeout_s=-5"], ["comm.timeout_s=-5", "positive number"]),
    (["checkpoint.every_steps=-5"], ["checkpoint.every_steps=-5", "positive integer"]),
    (["checkpoint.keep=1"], ["checkpoint.keep=1", "integer >= 2"]),
    (["algo.num_envs=3", "algo.num_steps=5", "algo.num_minibatches=4"],
     ["algo.num_minibatches=4", "must divide the per-peer batch algo.num_envs*algo.num_steps=15"]),
    (["algo.activation=sigmoid"], ["algo.activation=sigmoid", "allowed: tanh, relu"]),
    (["env.id=FrozenLake-v1"], ["algo=ppo", "needs Box observations, the env has Discrete(16)"]),
    (["algo=dqn", "env=pendulum"], ["algo=dqn", "needs Discrete actions"]),
    (["algo=sac", "env=cartpole"], ["algo=sac: needs Box actions, the env has Discrete(2); use algo=ppo or algo=dqn"]),
    (["algo=td3", "env=taxi"], ["algo=td3: needs Box observations, the env has Discrete(500)"]),
    (["algo=sac", "env=gym", "env.id=p2prl-test/UnboundedPendulum-v0"],
     ["algo=sac: squashes actions into the env's bounds, which must be finite; the env has Box(-inf, inf"]),
    (["algo=sac", "algo.batch_size=64", "algo.buffer_size=32"], ["algo.batch_size=64", "must be <= algo.buffer_size=32"]),
    (["algo=td3", "algo.policy_delay=0"], ["algo.policy_delay=0", "positive integer"]),
    (["algo=sac", "algo.alpha_init=0"], ["algo.alpha_init=0", "positive number"]),
    (["algo=sac", "env=pendulum", "comm.overlap=true"],
     ["comm.overlap=true", "cannot overlap updates in two parts", "allowed here: false, or set algo.actor_after_critics=false"]),
    (["algo=td3", "algo.actor_after_critics=maybe"], ["algo.actor_after_critics=maybe", "true or false"]),
    (["comm.backend=nccl"], ["comm.backend=nccl", "nccl needs one CUDA GPU per local peer", "allowed here: auto, gloo"]),
    (["hydra.run.dir={tmp}/a_file/run"], ["hydra.run.dir=", "a_file is a file; allowed: a writable directory"]),
    (["hydra.run.dir=/proc/p2prl_no_such_dir/run"],  # root passes os.access there; nobody can make a directory
     ["hydra.run.dir=/proc/p2prl_no_such_dir/run: ", "allowed: a writable directory"]),
    (["train.resume={tmp}/no_such_run"], ["train.resume=", "no_such_run: is missing; allowed: auto, never"]),
    (["train.resume={tmp}/acrobot_run"], ["train.resume=", "belongs to another run (algo=ppo env=acrobot "
                                          "(Acrobot-v1); this run is algo=ppo env=cartpole (CartPole-v1))"]),
    (["train.resume={tmp}/corrupt.pt"], ["train.resume=", "corrupt.pt: no readable checkpoint there"]),
    (["hydra.run.dir={tmp}/acrobot_run"], ["train.resume=auto", "belongs to another run (algo=ppo env=acrobot"]),
    (["train.resume="], ["train.resume=", "allowed: auto, never"]),
    (["algo.lr=1e-3,-1", "-m", "hydra.sweep.dir={tmp}/sweep"], ["algo.lr=-1", "positive number"]),
    (["-m", "algo.lr=tag(log, interval(1e-4, 1e-2))", "hydra.sweep.dir={tmp}/sweep"],
     ["algo.lr=tag(log, interval(1e-4, 1e-2)): Hydra's basic sweeper lists its jobs", "hydra/sweeper=optuna"]),
    (["train.objective=loss"], ["train.objective=loss", "allowed: episode_return_mean, best_eval_return, steps_to_target"]),
    (["train.objective=best_eval_return"], ["train.objective=best_eval_return", "needs evaluations during training "
                                            "(train.eval_every_steps); allowed here: episode_return_mean, steps_to_target"]),
    (["train.objective=steps_to_target", "train.target_return=null"],
     ["train.objective=steps_to_target: needs a train.target_return; allowed here: episode_return_mean"]),
    (["logger=nosuch"], ["logger=nosuch", "unknown logger; allowed: tensorboard, wandb"]),
    (["logger.mode=sometimes"], ["logger.mode=sometimes", "allowed: online, offline, disabled"]),
    (["logger.tags=notalist"], ["logger.tags=notalist", "must be a list of names"]),
    (["algo.clip_reward=-1"], ["algo.clip_reward=-1", "positive number"]),
    (["hydra.run.dir={tmp}/cartpole_run", "algo.hidden_sizes=[32]"],
     ["algo.hidden_sizes=[32]: cannot change on resume", "was trained with [64, 64]", "train.resume=never"]),
    (["hydra.run.dir={tmp}/cartpole_run", "algo.norm_obs=true"],
     ["algo.norm_obs=true: cannot change on resume", "was trained with false"]),
    (["train.resume={tmp}/cartpole_run", "algo.optimizer=rmsprop"],
     ["algo.optimizer=rmsprop: cannot change on resume", "was trained with adam"]),
    (["hydra.run.dir={tmp}/cartpole_run", "+env.kwargs.sutton_barto_reward=true"],
     ["env.kwargs={'sutton_barto_reward': True}: cannot change on resume", "was trained with {}"]),
    (["hydra.run.dir={tmp}/old_run"], ["train.resume=auto", "holds checkpoints of an earlier p2prl version",
                                       "train.resume=never"]),
]


def _unbounded_pendulum(**kwargs):
    """Pendulum with actions declared unbounded (the env clips them itself)."""
    env = gym.make("Pendulum-v1", **kwargs)
    return gym.wrappers.TransformAction(env, lambda a: a, gym.spaces.Box(-np.inf, np.inf, (1,), np.float32))


gym.register("p2prl-test/UnboundedPendulum-v0", entry_point=_unbounded_pendulum)


def fixtures(tmp: Path) -> None:
    (tmp / "a_file").write_text("not a directory")
    acrobot = {"config": {"algo": {"name": "ppo"}, "env": {"name": "acrobot", "id": "Acrobot-v1"}}, "step": 64}
    save_atomic(acrobot, tmp / "acrobot_run" / "checkpoints" / "step_64.pt")
    (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04 not a zip")
    cartpole = {"config": {"algo": {"name": "ppo", "hidden_sizes": [64, 64], "norm_obs": False, "optimizer": "adam"},
                           "env": {"name": "cartpole", "id": "CartPole-v1", "kwargs": {}}}, "step": 64,
                "format": FORMAT}
    save_atomic(cartpole, tmp / "cartpole_run" / "checkpoints" / "step_64.pt")
    save_atomic({**cartpole, "format": 1}, tmp / "old_run" / "checkpoints" / "step_64.pt")


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_anything_is_written(args, expected, tmp_path):
    if ("comm.backend=nccl" in args or "device=cuda" in args) and torch.cuda.is_available():
        pytest.skip("valid on a machine with CUDA")
    fixtures(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("hydra.") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    before = _snapshot(tmp_path)
    error = check_command_line(args)  # what `python -m p2prl.train` prints after "p2prl: error: ", exit 2
    assert error is not None and "\n" not in error, error
    for text in expected:
        assert text in error, error
    assert _snapshot(tmp_path) == before


def test_the_command_line_ends_with_exit_2_and_the_one_line(tmp_path, cli):
    fixtures(tmp_path)
    p = cli([f"hydra.run.dir={tmp_path / 'cartpole_run'}", "algo.hidden_sizes=[32]"], timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("p2prl: error: algo.hidden_sizes=[32]: cannot change on resume"), p.stderr


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_bad_run_pointed_at_an_existing_run_overwrites_nothing(tmp_path, torchrun):
    run_dir = tmp_path / "run"
    good = subprocess.run([sys.executable, "-m", "p2prl.train", *TINY, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert good.returncode == 0, good.stderr
    before = _snapshot(run_dir)
    assert {"metrics.jsonl", "summary.json", "checkpoints/step_128.pt", "checkpoints/rank0/step_128.pt"} <= set(before)
    # A bad value on one peer, and (under torchrun) a run of another env with train.resume=auto.
    bad = subprocess.run([sys.executable, "-m", "p2prl.train", *TINY, "algo.lr=-1", f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    job = torchrun.start([*TINY, "env=acrobot", f"hydra.run.dir={run_dir}"])
    out = torchrun.finish(job, 90)
    assert job.returncode == 1, out  # torchrun reports its workers' failure as 1
    assert out.count("p2prl: error: train.resume=auto") == 1 and "belongs to another run" in out, out
    assert out.count("exitcode  : 2") == 2, out  # every peer exited 2
    assert _snapshot(run_dir) == before


def test_configs_that_differ_between_peers_are_refused_naming_the_keys(tmp_path, torchrun):
    job = torchrun.start(["seed='${oc.decode:${oc.env:RANK}}'", *TINY, f"hydra.run.dir={tmp_path / 'run'}"])
    out = torchrun.finish(job, 90)
    assert job.returncode == 1
    assert out.count("p2prl: error: config=differs between peers") == 1, out
    assert "differing keys: seed" in out and out.count("exitcode  : 2") == 2, out
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_created_is_one_line_and_exit_2(cli):
    p = cli(["hydra.run.dir=/proc/p2prl_no_such_dir/run"], timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("p2prl: error: hydra.run.dir=/proc/p2prl_no_such_dir/run: "), p.stderr


# A sweeper that hands each peer other overrides (as one drawing from each process's own RNG would).
RANK_SWEEPER = """
import os
from dataclasses import dataclass
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


@dataclass
class RankSweeperConf:
    _target_: str = "hydra_plugins.rank_sweeper.RankSweeper"
    max_batch_size: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="rank", node=RankSweeperConf)


class RankSweeper(BasicSweeper):
    def sweep(self, arguments):
        return super().sweep([*arguments, f"algo.lr={(1 + int(os.environ['RANK'])) / 1000}"])
"""


def test_sweeper_jobs_that_differ_between_peers_are_refused_at_once(tmp_path, port):
    (tmp_path / "hydra_plugins").mkdir()  # a namespace package: Hydra finds plugins in it
    (tmp_path / "hydra_plugins" / "rank_sweeper.py").write_text(RANK_SWEEPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]])}
    # The peers must meet within seconds, not after comm.timeout_s (300 s; the wait below ends at 90 s).
    p = subprocess.run([sys.executable, "-m", "p2prl.torchrun", "--nnodes=1", "--nproc_per_node=2",
                        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "p2prl.train", "-m",
                        "hydra/sweeper=rank", *TINY, "comm.timeout_s=300", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert out.count("p2prl: error: ") == 1 and "Traceback" not in out, out[-3000:]
    assert "p2prl: error: config=differs between peers: " in out and "differing keys: algo.lr" in out, out[-3000:]


def test_a_peer_missing_from_a_start_up_check_is_named_in_one_line(monkeypatch, port):
    import torch.distributed as dist
    from p2prl.comm import StartTimeout
    from p2prl.comm.store import gather_before_start
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # torchrun's agent's
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(StartTimeout) as e:
        gather_before_start(0, 3, {"error": None}, 0.2, "job-7")  # ranks 1 and 2 never come
    assert str(e.value) == ("the start-up check 'job-7' timed out after comm.timeout_s=0.2: rank(s) 1, 2 never "
                            "reached it (stuck, or running other jobs than this peer)")
    del store


def test_hypercube_gossip_needs_a_power_of_two_peers(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    error = check_command_line(["comm=gossip", "comm.graph=hypercube", f"hydra.run.dir={tmp_path / 'run'}"])
    assert error == "comm.graph=hypercube: needs a power of two peers, here 3; allowed: ring"


def test_logger_wandb_needs_the_wandb_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    error = check_command_line(["logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"])
    assert error == ('logger=wandb: needs the wandb package: pip install -e ".[wandb]" (on every node); '
                     "allowed here: tensorboard")


def test_envpool_where_it_is_not_installed(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "envpool" else real(name, *a))
    error = check_command_line(["env.vectorization=envpool", f"hydra.run.dir={tmp_path / 'run'}"])
    assert error == "env.vectorization=envpool: envpool is not installed (pip install envpool); allowed: sync, async"


@pytest.mark.skipif(importlib.util.find_spec("envpool") is None, reason="envpool is not installed")
def test_envpool_refuses_envs_it_lacks_and_keywords_it_does_not_take(tmp_path):
    run = f"hydra.run.dir={tmp_path / 'run'}"
    error = check_command_line(["env=taxi", "algo=qlearning", "env.vectorization=envpool", run])
    assert error == "env.vectorization=envpool: EnvPool has no Taxi-v4; allowed here: sync, async"
    error = check_command_line(["+env.kwargs.sutton_barto_reward=true", "env.vectorization=envpool", run])
    assert error.startswith("env.kwargs={'sutton_barto_reward': True}: rejected by EnvPool's CartPole-v1: "), error
