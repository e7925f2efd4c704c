"""Elastic membership under torchrun (--nnodes=MIN:MAX, --max-restarts): a node that joins, or one that
leaves, makes torchrun restart every peer; they resume from the last complete checkpoint with the new
world size, and step, time_s and metrics.jsonl continue. Three "nodes" (one torchrun agent each, one
peer each) on this machine's loopback; node 0 hosts the rendezvous and stays up. Step budgets, not
targets, so a join cannot race the end."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2prl import checkpoint
from p2prl.comm import store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)
RUN = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
       "train.target_return=null", "train.log_every_steps=256", "checkpoint.every_steps=1024"]


class Nodes:
    def __init__(self, port: int, run_id: str, run_dir: Path, budget: int) -> None:
        self.port, self.run_id, self.run_dir, self.budget = port, run_id, run_dir, budget
        self.agents: dict[int, subprocess.Popen] = {}

    def start(self, node: int) -> None:
        env = {**os.environ, "NNODES": "2:3", "HEAD_ADDR": "127.0.0.1", "LOCAL_ADDR": "127.0.0.1",
               "NODE_RANK": str(node), "PORT": str(self.port), "RUN_ID": self.run_id, "MAX_RESTARTS": "3",
               "RDZV_CONF": "join_timeout=90,last_call_timeout=1",
               "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
        self.agents[node] = subprocess.Popen(
            ["bash", str(ROOT / "launch" / "multinode.sh"), *RUN, f"train.total_steps={self.budget}",
             f"hydra.run.dir={self.run_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_for_checkpoint(self, timeout: float, world_size: int) -> int:
        """The step of the first checkpoint written by `world_size` peers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = sorted(int(p.stem[5:]) for p in (self.run_dir / "checkpoints").glob("step_*.pt"))
            if steps:
                saved = checkpoint.load(checkpoint.shared_path(self.run_dir / "checkpoints", steps[-1]), warn=False)
                if saved is not None and saved["world_size"] == world_size:
                    return steps[-1]
            assert all(a.poll() is None for a in self.agents.values()), "a node ended before its first checkpoint"
            time.sleep(0.05)
        raise AssertionError("no checkpoint")

    def kill(self, node: int) -> None:
        os.killpg(self.agents[node].pid, signal.SIGKILL)  # the node's agent and its peer, at once
        self.agents[node].communicate()

    def finish(self, timeout: float) -> dict[int, str]:
        outs = {}
        for node, agent in self.agents.items():
            try:
                outs[node] = agent.communicate(timeout=timeout)[0] or ""
            except subprocess.TimeoutExpired:
                tails = self.close()
                raise AssertionError(f"node {node} did not finish; the last lines of each node: {tails}")
        return outs

    def close(self) -> dict[int, str]:
        """Kill the nodes still running; the last lines each printed (for a failure's message)."""
        tails = {}
        for node, agent in self.agents.items():
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
            try:
                tails[node] = "\n".join((agent.communicate()[0] or "").splitlines()[-25:])
            except ValueError:  # its output was read already
                pass
        return tails


@pytest.fixture
def nodes(tmp_path, port):
    made = []

    def make(budget: int) -> Nodes:
        made.append(Nodes(port, f"elastic-{os.getpid()}-{len(made)}", tmp_path / "run", budget))
        return made[-1]
    yield make
    for n in made:
        n.close()


def _check_run(run_dir: Path, outs: dict[int, str], world_size: int) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["world_size"] == world_size and s["final_step"] >= s["config"]["train"]["total_steps"], s
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps, times = [r["step"] for r in rows], [r["time_s"] for r in rows]
    assert steps == sorted(set(steps)) and times == sorted(times), "metrics.jsonl must stay unique and increasing"
    resumed = [int(m) for out in outs.values() for m in re.findall(r"resumed from \S+ at step (\d+)", out)]
    assert resumed and s["resumed_at_step"] in resumed, resumed
    return s


def test_a_node_that_joins_mid_run_makes_the_peers_resume_with_three(nodes):
    n = nodes(budget=24000)
    n.start(0)
    n.start(1)
    first = n.wait_for_checkpoint(90, world_size=2)
    n.start(2)
    outs = n.finish(200)
    assert all(a.returncode == 0 for a in n.agents.values()), {k: v[-2000:] for k, v in outs.items()}
    s = _check_run(n.run_dir, outs, world_size=3)
    assert s["resumed_at_step"] >= first
    assert "resuming a run of 2 peer(s) on 3" in outs[0] + outs[1] + outs[2]


def test_the_survivors_finish_when_a_node_leaves(nodes):
    n = nodes(budget=24000)
    for node in range(3):
        n.start(node)
    first = n.wait_for_checkpoint(120, world_size=3)
    n.kill(2)  # not the rendezvous host
    outs = n.finish(200)
    assert n.agents[0].returncode == 0 and n.agents[1].returncode == 0, {k: v[-2000:] for k, v in outs.items()}
    s = _check_run(n.run_dir, outs, world_size=2)
    assert s["resumed_at_step"] >= first


@pytest.mark.parametrize("agent_store", ["True", "False"])
def test_the_peers_of_one_attempt_share_its_keys_though_their_agents_counted_restarts_differently(
        monkeypatch, agent_store):
    """After a node leaves, one agent may count the restart (its peer failed) and another not (it only saw
    the new round). With a store per round both peers' keys must match; only a store that outlives the
    rounds (the agent's) needs the count (launch/multinode.sh gives restarts a store per round)."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", agent_store)
    monkeypatch.setenv("WORLD_SIZE", "2")
    keys = []
    for restarts in ("2", "3"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restarts)
        keys.append(store.namespace())
    if agent_store == "True":
        assert keys == ["p2prl/2-2", "p2prl/3-2"]
    else:
        assert keys == ["p2prl/0-2", "p2prl/0-2"]


@pytest.mark.parametrize("agent_store,nodes,restarts,warned", [
    ("True", "2", "3", True), ("True", "1", "3", False), ("True", "2", "0", False), ("False", "2", "3", False),
    ("True", "x", "3", False), ("True", "2", "", False)])
def test_a_shared_agent_store_on_several_restarting_nodes_is_named_as_a_hazard(agent_store, nodes, restarts, warned):
    """torchrun's default (agents share their store across rounds) with several nodes and restarts is where
    the counts can diverge: the peers are told how to avoid it, and only then."""
    env = {"TORCHELASTIC_USE_AGENT_STORE": agent_store, "GROUP_WORLD_SIZE": nodes, "TORCHELASTIC_MAX_RESTARTS": restarts}
    hazard = store.restart_hazard(env)
    assert (hazard is not None) == warned
    if warned:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in hazard and "2 nodes" in hazard and "--max-restarts=3" in hazard


def test_rank_0_alone_names_the_hazard_once(monkeypatch, caplog):
    monkeypatch.setattr(store, "connect", lambda timeout_s: object())
    monkeypatch.setattr(store, "_WARNED", [])
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, calls, warnings in (("1", 2, 0), ("0", 2, 1)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING", logger=store.__name__):
            for _ in range(calls):
                assert store.peers_store(1.0) is not None
        assert sum("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in r.getMessage() for r in caplog.records) == warnings
