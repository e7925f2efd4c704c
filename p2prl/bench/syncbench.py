"""Times one update's sync of every strategy on the peers torchrun started, without training in the
loop (run by `python -m p2prl.bench --network` on each host through launch/multinode.sh):

    MODULE=p2prl.bench.syncbench NNODES=2 HEAD_ADDR=... IFNAME=... bash launch/multinode.sh OUT.json

For each bucket size and strategy the peers build the real strategy object (`comm=` as training would)
over a GradientBucket of that many bytes, fill it with a fixed synthetic gradient and time
`strategy.step` alone: the optimizer step is a no-op (`_applied`), so what is timed is the sync and
the strategy's own copies and additions. Strategies and their units of time:

- `allreduce` (flat, `comm.topology=flat`) and `hierarchical` (`comm.topology=hierarchical`: node, then
  the nodes' leaders, then node; only where some host holds several peers): one update;
- `param_server`: one update (gradients to rank 0, parameters back);
- `local_sgd` (`--average-every` H updates, default 4): H updates, one of which averages the
  parameters; the per-update cost is the block's time / H;
- `gossip` (ring): two updates, one period of the ring's even and odd pairs; per update: / 2.

Peers are not pinned (the bench's hosts share one machine's cores), so they wait by sleeping and the
node's sums in `hierarchical` go through gloo, not shared memory. Each point: one warm-up block, then
as many blocks as fit in `--seconds` (at least `--min-blocks`, at most `--max-blocks`), each started
together (a small all-reduce first) and lasting until its last peer is done (the slowest peer's time).
Rank 0 writes the medians (and min, max) per update as JSON.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from p2prl.atomic import write_json_atomic
from p2prl.bench.cost import HIERARCHICAL, ROWS, TERMS_BYTES
from p2prl.comm import Communicator, open_comm
from p2prl.sync.bucket import GradientBucket
from p2prl.sync.table import DEFAULT, STRATEGIES, make_strategy
from p2prl.precheck import compose

SIZES = (37_000, 1_000_000, 6_700_000)  # bytes: the CartPole MLP's bucket, ~1 MB, the Nature CNN's
MIN_BLOCKS = 3  # timed blocks per point at least, however slow
N_EXTRAS = 4  # a few terms and the finiteness flag, as a learner's bucket carries


class _Applied(NamedTuple):
    applied: bool = True
    vetoed: bool = False


def _applied(*_) -> _Applied:
    """The optimizer step's stand-in: the timed step is the sync alone."""
    return _Applied()


def _veto(terms) -> bool:
    """A veto that refuses nothing (PPO's KL stop, say): local SGD and gossip then share the terms every
    update, as the model's `terms` cost counts them (without one they share them once per iteration)."""
    return False


def _name(strategy: str) -> str:
    """The table's name of a row (the hierarchical row is the default strategy on hierarchical sums)."""
    return DEFAULT if strategy == HIERARCHICAL else strategy


def block_of(strategy: str, average_every: int) -> int:
    """Updates timed together: the strategy's period (local SGD's averaging, gossip's ring pairs)."""
    return STRATEGIES[_name(strategy)].period({"average_every": average_every})


@functools.lru_cache(maxsize=None)  # composing takes Hydra a while; every point reuses it
def _config(strategy: str, timeout_s: float, average_every: int):
    name = _name(strategy)
    extra = [f"comm.average_every={average_every}"] if "average_every" in STRATEGIES[name].keys else []
    return compose(f"comm={name}", f"comm.timeout_s={timeout_s}", *extra).comm


def time_point(comm: Communicator, strategy: str, nbytes: int, average_every: int, seconds: float,
               min_blocks: int, max_blocks: int, timeout_s: float) -> dict:
    """Per-update seconds of `strategy` on a bucket of `nbytes` (a collective: every peer calls it)."""
    numel = max(nbytes // 4 - N_EXTRAS, 1)
    bucket = GradientBucket(comm, [torch.nn.Parameter(torch.zeros(numel))], N_EXTRAS)
    sync = make_strategy(comm, _config(strategy, timeout_s, average_every), bucket)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(comm.rank)) * 1e-3
    block = block_of(strategy, average_every)

    def run_block() -> float:
        comm.agree(False)  # every peer starts the block together
        spent = 0.0
        for _ in range(block):
            bucket.grads.copy_(grad)  # a fresh gradient every update; the copy is not timed
            bucket.extras.zero_()
            start = time.perf_counter()
            sync.step(_applied, _applied, _veto)
            spent += time.perf_counter() - start
        return spent

    warm = max(comm.all_gather_object(run_block()))  # the same count of blocks on every peer
    blocks = int(min(max(seconds / max(warm, 1e-6), min_blocks), max_blocks))
    mine = [run_block() for _ in range(blocks)]
    # A block ends when its last peer is done: a send completes once the kernel holds its bytes, so the
    # parameter server's own time would miss its replies' transfer.
    per_update = [max(times) / block for times in zip(*comm.all_gather_object(mine))]
    return {"strategy": strategy, "bytes": numel * 4 + N_EXTRAS * 4, "per_update_s": statistics.median(per_update),
            "min_s": min(per_update), "max_s": max(per_update), "blocks": blocks, "block": block}


def measure(args: argparse.Namespace) -> Optional[dict]:
    """Every point of `args`, on the peers of this job; rank 0's document (None on other ranks)."""
    torch.set_num_threads(1)
    flat = open_comm(_topology("flat", args.timeout_s), "gloo")
    nodes = _layout(flat)
    hier = open_comm(_topology("hierarchical", args.timeout_s), "gloo") \
        if len(nodes) > 1 and max(map(len, nodes)) > 1 and HIERARCHICAL in args.strategies else None
    # The all-reduce of the terms alone (a latency-bound sum, as local_sgd and gossip make every update):
    # the fit's anchor for alpha, which the buckets alone leave loose on a slow link.
    rows = [time_point(flat, DEFAULT, TERMS_BYTES, args.average_every, args.seconds, args.min_blocks,
                       args.max_blocks, args.timeout_s)] if DEFAULT in args.strategies else []
    for nbytes in args.bytes:
        for strategy in args.strategies:
            if strategy == HIERARCHICAL and hier is None:
                continue  # one host, or one peer per host: the same sums as flat
            comm = hier if strategy == HIERARCHICAL else flat
            rows.append(time_point(comm, strategy, nbytes, args.average_every, args.seconds, args.min_blocks,
                                   args.max_blocks, args.timeout_s))
    doc = {"world_size": flat.world_size, "nodes": [list(n) for n in nodes],
           "average_every": args.average_every, "rows": rows} if flat.rank == 0 else None
    flat.agree(False)
    for c in filter(None, (hier, flat)):
        c.close()
    return doc


@functools.lru_cache(maxsize=None)
def _topology(topology: str, timeout_s: float):
    return compose(f"comm.timeout_s={timeout_s}", f"comm.topology={topology}").comm


def _layout(comm: Communicator) -> tuple:
    """Which ranks share a host (a collective)."""
    from p2prl.comm.connect import node_key
    from p2prl.comm.hierarchical import Layout
    return Layout.of(comm.all_gather_object(node_key())).nodes


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m p2prl.bench.syncbench", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the JSON file rank 0 writes")
    p.add_argument("--bytes", type=int, nargs="+", default=list(SIZES), help="bucket sizes (default: %(default)s)")
    p.add_argument("--strategies", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--average-every", type=int, default=4, help="local SGD's averaging period (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0, help="time budget per point (default: %(default)s)")
    p.add_argument("--min-blocks", type=int, default=MIN_BLOCKS, help="(default: %(default)s)")
    p.add_argument("--max-blocks", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="comm.timeout_s: a slow link's parameter server waits long (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    doc = measure(args)
    if doc is not None:
        write_json_atomic(args.out, doc)


if __name__ == "__main__":
    main()
