"""`python -m p2prl.bench --network RATE [RATE ...] --hosts H [H ...] --peers-per-host P [P ...]`: the
sync cost of every strategy between hosts joined by shaped links, measured against the model.

For every rate and every (hosts, peers per host): H hosts as network namespaces on one bridge
(`p2prl.bench.netns.Star`: each host's link shaped to RATE both ways by tbf, its own /dev/shm; RATE
`unshaped` leaves the links alone), first each link's achieved TCP rate and a round trip
(`p2prl.bench.linkprobe`), then P peers per host started through launch/multinode.sh with
MODULE=p2prl.bench.syncbench, which time one update's sync of each strategy and bucket. The star is
removed afterwards and checked to be gone. Every wait is bounded: the probes by their own timeouts, the
peers by a bound from the model with a pessimistic link (`bound_s`).

The kernel may lack netem, so no latency is added: the round trip printed is the bridge's, measured;
the model's alpha is fitted; the 256-peer predictions say which latency they assume
(`p2prl.bench.netmodel`). Writes OUT/network.json and OUT/network.md (the tables printed), and per
star OUT/network/<rate>-<H>x<P>/ (sync.json, each host's log).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from p2prl.bench import cost, linkprobe, netmodel, netns, syncbench
from p2prl.bench.netmodel import fmt_bytes, fmt_s
from p2prl.bench.report import read_json, write_json
from p2prl.bench.tables import markdown_table

log = logging.getLogger("p2prl.bench")
MULTINODE = Path(__file__).resolve().parents[2] / "launch" / "multinode.sh"
UNSHAPED = "unshaped"
STARTUP_S = 180.0  # torchrun's rendezvous and the peers' imports on a loaded machine
FRAMES_BYTES = 2 * 1514  # two full Ethernet frames: tbf's bucket must hold a whole packet


def burst_bytes(bits: float) -> int:
    """tbf's bucket: as shallow as still holds the rate, since every idle link refills it and lets the
    next burst through at memory speed (with ten frames, 15 KB, the parameter server's 37 KB update at
    100 Mbit/s took 4.3 ms against 6.4 ms with two). Below 1 Gbit/s two frames or 0.25 ms of traffic
    hold the rate (94-95% over TCP here); at 1 Gbit/s a 25 KB bucket held only 53-69%, 1 ms of traffic 95%."""
    return max(FRAMES_BYTES, int(bits / 8 * (1e-3 if bits >= 1e9 else 2.5e-4)))


def check_options(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    """Refuse what --network cannot run (argparse's `error`: one line, exit 2)."""
    for rate in a.network:
        if rate != UNSHAPED:
            try:
                netns.rate_bits(rate)
            except ValueError:
                error(f"--network {rate}: allowed: a rate in tc's units (10mbit, 1.5gbit, 800kbit) or {UNSHAPED}")
    for flag, values, least in (("--hosts", a.hosts, 2), ("--peers-per-host", a.peers_per_host, 1),
                                ("--max-peers", [] if a.max_peers is None else [a.max_peers], 2),
                                ("--bucket-bytes", a.bucket_bytes, 64), ("--average-every", [a.average_every], 1)):
        for v in values:
            if v < least:
                error(f"{flag}={v}: must be an integer >= {least}")
    if not layouts(a):
        error(f"--max-peers={a.max_peers}: leaves no star of --hosts x --peers-per-host to measure")
    if a.point_seconds <= 0:
        error(f"--point-seconds={a.point_seconds:g}: must be positive")
    if a.train is not None:
        from p2prl.bench.linktrain import VARIANTS, check_variant
        for flag, values in (("--hosts", a.hosts), ("--peers-per-host", a.peers_per_host)):
            if len(values) > 1:
                error(f"{flag} {' '.join(map(str, values))}: --train runs one layout; allowed: one value")
        a.variants = a.variants or list(VARIANTS)
        for v in a.variants:
            try:
                check_variant(v)
            except ValueError as e:
                error(f"--variants {e}")
    elif a.variants is not None:
        error("--variants: needs --train")
    why = netns.available()
    if why is not None:
        error(f"--network: {why}")


def bound_s(rate_bits: Optional[float], n: int, per_host: int, a: argparse.Namespace) -> float:
    """A generous bound on one star's sync run: the model with a link at 30% of its rate and 5 ms of
    latency, three times over, plus start-up."""
    alpha, beta = 5e-3, 8 / (0.3 * (rate_bits or 1e9))
    total = STARTUP_S
    for nbytes in a.bucket_bytes:
        for s in syncbench.ROWS:
            block = syncbench.block_of(s, a.average_every)
            t = block * cost.predict(s, n, nbytes, alpha, beta, *netmodel.LOOPBACK, per_node=per_host,
                                     average_every=a.average_every, collective=cost.ring, colocated=per_host)
            total += 3 * (a.point_seconds + (syncbench.MIN_BLOCKS + 1) * t)
    return total


def _sync(star: netns.Star, per_host: int, a: argparse.Namespace, where: Path, env: dict[str, str],
          bound: float) -> tuple[Optional[dict], Optional[str]]:
    """The peers' sync timings on this star: (rank 0's document, None) or (None, why not)."""
    out = where.resolve() / "sync.json"  # rank 0 may live on any host: they all see this filesystem
    out.unlink(missing_ok=True)  # an earlier bench's file must not pass for this one's
    # gloo's timeout must outlast one slow update (a parameter server on a slow link waits long)
    argv = ["bash", str(MULTINODE), str(out), "--bytes", *map(str, a.bucket_bytes), "--seconds", str(a.point_seconds),
            "--average-every", str(a.average_every), "--timeout-s", str(int(max(300.0, bound / 4)))]
    procs = []
    for h in star.hosts:
        host_env = {**env, "NNODES": str(len(star.hosts)), "HEAD_ADDR": star.hosts[0].addr, "IFNAME": h.dev,
                    "NODE_RANK": str(h.index), "NPROC_PER_NODE": str(per_host), "RUN_ID": f"syncbench-{star.tag}",
                    "MODULE": "p2prl.bench.syncbench", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
        with open(where / f"host{h.index}.log", "w") as f:
            procs.append(star.popen(h.index, argv, env=host_env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + bound
    try:
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:  # the star's close kills what is left
        return None, f"the peers did not finish within {bound:.0f} s (logs in {where})"
    doc = read_json(out)
    if any(codes) or doc is None:
        return None, f"exit codes {codes}: see {where}/host*.log"
    return doc, None


def layouts(a: argparse.Namespace) -> list[tuple[int, int]]:
    """(hosts, peers per host) of every star to measure: each --hosts with each --peers-per-host, but
    for those of more than --max-peers peers."""
    return [(h, g) for h in a.hosts for g in a.peers_per_host if a.max_peers is None or h * g <= a.max_peers]


def measure(a: argparse.Namespace, out: Path, env: dict[str, str]) -> tuple[list[dict], list[dict], list[str]]:
    """(sync points, link probes, failures) over every rate and layout."""
    points, probes, failures = [], [], []
    for rate in a.network:
        bits = None if rate == UNSHAPED else netns.rate_bits(rate)
        for hosts, per_host in layouts(a):
            where = out / "network" / f"{rate}-{hosts}x{per_host}"
            where.mkdir(parents=True, exist_ok=True)
            log.info("%s, %d hosts x %d peer(s): probing the links, then timing the strategies ...",
                     rate, hosts, per_host)
            shaped = {} if bits is None else {"rate": rate, "burst": burst_bytes(bits)}
            with netns.Star(hosts, **shaped) as star:  # its exit asserts that all is gone
                probe = linkprobe.measure(star, env)
                probes.append({**probe, "rate": rate, "hosts": hosts, "per_host": per_host,
                               "set_bits_per_s": bits, "shaping": star.shaping})
                log.info("  achieved: %s", ", ".join(f"{q['src']}->{q['dst']} {q['bits_per_s'] / 1e6:.1f} Mbit/s"
                                                     for q in probe["pairs"]))
                doc, why = _sync(star, per_host, a, where, env, bound_s(bits, hosts * per_host, per_host, a))
            if why is not None:
                failures.append(f"{rate}, {hosts} hosts x {per_host} peer(s): {why}")
                log.error("  %s", failures[-1])
            else:
                points += [{**r, "rate": rate, "hosts": hosts, "per_host": per_host} for r in doc["rows"]]
            # after every star: a stopped bench keeps what it measured (the fit replaces this at the end)
            write_json(out / "network.json", {"points": points, "probes": probes, "failures": failures})
    return points, probes, failures


def run(a: argparse.Namespace, out: Path, env: dict[str, str], emit: Callable[[str], None]) -> int:
    points, probes, failures = measure(a, out, env)
    if not points:
        emit("no star measured anything:\n" + "\n".join(failures))
        return 1
    result = netmodel.compare(points, probes, a.average_every)
    result.update(big=netmodel.big_predictions(result, a.bucket_bytes, a.average_every),
                  checks=netmodel.checks(points), failures=failures, probes=probes, average_every=a.average_every)
    write_json(out / "network.json", result)
    text = markdown(result)
    (out / "network.md").write_text(text + "\n")
    emit(f"{text}\n\nwrote {out / 'network.json'} and {out / 'network.md'}")
    return 1 if failures else 0


def _mbit(bits: Optional[float]) -> str:
    return "-" if bits is None else f"{bits / 1e6:,.0f}" if bits >= 1e8 else f"{bits / 1e6:.1f}"


def markdown(r: dict[str, Any]) -> str:
    """The links, the per-update table (measured beside predicted), the checks, the 256-peer table."""
    links = markdown_table(("rate", "tbf burst / queue limit", "TCP achieved Mbit/s (min/median/max)", "round trip (measured)",
                    "alpha (fitted)", "all-reduce Mbit/s (fitted 1/beta)", "bound by"), [
        (lk["rate"], "-" if not lk["shaping"] else f"{lk['shaping']['burst']:,} B / {lk['shaping']['limit']:,} B",
         "/".join(_mbit(b) for b in lk["achieved_bits_per_s"]), f"{lk['rtt_s'] * 1e6:.0f} us",
         f"{lk['alpha_s'] * 1e3:.2f} ms", _mbit(lk["fitted_bits_per_s"]),
         "the link" if lk["cpu_bound"] is None else f"CPU ({lk['cpu_bound']})") for lk in r["links"]])
    rows = [(p["rate"], f"{p['hosts']}x{p['per_host']}", fmt_bytes(p["bytes"]), p["strategy"], fmt_s(p["per_update_s"]),
             str(p["blocks"] * p["block"]), fmt_s(p["predicted_s"]),
             f"{100 * p['error']:+.0f}%" + (" !" if abs(p["error"]) > netmodel.WITHIN else ""),
             "CPU" if p["cpu_bound"] else "link") for p in r["points"]]
    sync = markdown_table(("rate", "hosts x peers", "bucket", "strategy", "measured per update (median)", "updates timed",
                   "predicted", "error", "bound by"), rows)
    big = r["big"]
    eff = f"{big['efficiency']:.0%} of the line rate ({big['efficiency_source']})" if big["efficiency"] else \
        f"{netmodel.ASSUMED_EFFICIENCY:.0%} (assumed)"
    lat = {row["latency"]: row["alpha_s"] for row in big["rows"]}
    strategies = list(dict.fromkeys(row["strategy"] for row in big["rows"]))
    cols = list(dict.fromkeys((row["rate"], row["bytes"]) for row in big["rows"]))
    tables = []
    for which, alpha in lat.items():
        cell = {(row["strategy"], row["rate"], row["bytes"]): row["per_update_s"] for row in big["rows"]
                if row["latency"] == which}
        tables.append(f"alpha {alpha * 1e6:.0f} us ({which}):\n\n" + markdown_table(
            ("strategy", *(f"{rate}, {fmt_bytes(b)}" for rate, b in cols)),
            [(s, *(fmt_s(cell[(s, rate, b)]) for rate, b in cols)) for s in strategies]))
    return "\n\n".join([
        "Links (tbf on both ends of each host's link; the queue limit is the burst and 50 ms of traffic; round "
        "trip: a one-byte TCP echo between two hosts, the only latency measured; no latency is added: the "
        f"kernel has no netem):\n\n{links}",
        f"Per-update sync, measured (the slowest peer, median over the timed blocks) and predicted (the model fitted per rate to the flat "
        f"all-reduce; local_sgd averages every {r['average_every']} updates; ! = off by more than "
        f"{netmodel.WITHIN:.0%}; bound by CPU: the rate is, or the same sync unshaped takes "
        f"{netmodel.CPU_SHARE:.0%} of the time or more):\n\n{sync}",
        f"Link-bound points off by more than {netmodel.WITHIN:.0%}: " + (", ".join(
            f"{p['rate']} {p['hosts']}x{p['per_host']} {fmt_bytes(p['bytes'])} {p['strategy']} ({100 * p['error']:+.0f}%)"
            for p in r["points"] if not p["cpu_bound"] and abs(p["error"]) > netmodel.WITHIN) or "none"),
        "Checks:\n\n" + "\n".join(f"- {c}" for c in r["checks"]),
        f"Predicted per update at {big['peers']} peers (one per host; hierarchical {netmodel.BIG_PER_NODE} per "
        f"node over shared memory), all-reduce bandwidth {eff}:\n\n" + "\n\n".join(tables),
        *(["Failed:\n\n" + "\n".join(f"- {f}" for f in r["failures"])] if r["failures"] else [])])
