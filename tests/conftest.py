"""Shared fixtures: composed configs, real gloo peers, the command line, torchrun jobs.

- `compose(*overrides)`: the RunConfig `python -m p2prl.train <overrides>` would run (conf/'s defaults).
- `peers(fn, n, *args, timeout=60, per_node=0)`: calls `fn(rank, *args)` in n spawned processes that
  share one process group (torchrun's environment variables, p2prl's own `open_comm`; `per_node`
  groups them into pretend nodes); each rank's return value.
  A hang or crash fails the test within `timeout` seconds instead of blocking the suite.
- `cli(args, nproc=1, timeout=120)`: `python -m p2prl.train` (or torchrun with nproc peers) to the end.
- `torchrun`: starts `torchrun ... -m p2prl.train` in the background and finds, stops or kills its
  workers (Linux /proc); every job it started is killed at the end of the test.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from p2prl.bench import procs as proc_tree

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Spawned peers and subprocess runs import p2prl (and the test modules their functions live in) from
# the checkout, and show no progress bar.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), os.environ.get("PYTHONPATH")]))
os.environ["P2PRL_NO_PROGRESS"] = "1"

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    """A TCP port free on loopback now."""
    return free_port()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def compose() -> Callable[..., Any]:
    from p2prl.precheck import compose as compose_config
    return compose_config


# -- real peers ----------------------------------------------------------------------------------
def _entry(fn: Callable, rank: int, world: int, port: int, out: str, args: tuple, env: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(env)
    import torch
    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(rank, *args))
    except BaseException as e:  # report every failure to the parent, with its traceback
        result = ("error", f"rank {rank}: {e!r}\n{traceback.format_exc()}")
    with open(out, "wb") as f:
        pickle.dump(result, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def run_peers(fn: Callable, world: int, *args: Any, timeout: float = 60.0, per_node: int = 0) -> list:
    """`per_node`: pretend the peers sit on nodes of that many peers each (torchrun's GROUP_RANK,
    LOCAL_RANK, LOCAL_WORLD_SIZE); 0: all on one node."""
    ctx = mp.get_context("spawn")
    port = free_port()
    envs = [{} if not per_node else {"GROUP_RANK": str(r // per_node), "LOCAL_RANK": str(r % per_node),
                                     "LOCAL_WORLD_SIZE": str(per_node)} for r in range(world)]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, outs[r], args, envs[r]), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        assert not alive, f"peers {alive} still running after {timeout} s (hang?)"
        results = []
        for r, p in enumerate(procs):
            assert os.path.exists(outs[r]), f"rank {r} exited with code {p.exitcode} and no result"
            with open(outs[r], "rb") as f:
                status, value = pickle.load(f)
            assert status == "ok", value
            results.append(value)
        return results


@pytest.fixture
def peers() -> Callable[..., list]:
    return run_peers


# -- the command line ----------------------------------------------------------------------------
def torchrun_cmd(nproc: int, args: list[str], restarts: int = 0, launcher: tuple[str, ...] = ()) -> list[str]:
    rdzv = list(launcher) or ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", *rdzv, "-m", "p2prl.train", *args]


def train(args: list[str], nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "p2prl.train", *args] if nproc == 1 else torchrun_cmd(nproc, args)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return train


class Torchrun:
    """Background torchrun jobs of one test."""

    def __init__(self) -> None:
        self.jobs: list[subprocess.Popen] = []

    def start(self, args: list[str], nproc: int = 2, restarts: int = 0, cwd: Path = ROOT,
              launcher: tuple[str, ...] = (), env: Optional[dict] = None) -> subprocess.Popen:
        """torchrun with a loopback c10d rendezvous; stdout and stderr merged into `.stdout` (text)."""
        job = subprocess.Popen(torchrun_cmd(nproc, args, restarts, launcher), cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=None if env is None else {**os.environ, **env})
        self.jobs.append(job)
        return job

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float) -> str:
        """Wait for the job (killing it on timeout); its whole output."""
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"torchrun still running after {timeout} s:\n{out[-4000:]}")
        return out

    @staticmethod
    def workers(agent_pid: int) -> dict[int, int]:
        """{RANK: pid} of the agent's worker processes."""
        return proc_tree.workers(agent_pid)

    @staticmethod
    def alive(pid: int) -> bool:
        return proc_tree.alive(pid)

    @staticmethod
    def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.02):
        """Poll `condition` until it returns something true; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    @staticmethod
    def metrics_rows(run_dir: Path) -> int:
        path = run_dir / "metrics.jsonl"
        return path.read_text().count("\n") if path.exists() else 0

    def kill_all(self) -> None:
        """Leave nothing behind: kill the workers and then the agent of every job still running."""
        for proc in self.jobs:
            if proc.poll() is None:
                for pid in self.workers(proc.pid).values():
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
                proc.kill()
            proc.communicate()


@pytest.fixture
def torchrun():
    jobs = Torchrun()
    yield jobs
    jobs.kill_all()
