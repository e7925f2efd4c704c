"""The alpha-beta model fitted per link rate to the sync times `p2prl.bench.syncbench` measured on a
star of hosts, measured against predicted, and extended to 256 peers on real link rates.

Fit: per rate, from the flat all-reduce points only (the other strategies are predictions, not fits),
on hosts of one peer where there are any. gloo's all-reduce is a ring at every size; on a star every
ring hop crosses two shaped links (the sender's up, the receiver's down), so each link carries
2 (N - 1) / N of the bytes each way and t = 2 (N - 1) alpha + 2 (N - 1) / N S beta. Weighted by 1 / t^2
(least squares of the relative error: the 37 KB points would otherwise not count beside the 6.7 MB ones).
alpha is the fitted per-step latency (here: the bridge, two tbf qdiscs, gloo and Python waking on a
loaded machine); 1/beta the all-reduce's effective bandwidth, set beside the probe's TCP rate.

Predictions: `p2prl.bench.cost.predict`, the one per-strategy formula, with gloo's ring, the hosts'
peers as `colocated` and `per_node`, and a node's own transport (gloo over the host's loopback here:
the peers are not pinned, so no shared memory) from this machine's loopback fit (`--cost-model`), an
assumed constant that matters only beside a fast link.

A rate is marked CPU-bound when it is unshaped, when TCP achieves under 90% of the set rate, or when
the all-reduce's fitted bandwidth is under 70% of what TCP achieves: then the cores, not the link, set
the time, and the model's link terms do not describe it. A point is CPU-bound when its rate is, or
when the same sync over unshaped links (measured in the same bench) takes at least `CPU_SHARE` of its
time: wake-ups, copies and sums, which the link does not limit and the model counts only in alpha.
"""
from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

from p2prl.bench import cost
from p2prl.sync.table import DEFAULT, STRATEGIES

SERVER = next(name for name, s in STRATEGIES.items() if s.central)  # the central baseline

LOOPBACK = (255e-6, 1 / 1.7e9)  # alpha, beta of gloo over loopback on this machine (docs/scaling.md)
SHM = (90e-6, 1 / 6.4e9)  # alpha, beta of a shared-memory sum inside a node, same source
WITHIN = 0.30  # the model's promise: within 30% of each link-bound measured point
CPU_SHARE = 0.30  # a point whose unshaped time is this share of its own is bound by the cores
REAL_RATES = {"1gbit": 1e9, "10gbit": 1e10, "25gbit": 2.5e10}
ASSUMED_ALPHA_S = 50e-6  # kernel TCP across one datacenter switch, with gloo's own handling (assumed)
ASSUMED_EFFICIENCY = 0.9  # TCP goodput / line rate where no link-bound rate was measured (assumed)
BIG_PEERS, BIG_PER_NODE = 256, 8


def ring_features(n: int, nbytes: float) -> tuple[float, float]:
    """(coefficient of alpha, of beta) of gloo's ring all-reduce on a star."""
    return 2.0 * (n - 1), 2.0 * (n - 1) / n * nbytes


def fit(points: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(alpha, beta) >= 0 minimizing the squared relative error of the ring over flat all-reduce points."""
    rows = [(*ring_features(p["hosts"] * p["per_host"], p["bytes"]), p["per_update_s"]) for p in points]
    u = [a / t for a, _, t in rows]
    v = [b / t for _, b, t in rows]
    suu, svv, suv = sum(x * x for x in u), sum(y * y for y in v), sum(x * y for x, y in zip(u, v))
    su, sv = sum(u), sum(v)
    det = suu * svv - suv * suv
    if det > 1e-12 * suu * svv:
        alpha, beta = (su * svv - sv * suv) / det, (sv * suu - su * suv) / det
        if alpha >= 0 and beta >= 0:
            return alpha, beta
    # one constant alone: the better of latency only and bandwidth only
    only_beta, only_alpha = (0.0, sv / svv), (su / suu, 0.0)
    loss = lambda ab: sum((ab[0] * x + ab[1] * y - 1) ** 2 for x, y in zip(u, v))  # noqa: E731
    return min(only_beta, only_alpha, key=loss)


def predict_point(p: dict[str, Any], alpha: float, beta: float, average_every: int) -> float:
    """Seconds per update the model gives a measured point (its strategy, layout and bucket)."""
    n, g = p["hosts"] * p["per_host"], p["per_host"]
    return cost.predict(p["strategy"], n, p["bytes"], alpha, beta, *LOOPBACK, per_node=g,
                        average_every=average_every, collective=cost.ring, colocated=g)


def links(rate: str, probes: Sequence[dict[str, Any]], fitted: tuple[float, float]) -> dict[str, Any]:
    """One rate's set, achieved and fitted figures, and whether the cores rather than the link bound it."""
    set_bits = probes[0]["set_bits_per_s"]
    achieved = [q["bits_per_s"] for probe in probes for q in probe["pairs"]]
    alpha, beta = fitted
    fitted_bits = 8 / beta if beta > 0 else None
    got = statistics.median(achieved)
    why = "unshaped" if set_bits is None else \
        f"TCP achieves {got / set_bits:.0%} of the set rate" if got < 0.9 * set_bits else \
        f"the all-reduce moves {fitted_bits / got:.0%} of what TCP achieves" \
        if fitted_bits is None or fitted_bits < 0.7 * got else None
    return {"rate": rate, "set_bits_per_s": set_bits, "achieved_bits_per_s": [min(achieved), got, max(achieved)],
            "rtt_s": statistics.median(p["rtt_s"] for p in probes), "alpha_s": alpha, "beta_s_per_byte": beta,
            "fitted_bits_per_s": fitted_bits, "cpu_bound": why, "shaping": probes[0].get("shaping")}


def compare(points: list[dict[str, Any]], probes: list[dict[str, Any]], average_every: int) -> dict[str, Any]:
    """Fit each rate, predict every point: {"links": [...], "points": [... with predicted_s, error]}."""
    out_links, out_points = [], []
    unshaped = {_key(p): p["per_update_s"] for p in points if p["rate"] == "unshaped"}
    for rate in dict.fromkeys(p["rate"] for p in points):
        here = [p for p in points if p["rate"] == rate]
        flat = [p for p in here if p["strategy"] == DEFAULT]
        single = [p for p in flat if p["per_host"] == 1]
        fitted = fit(single or flat)
        link = links(rate, [q for q in probes if q["rate"] == rate], fitted)
        out_links.append({**link, "fitted_on": f"{DEFAULT}, one peer per host" if single else f"{DEFAULT}, flat"})
        for p in here:
            pred = predict_point(p, *fitted, average_every)
            base = unshaped.get(_key(p))
            out_points.append({**p, "predicted_s": pred, "error": pred / p["per_update_s"] - 1,
                               "unshaped_s": base, "cpu_bound": link["cpu_bound"] is not None or
                               (base is not None and base >= CPU_SHARE * p["per_update_s"])})
    return {"links": out_links, "points": out_points}


def _key(p: dict[str, Any]) -> tuple:
    return p["hosts"], p["per_host"], p["bytes"], p["strategy"]


def big_predictions(result: dict[str, Any], sizes: Sequence[float], average_every: int) -> dict[str, Any]:
    """Per-update seconds at 256 peers (one per host; hierarchical: 8 per node) on 1, 10 and 25 Gbit,
    for the latency fitted here (measured) and an assumed datacenter latency."""
    bound = [lk for lk in result["links"] if lk["cpu_bound"] is None and lk["fitted_bits_per_s"]]
    eff = statistics.median(lk["fitted_bits_per_s"] / lk["set_bits_per_s"] for lk in bound) if bound else None
    alphas = {"assumed": ASSUMED_ALPHA_S}
    if bound:
        alphas["fitted here"] = statistics.median(lk["alpha_s"] for lk in bound)
    rows = []
    for which, alpha in alphas.items():
        for rate, bits in REAL_RATES.items():
            beta = 8 / (bits * (eff or ASSUMED_EFFICIENCY))
            for nbytes in sizes:
                # Every row on gloo's ring, and the default strategy also on the cheaper of ring and doubling.
                variants = [(s, BIG_PER_NODE if s == cost.HIERARCHICAL else 1, cost.ring) for s in cost.ROWS]
                for strategy, per_node, collective in [*variants[:1], (DEFAULT, 1, cost.allreduce), *variants[1:]]:
                    node = SHM if strategy == cost.HIERARCHICAL else LOOPBACK
                    s = cost.predict(strategy, BIG_PEERS, nbytes, alpha, beta, *node, per_node=per_node,
                                     average_every=average_every, collective=collective, colocated=per_node)
                    name = strategy if collective is cost.ring else f"{DEFAULT} (doubling where cheaper)"
                    rows.append({"latency": which, "alpha_s": alpha, "rate": rate, "bytes": nbytes,
                                 "strategy": name, "per_update_s": s})
    return {"peers": BIG_PEERS, "efficiency": eff, "efficiency_source": "fitted" if eff else "assumed",
            "rows": rows}


def checks(points: Sequence[dict[str, Any]]) -> list[str]:
    """The comparisons the claims rest on, at each rate and layout's largest bucket: all-reduce against
    parameter server, hierarchical against flat."""
    lines = []
    keys = dict.fromkeys((p["rate"], p["hosts"], p["per_host"]) for p in points)
    for rate, h, g in keys:
        here = [p for p in points if (p["rate"], p["hosts"], p["per_host"]) == (rate, h, g)]
        big = max(p["bytes"] for p in here)
        t = {p["strategy"]: p["per_update_s"] for p in here if p["bytes"] == big}
        where = f"{h} hosts x {g} peer(s), {rate}, {fmt_bytes(big)}"
        if DEFAULT in t and SERVER in t:
            lines.append(f"{where}: {DEFAULT} {fmt_s(t[DEFAULT])}, {SERVER} {fmt_s(t[SERVER])}: "
                         f"{t[DEFAULT] / t[SERVER]:.2f}x")
        if DEFAULT in t and cost.HIERARCHICAL in t:
            lines.append(f"{where}: {cost.HIERARCHICAL} {fmt_s(t[cost.HIERARCHICAL])}, flat {fmt_s(t[DEFAULT])}: "
                         f"{t[cost.HIERARCHICAL] / t[DEFAULT]:.2f}x")
    return lines


def fmt_bytes(n: float) -> str:
    return f"{n:.0f} B" if n < 1e4 else f"{n / 1e3:.0f} KB" if n < 1e6 else f"{n / 1e6:g} MB"


def fmt_s(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"
