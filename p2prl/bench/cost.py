"""An alpha-beta cost model of per-update communication, fitted to collectives measured here.

A message of S bytes costs alpha + beta * S (latency, inverse bandwidth), fitted by least squares to
the 2-peer gloo all-reduces `p2prl.bench.collectives` timed (on 2 peers an all-reduce is one exchange
of the whole message: alpha + beta S); shared-memory sums inside a node get their own (alpha_shm,
beta_shm). The pairwise send/receive it also times (gossip's and the parameter server's links) is
set beside the model's alpha + beta S rather than fitted: gloo's point-to-point path jitters by
milliseconds on a loaded loopback, which the strategies' measured comm_frac shows too. Each strategy
predicts its own time per update from the model's link (`predict` in p2prl.sync's table); for a model
of S bytes on N peers:

- all-reduce: the cheaper of a ring, 2 (N - 1) (alpha + beta S / N) (2 (N - 1) steps, each moving a
  1/N chunk: bandwidth-optimal), and recursive doubling, ceil(log2 N) (alpha + beta S) (latency-optimal),
  as collective libraries choose by size;
- hierarchical, g peers per node: the node's sum and its sharing (alpha_shm + beta_shm S (g - 1), then
  alpha_shm + beta_shm S) around a ring all-reduce among the N / g nodes' leaders;
- parameter server: 2 (N - 1) (alpha + beta S): every gradient in, every parameter copy out, through
  the server's one link, one after another;
- gossip: one exchange with a partner, alpha + beta S, plus the all-reduce of the few terms;
- local SGD, averaging every H updates: the all-reduce of S divided by H, plus the terms' one.

The model ignores contention, switch topology, congestion, stragglers and compute overlap; one
machine's loopback (microsecond latency, memory bandwidth) says little about a real network.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

from p2prl.sync.table import DEFAULT, STRATEGIES

TERMS_BYTES = 64  # the terms and flag that ride where the gradient no longer does
PEERS = [2 ** k for k in range(1, 9)]  # 2 .. 256


def fit(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of seconds = alpha + beta * bytes, least squares."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    beta = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx
    return max(my - beta * mx, 0.0), max(beta, 0.0)


def ring(alpha: float, beta: float, nbytes: float, n: int) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) * (alpha + beta * nbytes / n)


def allreduce(alpha: float, beta: float, nbytes: float, n: int) -> float:
    """The cheaper of a ring and recursive doubling."""
    return 0.0 if n == 1 else min(ring(alpha, beta, nbytes, n), math.ceil(math.log2(n)) * (alpha + beta * nbytes))


class AlphaBeta(NamedTuple):
    """The model's link (p2prl.sync.base.Link): alpha + beta S per message; with `per_node` peers per
    node, all-reduces go hierarchically, through shared memory (alpha_shm, beta_shm) inside a node.
    `collective` is the all-reduce's algorithm; `colocated` the peers of each node of a flat layout."""

    alpha: float
    beta: float
    alpha_shm: float = 0.0
    beta_shm: float = 0.0
    per_node: int = 1
    collective: Callable[[float, float, float, int], float] = allreduce
    colocated: int = 1

    def allreduce(self, nbytes: float, n: int) -> float:
        if self.per_node == 1:
            return self.collective(self.alpha, self.beta, nbytes, n)
        g = min(self.per_node, n)
        inside = 2 * self.send_local(0) + self.beta_shm * nbytes * g if g > 1 else 0.0  # the node's sum, then its sharing
        return inside + self.collective(self.alpha, self.beta, nbytes, math.ceil(n / g))

    def send(self, nbytes: float) -> float:
        return self.alpha + self.beta * nbytes

    def send_local(self, nbytes: float) -> float:
        return self.alpha_shm + self.beta_shm * nbytes

    def terms(self, n: int) -> float:
        return self.collective(self.alpha, self.beta, TERMS_BYTES, n)


HIERARCHICAL = "hierarchical"  # a row of its own: the default strategy on hierarchical sums
ROWS = (DEFAULT, HIERARCHICAL, *(s for s in STRATEGIES if s != DEFAULT))


def predict(strategy: str, n: int, nbytes: float, alpha: float, beta: float, alpha_shm: float = 0.0,
            beta_shm: float = 0.0, per_node: int = 8, average_every: int = 4,
            collective: Callable[[float, float, float, int], float] = allreduce, colocated: int = 1) -> float:
    """Seconds of communication per update of a row of ROWS (see the module docstring).

    `collective`: the all-reduce's algorithm (default: the cheaper of ring and doubling; gloo's is `ring`
    at every size). `colocated`: the peers of each node for the flat strategies (ranks numbered node by
    node, as torchrun does): the parameter server's node-mates reach it without its link, and a gossip
    ring pairs node-mates every other update (see p2prl.sync's param_server and gossip).
    """
    if strategy not in ROWS:
        raise ValueError(strategy)
    hierarchical = strategy == HIERARCHICAL
    link = AlphaBeta(alpha, beta, alpha_shm, beta_shm, per_node if hierarchical else 1, collective, colocated)
    return STRATEGIES[DEFAULT if hierarchical else strategy].predict(link, n, nbytes, {"average_every": average_every})


def model(measured: dict) -> dict:
    """Fitted constants and predictions from `p2prl.bench.collectives`' JSON."""
    rows = measured["rows"]
    alpha, beta = fit([r["bytes"] for r in rows], [r["allreduce_gloo_s"] for r in rows])
    shm = [r for r in rows if "allreduce_shm_s" in r]
    alpha_shm, beta_shm = fit([r["bytes"] for r in shm], [r["allreduce_shm_s"] for r in shm]) if len(shm) > 1 \
        else (0.0, 0.0)
    check = [{"bytes": r["bytes"], "allreduce_s": r["allreduce_gloo_s"], "exchange_s": r.get("exchange_s"),
              "model_s": allreduce(alpha, beta, r["bytes"], 2)} for r in rows]
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "alpha_shm_s": alpha_shm, "beta_shm_s_per_byte": beta_shm,
            "measured_vs_model": check}


def predictions(m: dict, nbytes: float) -> dict[str, list[float]]:
    c = (m["alpha_s"], m["beta_s_per_byte"], m["alpha_shm_s"], m["beta_shm_s_per_byte"])
    return {s: [predict(s, n, nbytes, *c) for n in PEERS] for s in ROWS}


def plot(m: dict, sizes: dict[str, float], out: Path) -> Path:
    """Per-update communication against peers, one panel per model size."""
    from p2prl.plot import _figure, _save
    fig, axes = _figure(ncols=len(sizes), width=5.2)
    for ax, (label, nbytes) in zip(axes, sizes.items()):
        for strategy, seconds in predictions(m, nbytes).items():
            ax.plot(PEERS, [1000 * s for s in seconds], marker="o", ms=3, label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("peers")
        ax.set_ylabel("communication per update, ms (model)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"alpha-beta model: alpha {1e6 * m['alpha_s']:.0f} us, 1/beta "
                 f"{1e-9 / max(m['beta_s_per_byte'], 1e-30):.2f} GB/s (fitted on this machine's loopback)", fontsize=9)
    return _save(fig, out)


def table(m: dict, nbytes: float, label: str, peers: Optional[Sequence[int]] = None) -> str:
    from p2prl.bench.tables import table as text_table
    peers = peers or PEERS
    preds = predictions(m, nbytes)
    body = [(s, *(f"{1000 * preds[s][PEERS.index(n)]:.2f}" for n in peers)) for s in ROWS]
    return f"{label}: ms of communication per update\n" + text_table(("strategy", *(str(n) for n in peers)), body)
