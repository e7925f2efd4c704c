"""Two "hosts" that share only a network: two network namespaces joined by a veth pair, each with its
own address and its own /dev/shm (a private mount namespace), 2 peers each, started by
launch/multinode.sh with a c10d rendezvous on the first host's address; and two hosts of
p2prl.bench.netns whose head is given by name. The namespaces and links are created and removed by the
tests."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2prl.bench.netns import Star

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
                                 reason="network namespaces need root, iproute2 and unshare")]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """[(namespace, interface, address)] of two hosts on 10.213.<n>.0/24; removed afterwards."""
    tag = f"{os.getpid() % 100000}"
    subnet = os.getpid() % 200 + 20
    made = []
    try:
        _ip("link", "add", f"p2va{tag}", "type", "veth", "peer", "name", f"p2vb{tag}")
        out = []
        for i, side in enumerate("ab"):
            ns, dev, addr = f"p2prl-{tag}-h{i}", f"p2v{side}{tag}", f"10.213.{subnet}.{i + 1}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out.append((ns, dev, addr))
        yield out
    finally:
        for ns in made:  # deleting a namespace deletes the veth end inside it, and with it the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"p2va{tag}"], capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"p2prl-{tag}-" not in left, left


def start_host(ns: str, dev: str, head: str, port: int, run_id: str, overrides: list[str], nnodes: str = "2",
               extra_env: dict | None = None) -> subprocess.Popen:
    """launch/multinode.sh inside a namespace, with a private /dev/shm as on a real host."""
    env = {**os.environ, "NNODES": nnodes, "HEAD_ADDR": head, "IFNAME": dev, "NPROC_PER_NODE": "2",
           "PORT": str(port), "RUN_ID": run_id, "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
           **(extra_env or {})}
    script = 'mount -t tmpfs tmpfs /dev/shm && exec bash "$0" "$@"'
    return subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
                             "sh", "-c", script, str(ROOT / "launch" / "multinode.sh"), *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_all(jobs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    for job in jobs:
        try:
            outs.append(job.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for j in jobs:
                j.kill()
            raise AssertionError("a host's torchrun did not finish")
    return outs


def test_two_hosts_train_ppo_cartpole_to_its_target(hosts, tmp_path, port):
    run_dir = tmp_path / "run"
    head = hosts[0][2]
    jobs = [start_host(ns, dev, head, port, "two-hosts", ["algo=ppo", "env=cartpole", f"hydra.run.dir={run_dir}"])
            for ns, dev, _ in hosts]
    outs = finish_all(jobs, 200)
    assert [j.returncode for j in jobs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["reached"] and s["world_size"] == 4, s
    assert "hierarchically over 2 node(s) of 2/2 peer(s)" in outs[0], outs[0][-3000:]
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["rank0", "rank1", "rank2", "rank3"]
    assert all((ckpt / f"rank{r}" / f"step_{s['final_step']}.pt").is_file() for r in range(4))
    assert not any(p.name.startswith("p2prl") for p in Path("/dev/shm").iterdir())


TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        "train.total_steps=512", "train.log_every_steps=128", "train.target_return=null"]


def test_a_head_given_by_name_hosts_the_rendezvous(tmp_path, port):
    """HEAD_ADDR a host name, no NODE_RANK: the node it resolves to hosts the rendezvous (a string
    comparison with the node's address would tell every node not to host, and none would)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "NNODES": "2", "HEAD_ADDR": "p2prl-head", "NPROC_PER_NODE": "1", "PORT": str(port),
           "RUN_ID": "by-name", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    with Star(2, names={"p2prl-head": 0}) as star:
        jobs = [star.popen(h.index, ["bash", str(ROOT / "launch" / "multinode.sh"), *TINY, f"hydra.run.dir={run_dir}"],
                           cwd=ROOT, env={**env, "IFNAME": h.dev}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for h in star.hosts]
        outs = finish_all(jobs, 150)
    assert [j.returncode for j in jobs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_step"] == 512, s
