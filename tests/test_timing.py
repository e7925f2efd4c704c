"""Where the time goes: the stopwatch's parts are disjoint and, with the unattributed rest, add up to the
loop's time by construction; every rank's breakdown reaches metrics.jsonl (rank 0's shares as flat keys,
TensorBoard, the progress line) and summary.json; `train.profile_iterations` writes a trace."""
import json
import logging
import math
import time

import pytest

from p2prl.timing import PARTS, Stopwatch, shares, shares_line, since

pytestmark = pytest.mark.timeout(180)
RUN = ("algo=ppo", "env=cartpole", "algo.num_envs=2", "algo.num_steps=32", "algo.num_minibatches=2",
       "algo.update_epochs=2", "train.total_steps=1024", "train.log_every_steps=256", "train.target_return=null",
       "checkpoint.every_steps=512", "comm.timeout_s=30")
COLUMNS = (*PARTS, "rest", "loop")


class FakeComm:
    seconds = 0.0


def test_collectives_inside_a_part_count_as_comm_once():
    comm = FakeComm()
    clock = Stopwatch(comm)
    with clock("forward"):
        t0 = time.perf_counter()
        sum(range(200000))  # a collective, as the communicator accounts one
        inside = time.perf_counter() - t0
        comm.seconds += inside
        sum(range(200000))  # the block's own work
    t = clock.totals()
    assert t["comm"] == inside and t["forward"] > 0
    assert t["forward"] + t["comm"] <= t["loop"]  # not counted twice
    assert math.isclose(sum(v for k, v in t.items() if k != "loop"), t["loop"], rel_tol=1e-9)


def test_parts_rest_and_loop_add_up_and_intervals_subtract():
    clock = Stopwatch()
    for part in ("env", "inference", "env"):
        with clock(part):
            sum(range(20000))
    first = clock.totals()
    with clock("log"):
        sum(range(20000))
    second = clock.totals()
    step = since(second, first)
    for t in (first, second, step):
        assert all(v >= 0 for v in t.values()), t
        assert math.isclose(sum(v for k, v in t.items() if k != "loop"), t["loop"], rel_tol=1e-9)
    assert step["env"] == 0 and step["log"] > 0
    share = shares(second)
    assert math.isclose(sum(share.values()), 1.0) and "loop" not in share
    assert shares_line({"env": 0.41, "inference": 0.2, "eval": 0.001, "rest": 0.004}) == "env 41% inf 20% rest 0%"


def test_a_part_timed_inside_another_is_refused():
    clock = Stopwatch()
    with pytest.raises(AssertionError, match="'env' was started inside 'inference'"):
        with clock("inference"):
            with clock("env"):
                pass
    with clock("env"):  # the failed nesting left no part running
        pass
    assert clock.active is None and clock.seconds["env"] > 0


def _check(breakdown: dict) -> None:
    """One rank's breakdown: every column there, none negative, parts and rest summing to the loop."""
    assert set(breakdown) == set(COLUMNS)
    assert all(v >= 0 for v in breakdown.values()), breakdown
    assert math.isclose(sum(breakdown[k] for k in (*PARTS, "rest")), breakdown["loop"], rel_tol=1e-9, abs_tol=1e-9)
    assert breakdown["env"] > 0 and breakdown["inference"] > 0 and breakdown["forward"] > 0
    assert breakdown["backward"] > 0 and breakdown["optimizer"] > 0


def _run(rank: int, cfg, run_dir):
    from p2prl.runner import run
    return run(cfg, run_dir)


def test_every_ranks_breakdown_is_in_metrics_and_summary_on_two_peers(tmp_path, compose, peers):
    run_dir = tmp_path / "run"
    s0, s1 = peers(_run, 2, compose(*RUN), run_dir, timeout=150)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert len(row["time_by_rank"]) == 2
        for breakdown in row["time_by_rank"]:
            _check(breakdown)
        own = shares(row["time_by_rank"][0])  # rank 0's flat keys: its shares of the interval
        assert all(row[f"time/{k}"] == pytest.approx(v) for k, v in own.items())
        assert math.isclose(sum(row[f"time/{k}"] for k in (*PARTS, "rest")), 1.0, rel_tol=1e-9)
    for summary in (s0, s1):
        assert len(summary["time"]) == 2
        for breakdown in summary["time"]:
            _check(breakdown)
        assert summary["time"][0]["loop"] == pytest.approx(s0["loop_s"])
        # The rows' intervals cover the loop up to the last row.
        assert sum(r["time_by_rank"][1]["loop"] for r in rows) <= summary["time"][1]["loop"]


def test_progress_line_tensorboard_and_profile_on_one_peer(tmp_path, compose, caplog):
    from test_trackers import events

    from p2prl.runner import run
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="p2prl.metrics"):
        run(compose(*RUN, "train.profile_iterations=2"), run_dir)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 4 and all(" env " in line and " fwd " in line and "% rest " in line for line in lines)
    tb = events(run_dir)
    assert {f"time/{k}" for k in (*PARTS, "rest")} <= set(tb)
    trace = json.loads((run_dir / "profile" / "rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"env", "inference", "forward", "backward", "optimizer"} <= names  # the parts as ranges
