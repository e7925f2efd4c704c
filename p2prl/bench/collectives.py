"""Times the collectives the strategies use, on the peers torchrun starts (run by `python -m p2prl.bench
--cost-model`): the all-reduce over gloo and over shared memory, and a pairwise exchange (a send and a
receive at once, as gossip and the parameter server's links use). Rank 0 writes the medians as JSON.

    torchrun --nproc_per_node=2 -m p2prl.bench.collectives OUT.json
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from p2prl.atomic import write_json_atomic
from p2prl.comm import open_comm
from p2prl.host import pin, place
from p2prl.precheck import compose

SIZES = [2 ** k for k in range(8, 23, 2)]  # bytes: 256 B to 4 MiB
REPS = 100


def _time(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(out: Path) -> None:
    cfg = compose("comm.timeout_s=60", "comm.topology=flat").comm
    torch.set_num_threads(1)
    placement = place(1)
    pin(placement)
    shared = open_comm(cfg, "gloo", cores=placement.cores)  # through shared memory when pinned
    gloo = open_comm(cfg, "gloo", cores=placement.cores)
    gloo.shared = None  # the same pinned, polling peers, summing over gloo
    other = 1 - gloo.rank if gloo.world_size == 2 else None
    rows = []
    for nbytes in SIZES:
        x, y = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
        row = {"bytes": nbytes, "allreduce_gloo_s": _time(lambda: gloo.all_reduce_sum(x), REPS)}
        if shared.shared is not None and shared.shared.takes(x):
            row["allreduce_shm_s"] = _time(lambda: shared.all_reduce_sum(x), REPS)
        if other is not None:
            row["exchange_s"] = _time(lambda: gloo.exchange(x, y, other), REPS)
        rows.append(row)
    if gloo.rank == 0:
        write_json_atomic(out, {"world_size": gloo.world_size, "rows": rows})
    gloo.agree(False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
