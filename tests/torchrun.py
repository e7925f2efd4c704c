"""Start `torchrun ... -m p2prl.train` in the background and find, stop or kill its workers (Linux /proc)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from peers import free_port

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str], nproc: int = 2, restarts: int = 0, cwd: Path = ROOT,
          launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """torchrun with a loopback c10d rendezvous; stdout and stderr merged into `.stdout` (text)."""
    rdzv = list(launcher) or ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", *rdzv, "-m", "p2prl.train", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for the job (killing it on timeout); its whole output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s:\n{out[-4000:]}")
    return out


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def workers(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the agent's worker processes."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if int(_stat(int(p.name))[1]) != agent_pid:
                continue
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = int(p.name)
    return out


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.02):
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill_job(proc: subprocess.Popen) -> None:
    """Leave nothing behind: kill the workers (their own sessions) and then the agent."""
    if proc.poll() is None:
        for pid in workers(proc.pid).values():
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        proc.kill()
    proc.communicate()
