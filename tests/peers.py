"""Start real gloo peers for tests: N spawned processes, each with torchrun's environment variables.

`run_peers(fn, n, ...)` calls `fn(rank, *args)` in n fresh processes that share one process group
through p2prl's own `open_comm`, and returns each rank's return value. A hang or crash fails the test
within `timeout` seconds instead of blocking the suite.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from p2prl.bench import free_port  # noqa: F401 - also the tests' port picker


def _entry(fn: Callable, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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


def run_peers(fn: Callable, world: int, *args: Any, timeout: float = 60.0) -> list:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, outs[r], args), daemon=True)
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
