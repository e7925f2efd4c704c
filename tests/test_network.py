"""`python -m p2prl.bench --network`: the sync microbenchmark on real peers, the link probe on shaped
namespace hosts, the model fitted per rate and its tables, the options it refuses, launch/multinode.sh's
MODULE; end to end on two shaped hosts, everything it creates removed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2prl.bench import cost, linkprobe, netmodel, netns, network, syncbench
from p2prl.bench.options import parse_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)
needs_netns = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))


def _ring_point(n, nbytes, alpha, beta, strategy="allreduce", rate="100mbit", per_host=1):
    a, b = netmodel.ring_features(n, nbytes)
    return {"rate": rate, "hosts": n // per_host, "per_host": per_host, "strategy": strategy, "bytes": nbytes,
            "per_update_s": a * alpha + b * beta, "blocks": 3, "block": 1}


def test_the_fit_recovers_the_ring_constants_from_flat_allreduce_points():
    alpha, beta = 4e-4, 8 / 95e6
    points = [_ring_point(n, s, alpha, beta) for n in (2, 4) for s in (64, 37_000, 1_000_000, 6_700_000)]
    assert netmodel.fit(points) == (pytest.approx(alpha), pytest.approx(beta))
    # bandwidth alone: no negative latency
    only = [_ring_point(2, s, 0.0, beta) for s in (1e5, 1e6)]
    only[0]["per_update_s"] *= 0.9
    a, b = netmodel.fit(only)
    assert a == 0.0 and b > 0


def test_star_formulas_by_hand():
    a, b, an, bn, S = 1e-3, 1e-8, 1e-4, 1e-9, 1e6
    # the server's node-mates do not cross its link: 2 hosts x 2 peers carry 2 (4 - 2) copies
    assert cost.predict("param_server", 4, S, a, b, colocated=2) == pytest.approx(6 * a + 4 * b * S)
    assert cost.predict("param_server", 4, S, a, b) == pytest.approx(6 * (a + b * S))
    terms = cost.ring(a, b, cost.TERMS_BYTES, 4)
    # gossip's ring: node-mates every other update, two pairs per link in between
    assert cost.predict("gossip", 4, S, a, b, an, bn, collective=cost.ring, colocated=2) == pytest.approx(
        0.5 * (a + 2 * b * S) + 0.5 * (an + bn * S) + terms)
    assert cost.predict("gossip", 4, S, a, b, collective=cost.ring) == pytest.approx(a + b * S + terms)
    # gloo's ring at every size, where the default takes doubling for small messages
    assert cost.predict("allreduce", 4, 64, a, b, collective=cost.ring) == pytest.approx(6 * (a + b * 16))
    assert cost.predict("allreduce", 4, 64, a, b) == pytest.approx(2 * (a + b * 64))
    assert cost.predict("hierarchical", 4, S, a, b, an, bn, per_node=2, collective=cost.ring) == pytest.approx(
        2 * an + 2 * bn * S + cost.ring(a, b, S, 2))


def _probe(rate, achieved, set_bits):
    return {"rate": rate, "set_bits_per_s": set_bits, "rtt_s": 2e-5, "shaping": None,
            "pairs": [{"src": 0, "dst": 1, "bits_per_s": achieved}, {"src": 1, "dst": 0, "bits_per_s": achieved}]}


def test_a_rate_is_cpu_bound_where_the_cores_not_the_link_set_the_time():
    assert netmodel.links("10mbit", [_probe("10mbit", 9.6e6, 1e7)], (1e-3, 8 / 9.3e6))["cpu_bound"] is None
    assert netmodel.links("unshaped", [_probe("unshaped", 6e9, None)], (1e-3, 8 / 2e9))["cpu_bound"] == "unshaped"
    assert "TCP achieves 50%" in netmodel.links("1gbit", [_probe("1gbit", 5e8, 1e9)], (1e-3, 8 / 4.9e8))["cpu_bound"]
    assert "all-reduce moves 40%" in netmodel.links("1gbit", [_probe("1gbit", 9.5e8, 1e9)], (1e-3, 8 / 3.8e8))["cpu_bound"]


def test_measured_beside_predicted_with_checks_and_the_256_peer_table():
    alpha, beta = 5e-4, 8 / 95e6
    points = [_ring_point(n, s, alpha, beta) for n in (2, 4) for s in (64, 37_000, 6_700_000)]
    ps = {**_ring_point(4, 6_700_000, alpha, beta, "param_server"), "per_update_s": 3.4}
    hier = {**_ring_point(4, 6_700_000, alpha, beta, "hierarchical", per_host=2), "per_update_s": 0.1}
    flat2 = {**_ring_point(4, 6_700_000, alpha, beta, per_host=2), "per_update_s": 0.9}
    probes = [_probe("100mbit", 9.5e7, 1e8)]
    r = netmodel.compare([*points, ps, hier, flat2], probes, 4)
    assert r["links"][0]["fitted_on"] == "allreduce, one peer per host" and r["links"][0]["cpu_bound"] is None
    by = {(p["strategy"], p["hosts"], p["per_host"], p["bytes"]): p for p in r["points"]}
    assert abs(by[("allreduce", 4, 1, 6_700_000)]["error"]) < 1e-6
    assert by[("hierarchical", 2, 2, 6_700_000)]["error"] > netmodel.WITHIN  # 0.1 s measured: far off
    r.update(big=netmodel.big_predictions(r, [37_000, 6_700_000], 4), checks=netmodel.checks([*points, ps, hier, flat2]),
             failures=[], probes=probes, average_every=4)
    assert "4 hosts x 1 peer(s), 100mbit, 6.7 MB: allreduce 849.3 ms, param_server 3.40 s: 0.25x" in r["checks"]
    assert "2 hosts x 2 peer(s), 100mbit, 6.7 MB: hierarchical 100.0 ms, flat 900.0 ms: 0.11x" in r["checks"]
    text = network.markdown(r)
    assert "| 100mbit | 2x2 | 6.7 MB | hierarchical | 100.0 ms | 3 |" in text and "% ! | link |" in text
    assert "Link-bound points off by more than 30%: 100mbit 2x2 6.7 MB hierarchical (" in text
    assert "alpha 50 us (assumed)" in text and "(fitted here)" in text and "| param_server |" in text
    big = {(x["latency"], x["rate"], x["bytes"], x["strategy"]): x["per_update_s"] for x in r["big"]["rows"]}
    assert big[("assumed", "10gbit", 6_700_000, "param_server")] > 50 * big[("assumed", "10gbit", 6_700_000, "allreduce")]


def test_a_point_is_cpu_bound_where_the_same_sync_unshaped_takes_a_good_share_of_its_time():
    alpha, beta = 5e-4, 8 / 95e6
    shaped = [_ring_point(2, s, alpha, beta) for s in (64, 37_000, 1_000_000)]
    unshaped = [{**p, "rate": "unshaped", "per_update_s": 0.6e-3} for p in shaped]
    r = netmodel.compare([*shaped, *unshaped], [_probe("100mbit", 9.5e7, 1e8), _probe("unshaped", 5e9, None)], 4)
    bound = {(p["rate"], p["bytes"]): p["cpu_bound"] for p in r["points"]}
    # 64 B: a wake-up either way; 37 KB (3.9 ms shaped) and 1 MB: the link
    assert bound == {("100mbit", 64): True, ("100mbit", 37_000): False, ("100mbit", 1_000_000): False,
                     ("unshaped", 64): True, ("unshaped", 37_000): True, ("unshaped", 1_000_000): True}


def test_tbf_buckets_stay_shallow_below_a_gigabit():
    assert network.burst_bytes(1e7) == 3028 and network.burst_bytes(1e8) == 3125
    assert network.burst_bytes(1e9) == 125_000


def _options(monkeypatch, argv):
    monkeypatch.setattr(netns, "available", lambda: None)
    return parse_args(["--network", *argv])


def test_network_options_and_their_refusals(monkeypatch, capsys):
    a = _options(monkeypatch, ["100mbit", "unshaped", "--hosts", "2", "4", "--peers-per-host", "1", "2",
                               "--max-peers", "4"])
    assert a.network == ["100mbit", "unshaped"] and network.layouts(a) == [(2, 1), (2, 2), (4, 1)]
    for argv, line in ((["100mbps"], "--network 100mbps: allowed: a rate in tc's units"),
                       (["1gbit", "--hosts", "1"], "--hosts=1: must be an integer >= 2"),
                       (["1gbit", "--peers-per-host", "0"], "--peers-per-host=0: must be an integer >= 1"),
                       (["1gbit", "--hosts", "4", "--max-peers", "3"], "--max-peers=3: leaves no star"),
                       (["1gbit", "--bucket-bytes", "8"], "--bucket-bytes=8: must be an integer >= 64"),
                       (["1gbit", "--point-seconds", "0"], "--point-seconds=0: must be positive")):
        with pytest.raises(SystemExit) as e:
            _options(monkeypatch, argv)
        assert e.value.code == 2 and line in capsys.readouterr().err
    monkeypatch.setattr(netns, "available", lambda: "network namespaces need root")
    with pytest.raises(SystemExit) as e:
        parse_args(["--network", "1gbit"])
    assert e.value.code == 2 and "--network: network namespaces need root" in capsys.readouterr().err


def test_train_options_plan_and_refusals(monkeypatch, capsys, tmp_path):
    from p2prl.bench import linktrain
    a = _options(monkeypatch, ["10mbit", "100mbit", "--train", "lunarlander-ppo", "--variants", "allreduce",
                               "local_sgd+int8", "--seeds", "0", "1", "-o", "comm.average_every=8"])
    jobs = linktrain.plan(a, tmp_path)
    assert [(j["seed"], j["rate"], j["variant"]) for j in jobs][:3] == [(0, "10mbit", "allreduce"),
                                                                       (0, "10mbit", "local_sgd+int8"),
                                                                       (0, "100mbit", "allreduce")]
    assert len(jobs) == 8 and jobs[1]["run_dir"] == tmp_path / "runs" / "10mbit" / "lunarlander-ppo" / "local_sgd-int8" / "seed0"
    ov = linktrain.overrides("lunarlander-ppo", "local_sgd+int8", 1, tmp_path / "r", a)
    assert ov[:5] == ["algo=ppo", "env=lunarlander", "train.target_return=200", "comm=local_sgd", "comm.compress=int8"]
    assert ov[-3:] == ["comm.average_every=8", "seed=1", f"hydra.run.dir={(tmp_path / 'r').resolve()}"]
    assert _options(monkeypatch, ["1gbit", "--train", "breakout-ppo"]).variants == list(linktrain.VARIANTS)
    for argv, line in ((["1gbit", "--train", "breakout-ppo", "--variants", "allreduce+zip"],
                        "--variants allreduce+zip: allowed: a strategy (allreduce, param_server, local_sgd, gossip), "
                        "optionally +bf16|int8|lowrank"),
                       (["1gbit", "--train", "breakout-ppo", "--hosts", "2", "4"],
                        "--hosts 2 4: --train runs one layout; allowed: one value"),
                       (["1gbit", "--variants", "allreduce"], "--variants: needs --train")):
        with pytest.raises(SystemExit) as e:
            _options(monkeypatch, argv)
        assert e.value.code == 2 and line in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse_args(["--train", "cartpole-ppo"])
    assert e.value.code == 2 and "--train: needs --network RATE" in capsys.readouterr().err


@pytest.mark.parametrize("module", [None, "p2prl.bench.syncbench"])
def test_multinode_runs_the_module_it_is_given(tmp_path, module):
    stub = tmp_path / "torchrun"
    stub.write_text('#!/usr/bin/env bash\necho "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "NNODES": "1", "HEAD_ADDR": "127.0.0.1", "LOCAL_ADDR": "127.0.0.1", "TORCHRUN": str(stub),
           **({"MODULE": module} if module else {})}
    out = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "x.json", "--bytes", "64"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    assert out.strip().endswith(f"-m {module or 'p2prl.train'} x.json --bytes 64"), out


def _syncbench(rank, strategies):
    args = syncbench.parse_args(["unused.json", "--bytes", "4096", "--seconds", "0.05", "--max-blocks", "4",
                                 "--strategies", *strategies])
    return syncbench.measure(args)


def test_syncbench_times_every_strategy_on_real_peers(peers):
    doc, other = peers(_syncbench, 2, list(syncbench.ROWS), timeout=120)
    assert other is None and doc["world_size"] == 2 and doc["nodes"] == [[0, 1]]
    rows = {(r["strategy"], r["bytes"]): r for r in doc["rows"]}
    # one host: no hierarchical sums; the terms' all-reduce anchors the fit's latency
    assert set(rows) == {("allreduce", 64), *((s, 4096) for s in ("allreduce", "param_server", "local_sgd", "gossip"))}
    assert rows[("local_sgd", 4096)]["block"] == 4 and rows[("gossip", 4096)]["block"] == 2
    assert all(3 <= r["blocks"] <= 4 and 0 < r["min_s"] <= r["per_update_s"] <= r["max_s"] for r in rows.values())


@pytest.mark.slow
def test_syncbench_times_hierarchical_sums_on_two_nodes_of_two(peers):
    doc = peers(_syncbench, 4, ["allreduce", "hierarchical"], timeout=170, per_node=2)[0]
    assert doc["nodes"] == [[0, 1], [2, 3]]
    assert {(r["strategy"], r["bytes"]) for r in doc["rows"]} == {("allreduce", 64), ("allreduce", 4096),
                                                                 ("hierarchical", 4096)}


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@needs_netns
def test_the_link_probe_sees_the_shaped_rate_and_the_star_goes_away():
    with netns.Star(2, rate="20mbit", burst=network.burst_bytes(2e7)) as star:
        m = linkprobe.measure(star, _env(), seconds=0.5)
        assert [(q["src"], q["dst"]) for q in m["pairs"]] == [(0, 1), (1, 0)]
        # tbf caps every direction at the set rate (and lets most of it through)
        assert all(0.5 * 2e7 < q["bits_per_s"] < 1.1 * 2e7 for q in m["pairs"]), m
        assert m["rtt_s"] > 0
    assert star.leftovers() == []


def _ours() -> tuple[list[str], list[str]]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [n for n in names.split() if n.startswith("p2prl-")], sorted(p.name for p in Path("/dev/shm").glob(".p2prl-*"))


def _bench(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m p2prl.bench --network 50mbit *argv` into tmp_path/bench, which must succeed."""
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "-m", "p2prl.bench", "--network", "50mbit", *argv, "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=560)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p, out


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_network_end_to_end_on_two_shaped_hosts_leaves_nothing(tmp_path):
    before = _ours()
    p, out = _bench(tmp_path, "--hosts", "2", "--bucket-bytes", "20000", "--point-seconds", "0.2")
    r = json.loads((out / "network.json").read_text())
    assert {q["strategy"] for q in r["points"]} == {"allreduce", "param_server", "local_sgd", "gossip"}
    assert r["links"][0]["shaping"]["burst"] == 3028 and len(r["probes"][0]["pairs"]) == 2
    assert "| 50mbit | 2x1 | 20 KB | param_server |" in (out / "network.md").read_text()
    assert "Per-update sync" in p.stdout
    assert _ours() == before  # namespaces, links (inside them) and each host's /dev/shm, all removed


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_network_train_on_two_shaped_hosts_reports_each_variant_and_leaves_nothing(tmp_path):
    before = _ours()
    _, out = _bench(tmp_path, "--train", "cartpole-ppo", "--variants", "allreduce", "allreduce+int8", "--seeds", "0",
                    "--max-seconds", "400", "-o", "train.total_steps=1024", "-o", "train.log_every_steps=256")
    runs = {r["variant"]: r for r in json.loads((out / "train.json").read_text())["runs"]}
    assert set(runs) == {"allreduce", "allreduce+int8"} and all(r["final_step"] == 1024 for r in runs.values())
    # the same updates, a quarter of the gradient's bytes and a little more (scales, terms) per update
    assert runs["allreduce"]["updates"] == runs["allreduce+int8"]["updates"] > 0
    ratio = runs["allreduce+int8"]["bytes_per_update"] / runs["allreduce"]["bytes_per_update"]
    assert 0.2 < ratio < 0.4, ratio
    assert "| cartpole-ppo | 50mbit | 2x1 | allreduce+int8 | 0 |" in (out / "train.md").read_text()
    assert (out / "train.png").stat().st_size > 0
    assert _ours() == before
