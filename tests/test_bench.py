"""p2prl.bench: argument parsing, the run plan, aggregation, tables, bench.json and plots on synthetic
results, and one end-to-end run on a tiny budget. Timings are never asserted."""
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2prl import plot, sweep
from p2prl.bench import plans, report, runs as bench, sb3 as bench_sb3, tables

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
HAS_SB3 = importlib.util.find_spec("stable_baselines3") is not None
PNG = b"\x89PNG\r\n\x1a\n"


def fake_find_spec(missing=(), present=("Box2D", "mujoco", "stable_baselines3")):
    """find_spec as if `missing` were not installed and `present` were (whatever this machine has)."""
    real = importlib.util.find_spec
    return lambda name, *a: None if name in missing else object() if name in present else real(name, *a)


def test_parse_args_defaults(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(missing={"stable_baselines3"}))
    a = bench.parse_args([])
    assert a.tasks == ["cartpole-ppo", "cartpole-dqn"] and a.seeds == [0, 1, 2]
    assert a.systems == ["p2prl-1", "p2prl-2", "p2prl-1-global"]  # sb3 dropped: not installed
    assert a.max_seconds == 300 and a.override == [] and not a.scaling


@pytest.mark.parametrize("argv, cap", [
    (["--tasks", "halfcheetah-sac"], 100_000 / 20),  # a fixed budget: long enough at 20 steps/s
    (["--tasks", "cartpole-ppo", "pendulum-sac"], 20_000 / 20),
    (["--tasks", "pendulum-sac", "--budget", "2000"], 300),  # never below the default
    (["--tasks", "halfcheetah-sac", "--max-seconds", "60"], 60),
    (["--scaling", "halfcheetah-sac"], 300),  # scaling runs are short: the budget does not apply
    (["--tasks", "halfcheetah-ppo", "--target", "1000"], 300),  # run to a target, not a budget
    (["--tasks", "halfcheetah-sac", "--target", "1000"], 100_000 / 20),  # a watched target: the budget still runs
    (["--cost-model", "--tasks", "halfcheetah-ppo"], 300),  # trains nothing
    (["--network", "50", "--train", "halfcheetah-sac"], 100_000 / 20),  # trains its --train tasks
])
def test_a_fixed_budget_task_is_not_cut_by_the_default_cap(monkeypatch, argv, cap):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    assert bench.parse_args(argv).max_seconds == cap


def test_parse_args_options(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--lunarlander", "--tasks", "cartpole-ppo", "--seeds", "3", "--systems", "sb3",
                          "-o", "train.total_steps=512", "-o", "algo.lr=1e-3", "--max-seconds", "60"])
    assert a.tasks == ["cartpole-ppo", "lunarlander-ppo", "lunarlander-dqn"]
    assert a.seeds == [3] and a.systems == ["sb3"] and a.max_seconds == 60
    assert a.override == ["train.total_steps=512", "algo.lr=1e-3"]


def test_parse_args_rejects(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(missing={"Box2D"}))
    with pytest.raises(SystemExit):
        bench.parse_args(["--scaling"])
    assert "box2d" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "nosuchtask"])
    for bad, message in ((["--stepping", "--stepping-cores", "0"], "--stepping-cores=0: must be positive"),
                         (["--stepping", "--stepping-num-envs", "4", "-1"], "--stepping-num-envs=-1: must be positive"),
                         (["--startup", "0"], "--startup=0: must be positive"), (["--seeds", "-1"], "--seeds=-1")):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert message in capsys.readouterr().err


def test_plan_is_interleaved_by_seed(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--seeds", "0", "1", "--target", "100", "-o", "train.total_steps=512"])
    jobs = bench.plan(a, tmp_path)
    assert [(j.seed, j.task, j.system) for j in jobs[:6]] == [
        (0, t, s) for t in ("cartpole-ppo", "cartpole-dqn") for s in ("p2prl-1", "p2prl-2", "sb3")]
    assert [j.seed for j in jobs[6:]] == [1] * 6
    one, two, sb3 = jobs[:3]
    assert one.cmd[1:3] == ("-m", "p2prl.train") and "--nproc_per_node=2" in two.cmd
    assert f"--rdzv-endpoint=127.0.0.1:{bench.PORT}" in two.cmd  # the port is chosen at launch
    for j in (one, two):
        assert {"algo=ppo", "env=cartpole", "train.target_return=100.0", "train.total_steps=512", "seed=0",
                f"hydra.run.dir={j.run_dir.resolve()}"} <= set(j.cmd)
    assert sb3.cmd[1:3] == ("-m", "p2prl.bench.sb3") and "train.total_steps=512" not in sb3.cmd
    assert sb3.cmd[sb3.cmd.index("--target") + 1] == "100.0"
    assert len({j.run_dir for j in jobs}) == len({j.log for j in jobs}) == len(jobs)


def test_plan_scaling_fixes_per_peer_work(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--scaling", "--scaling-steps", "1000", "--seeds", "0"])
    jobs = bench.plan_scaling(a, tmp_path)
    assert [(j.task, j.system) for j in jobs] == [(f"{t}-fixed-work", s) for t in ("lunarlander-ppo", "halfcheetah-ppo",
                                                                                 "halfcheetah-sac")
                                                  for s in ("p2prl-1", "p2prl-2-apart", "p2prl-2")]
    # the ceiling: 2 peers at the same work that never average; the others keep the default strategy
    apart = jobs[1]
    same = (lambda cmd: [c for c in cmd if c not in plans.APART and not c.startswith("hydra.run.dir=")])
    assert set(plans.APART) <= set(apart.cmd) and same(apart.cmd) == same(jobs[2].cmd)
    assert not any(c.startswith("comm=") for c in jobs[0].cmd + jobs[2].cmd)
    jobs = [j for j in jobs if j.system != "p2prl-2-apart"]
    # SAC: the same per-peer batch and updates on both; each peer's own warm-up steps alike
    sac_one, sac_two = jobs[4:]
    assert {"algo=sac", "algo.learning_starts=1000"} <= set(sac_one.cmd) and "algo.learning_starts=2000" in sac_two.cmd
    assert not any(c.startswith(("algo.batch_size", "algo.gradient_steps")) for c in sac_one.cmd + sac_two.cmd)
    for one, two, env in ((jobs[0], jobs[1], "lunarlander"), (jobs[2], jobs[3], "halfcheetah")):
        assert "train.total_steps=1000" in one.cmd and "train.total_steps=2000" in two.cmd
        assert {"algo=ppo", f"env={env}", "train.target_return=null"} <= set(two.cmd)
        # logs and checkpoints as often per peer: counted in global steps, so twice the steps on 2 peers
        log_every = 4096 if env == "lunarlander" else 8192  # the preset's
        assert f"train.log_every_steps={log_every}" in one.cmd and f"train.log_every_steps={2 * log_every}" in two.cmd
        assert "checkpoint.every_steps=10000" in one.cmd and "checkpoint.every_steps=20000" in two.cmd
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(missing={"mujoco"}))
    with pytest.raises(SystemExit):
        bench.parse_args(["--scaling"])  # halfcheetah-ppo needs the mujoco extra


def test_halfcheetah_runs_a_fixed_budget_against_the_zoos_normalized_ppo(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--tasks", "halfcheetah-ppo", "--seeds", "0"])
    one, two, whole, sb3 = bench.plan(a, tmp_path)
    assert {"algo=ppo", "env=halfcheetah", "train.target_return=null", "train.total_steps=1000000"} <= set(two.cmd)
    # 1 peer at SB3's settings: the zoo's 512 samples per rollout on one peer (the preset: 256 per peer)
    assert whole.system == "p2prl-1-global" and "algo.num_steps=512" in whole.cmd and "p2prl.train" in whole.cmd
    assert sb3.cmd[sb3.cmd.index("--env") + 1] == "HalfCheetah-v5" and "--target" not in sb3.cmd
    assert sb3.cmd[sb3.cmd.index("--steps") + 1] == "1000000"
    spec = bench_sb3.ZOO[("ppo", "HalfCheetah-v5")]
    kwargs = bench_sb3.model_kwargs("ppo", "HalfCheetah-v5", 1_000_000)
    assert spec["normalize"] and spec["n_envs"] * kwargs["n_steps"] == 512 and kwargs["batch_size"] == 64


def test_sac_tasks_run_the_zoos_global_batch_and_ratio_on_every_system(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--tasks", "halfcheetah-sac", "--seeds", "0"])
    one, two, sb3 = bench.plan(a, tmp_path)
    for job, batch, updates in ((one, 256, 1), (two, 128, 2)):  # the zoo's 256 per update, one update per env step
        assert {"algo=sac", "env=halfcheetah", "train.target_return=null", "train.total_steps=100000",
                f"algo.batch_size={batch}", f"algo.gradient_steps={updates}", "algo.train_freq=1",
                "train.eval_every_steps=10000", "train.log_every_steps=1000"} <= set(job.cmd)
        assert job.watch == 2500
    assert sb3.cmd[sb3.cmd.index("--watch") + 1] == "2500" and "--target" not in sb3.cmd
    assert sb3.cmd[sb3.cmd.index("--eval-every") + 1] == "10000" and sb3.cmd[sb3.cmd.index("--steps") + 1] == "100000"
    assert bench_sb3.ZOO[("sac", "HalfCheetah-v5")]["kwargs"]["learning_starts"] == 10_000


def test_watched_targets_and_evaluations_from_the_rows():
    rows = [{"step": 1000, "time_s": 10.0, "episode_return_mean": None},
            {"step": 2000, "time_s": 20.0, "episode_return_mean": -500.0, "eval_return_mean": -400.0, "eval_return_std": 5.0},
            {"step": 3000, "time_s": 30.0, "episode_return_mean": -190.0},
            {"step": 4000, "time_s": 40.0, "episode_return_mean": -250.0, "eval_return_mean": -150.0, "eval_return_std": 1.0}]
    w = report.watched(rows, -200)
    assert w["reached"] and w["steps_to_target"] == 3000 and w["time_to_target_s"] == 30.0
    assert w["evaluations"] == [[2000, -400.0, 5.0], [4000, -150.0, 1.0]] and w["eval_return_mean"] == -150.0
    assert not report.watched(rows, 0)["reached"] and "reached" not in report.watched(rows, None)


@pytest.mark.skipif(not HAS_SB3, reason="needs stable-baselines3")
def test_sb3_sac_evaluates_greedily_and_watches_without_stopping():
    out = bench_sb3.train("sac", "Pendulum-v1", 0, None, 300, None, watch=-1e9, eval_every=200, eval_episodes=1)
    assert out["final_step"] == 300 and out["reached"] and out["steps_to_target"] <= 300
    assert [e[0] for e in out["evaluations"]] == [200, 300] and out["eval_return_mean"] == out["evaluations"][-1][1]


@pytest.mark.skipif(not (HAS_SB3 and importlib.util.find_spec("mujoco")), reason="needs stable-baselines3 and mujoco")
def test_sb3_halfcheetah_trains_with_vecnormalize():
    out = bench_sb3.train("ppo", "HalfCheetah-v5", 0, None, 512, None)
    assert out["final_step"] == 512 and out["budget"] == 512 and out["episode_return_mean"] is None


def test_stepping_times_every_kind_and_says_why_one_is_missing():
    from p2prl.bench import stepping
    m = stepping.measure(["cartpole"], [2], 0.05, 1)
    (row,) = m["rows"]
    assert row["env"] == "cartpole" and row["num_envs"] == 2 and m["cores"] == 1
    assert isinstance(row["sync"], float) and isinstance(row["async"], float) and row["sync"] > 0 < row["async"]
    assert isinstance(row["envpool"], float) or row["envpool"].startswith("env.vectorization=envpool")
    fake = {"cores": 1, "seconds": 2.0, "rows": [
        {"env": "breakout", "num_envs": 4, "sync": 950.0, "async": 700.5, "envpool": "env.vectorization=envpool: no"}]}
    text = stepping.format_stepping(fake)
    assert "950" in text and "700" in text and "- breakout envpool: env.vectorization=envpool: no" in text


def run(system, seed, reached, t=None, sps=1000.0, **kw):
    return {"task": "cartpole-ppo", "system": system, "seed": seed, "reached": reached, "sps": sps,
            "launch_to_target_s": t, "steps_to_target": 100 * t if t else None, "error": None, **kw}


RUNS = [run("p2prl-2", 0, True, 10.0, comm_frac=0.1), run("p2prl-2", 1, False, comm_frac=0.3),
        run("p2prl-2", 2, True, 20.0, comm_frac=0.2), run("sb3", 0, False), run("sb3", 1, False),
        run("sb3", 2, True, 5.0, sps=500.0, error=None)]


def test_stat_counts_misses_as_infinite():
    assert report.stat([3.0, None, 1.0]) == {"median": 3.0, "min": 1.0, "max": math.inf}
    assert report.stat([None, None, 1.0])["median"] == math.inf
    assert report.stat([]) is None


def test_aggregate_medians_and_ranges():
    p2, sb3 = report.aggregate(RUNS)
    assert (p2["system"], p2["runs"], p2["reached"], p2["failed"]) == ("p2prl-2", 3, 2, 0)
    assert p2["launch_to_target_s"] == {"median": 20.0, "min": 10.0, "max": math.inf}
    assert p2["steps_to_target"]["median"] == 2000
    assert p2["comm_frac"] == {"median": 0.2, "min": 0.1, "max": 0.3}
    assert sb3["launch_to_target_s"] == {"median": math.inf, "min": 5.0, "max": math.inf}
    assert sb3["sps"] == {"median": 1000.0, "min": 500.0, "max": 1000.0}
    assert sb3["comm_frac"] is None  # unknown, not a miss


def test_derive_profile_and_first_step_time():
    summary = {"reached": True, "steps_to_target": 2000, "time_to_target_s": 5.0, "final_step": 2000,
               "wall_s": 6.0, "sps": 1000.0, "comm_frac": 0.25, "comm_calls": 100, "world_size": 2}
    rec = report.derive(summary, launch_to_exit_s=9.0)
    assert rec["launch_to_target_s"] == 9.0
    assert rec["first_step_to_target_s"] == pytest.approx(1.0)  # startup = 6 - 2000/1000 s
    assert rec["comm_s"] == pytest.approx(0.5) and rec["comm_ms_per_call"] == pytest.approx(5.0)
    assert rec["comm_ms_per_update"] is None and rec["comm_bytes_per_call"] is None
    missed = report.derive({**summary, "reached": False, "time_to_target_s": None}, 9.0)
    assert missed["launch_to_target_s"] is None and missed["first_step_to_target_s"] is None


def test_each_run_reports_where_rank_0s_loop_time_went_and_its_unattributed_rest():
    parts = {"env": 4.0, "inference": 2.0, "forward": 1.0, "backward": 1.0, "optimizer": 0.5, "comm": 1.0,
             "checkpoint": 0.0, "eval": 0.0, "log": 0.1, "rest": 0.4}
    summary = {"reached": True, "steps_to_target": 2000, "time_to_target_s": 5.0, "final_step": 2000, "wall_s": 12.0,
               "sps": 200.0, "time": [{**parts, "loop": 10.0}, {**parts, "rest": 3.0, "loop": 12.6}]}
    rec = report.derive(summary, launch_to_exit_s=14.0)
    assert rec["rest_frac"] == pytest.approx(0.04) and rec["time_shares"]["env"] == pytest.approx(0.4)
    line = bench._describe({**rec, "error": None, "launch_to_exit_s": 14.0, "timed_out": False}, True)
    assert "rank 0's loop: env 40% inf 20% fwd 10% bwd 10% opt 5% comm 10% log 1% rest 4%" in line
    rows = report.aggregate([{**rec, "task": "cartpole-ppo", "system": "p2prl-1", "seed": 0, "error": None,
                              "launch_to_exit_s": 14.0}])
    assert rows[0]["rest_frac"]["median"] == pytest.approx(0.04)
    text = tables.format_results(rows)
    assert text.splitlines()[0].split()[-1] == "rest" and "0.040" in text
    assert report.derive({"final_step": 10, "sps": 1.0}, 2.0)["rest_frac"] is None  # SB3: no breakdown


def test_run_stopped_at_the_cap_keeps_its_last_logged_speed(tmp_path):
    assert report.last_metrics(tmp_path) == {}
    (tmp_path / "metrics.jsonl").write_text('{"step": 64, "sps": 10.0, "comm_frac": 0.1}\n'
                                            '{"step": 128, "sps": 20.0, "comm_frac": 0.2}\n')
    rec = report.derive(report.last_metrics(tmp_path), launch_to_exit_s=300.0)
    assert rec["final_step"] == 128 and rec["sps"] == 20.0 and rec["comm_frac"] == 0.2
    assert rec["reached"] is False and rec["launch_to_target_s"] is None


def test_a_fixed_budget_run_stopped_at_the_cap_still_says_where_it_reached_its_target(monkeypatch, tmp_path):
    """A watched run (fixed budget, target noted on the way) that the cap stops has no summary.json:
    its rows still say the first step its training return reached the target."""
    job = plans.Job("hopper-sac", "p2prl-2", 2, ("python", "-m", "p2prl.train"), tmp_path / "run",
                    tmp_path / "log.txt", 1500.0)

    def stopped(cmd, log_path, timeout):  # the run logged three rows, then the cap stopped it
        log_path.write_text("")
        rows = [{"step": 100, "sps": 80.0, "time_s": 10.0, "episode_return_mean": 900.0},
                {"step": 200, "sps": 81.0, "time_s": 20.0, "episode_return_mean": 1600.0, "eval_return_mean": 2000.0},
                {"step": 300, "sps": 82.0, "time_s": 30.0, "episode_return_mean": 1400.0}]
        (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return -15, 40.0, True

    monkeypatch.setattr(bench, "execute", stopped)
    rec = bench.run_job(job, max_seconds=40.0)
    assert rec["timed_out"] and rec["error"] is None
    assert rec["reached"] and rec["steps_to_target"] == 200 and rec["time_to_target_s"] == 20.0
    assert rec["final_step"] == 300 and rec["eval_return_mean"] == 2000.0 and rec["launch_to_target_s"] is None


def test_results_table():
    text = tables.format_results(report.aggregate(RUNS))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["task", "system", "reached"]
    p2, sb3 = lines[2], lines[3]
    assert "2/3" in p2 and "20.0 (10.0-inf)" in p2 and "0.200 (0.100-0.300)" in p2
    assert "1/3" in sb3 and "inf (5.0-inf)" in sb3 and " - " in sb3
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_scaling_report():
    runs = [{"system": "p2prl-1", "sps": 1000.0, "comm_frac": 0.0}, {"system": "p2prl-2", "sps": 1800.0,
                                                                    "comm_frac": 0.05}]
    s = report.scaling(runs)
    assert s["efficiency"] == pytest.approx(0.9) and s["speedup"] == pytest.approx(1.8) and s["ceiling"] is None
    assert "0.90" in tables.format_scaling(s) and "ceiling" not in tables.format_scaling(s)
    assert report.scaling(runs[:1])["efficiency"] is None
    # with the never-averaging pair: the machine allows 1.95x, the averaging peers reach 1800/1950 of it
    s = report.scaling([*runs, {"system": "p2prl-2-apart", "sps": 1900.0}, {"system": "p2prl-2-apart", "sps": 2000.0}])
    assert s["ceiling"] == pytest.approx(1.95) and s["of_ceiling"] == pytest.approx(1800 / 1950)
    text = tables.format_scaling(s)
    assert "never averaging" in text and "1.95x" in text and "0.92 of it" in text


def test_bench_json_and_png_from_synthetic_results(tmp_path):
    aggs = report.aggregate(RUNS)
    report.write_json(tmp_path / "bench.json", {"runs": RUNS, "aggregates": aggs})
    doc = json.loads((tmp_path / "bench.json").read_text())  # strict JSON: no Infinity
    assert doc["aggregates"][0]["launch_to_target_s"] == {"median": 20.0, "min": 10.0, "max": None}
    png = plot.bar_chart(aggs, "launch_to_target_s", "seconds", tmp_path / "bench.png")
    assert png.read_bytes()[:8] == PNG
    none_reached = [run("sb3", s, False) for s in range(2)]
    assert plot.bar_chart(report.aggregate(none_reached), "launch_to_target_s", "s", tmp_path / "b.png").is_file()


def test_fixed_budget_png_shows_speed_and_return(tmp_path):
    runs_ = [{"task": "breakout-ppo", "system": system, "seed": seed, "error": None, "reached": False,
              "sps": sps + seed, "episode_return_mean": ret} for seed in range(2)
             for system, sps, ret in (("p2prl-1", 300.0, 2.5), ("sb3", 272.0, -1.0))]
    rows = report.aggregate(runs_) + report.aggregate(RUNS)  # and a task with a target
    panels = {"breakout-ppo": [("sps", "steps/s", False), ("episode_return_mean", "return", False)],
              RUNS[0]["task"]: [("launch_to_target_s", "seconds", True)]}
    assert plot.bar_panels(rows, panels, tmp_path / "bench.png").read_bytes()[:8] == PNG


def test_plot_cli_draws_return_curves(tmp_path, capsys):
    dirs = [tmp_path / name / "seed0" for name in ("a", "b")]
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        rows = [{"step": 64 * k, "time_s": 0.1 * k, "episode_return_mean": 10.0 * k + i} for k in range(1, 5)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    assert sweep.labels(dirs) == ["a/seed0", "b/seed0"]
    assert plot.main([*map(str, dirs), "--x", "time_s"]) == 0
    *groups, out = capsys.readouterr().out.splitlines()  # runs without a config: a group each, by path
    assert groups == ["group a/seed0: 1 run", "group b/seed0: 1 run"]
    assert Path(out) == dirs[0] / "returns.png" and Path(out).read_bytes()[:8] == PNG


def test_zoo_schedules_keep_the_zoo_horizon():
    lr = bench_sb3.zoo_linear(1e-3, horizon=100_000, budget=200_000)
    assert lr(1.0) == pytest.approx(1e-3) and lr(0.75) == pytest.approx(5e-4) and lr(0.25) == 0.0
    kw = bench_sb3.model_kwargs("dqn", "CartPole-v1", budget=300_000)
    assert kw["exploration_fraction"] == pytest.approx(0.16 * 50_000 / 300_000)
    assert bench_sb3.budget_for("ppo", "CartPole-v1", None) == 100_000
    assert bench_sb3.budget_for("dqn", "CartPole-v1", None) == 300_000


def test_execute_stops_a_run_at_the_cap(tmp_path):
    rc, seconds, killed = bench.execute([sys.executable, "-c", "import signal; signal.pause()"],
                                        tmp_path / "log.txt", timeout=0.5)
    assert killed and rc != 0


def test_end_to_end_tiny_budget(tmp_path):
    # A target of 5 is reached at the first finished CartPole episode: the reached path, in seconds.
    systems = ["p2prl-1", "p2prl-2", *(["sb3"] if HAS_SB3 else [])]
    cmd = [sys.executable, "-m", "p2prl.bench", "--tasks", "cartpole-ppo", "--seeds", "0", "--systems", *systems,
           "--target", "5", "--sb3-steps", "512", "-o", "train.total_steps=512", "-o", "algo.num_envs=4",
           "-o", "algo.num_steps=16", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "launch->target s" in p.stdout and "bench.json" in p.stdout
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [r["system"] for r in doc["runs"]] == systems
    for r in doc["runs"]:
        assert r["reached"] and r["error"] is None and 0 < r["steps_to_target"] <= 512
        assert r["launch_to_target_s"] == r["launch_to_exit_s"] > 0 and r["first_step_to_target_s"] >= 0
    assert doc["runs"][0]["grad_bytes"] > 0 and doc["runs"][0]["comm_calls"] > 0
    assert {a["system"] for a in doc["aggregates"]} == set(systems) and doc["host"]["cpus"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG


def test_plan_strategies_covers_every_strategy_and_peer_count(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--strategies", "--tasks", "cartpole-ppo", "--seeds", "0", "--peers", "2", "4"])
    jobs = bench.plan_strategies(a, tmp_path)
    assert [j.system for j in jobs] == [f"{s}_x{n}" for s in plans.STRATEGIES for n in (2, 4)]
    for j in jobs:
        strategy, peers = j.system.rsplit("_x", 1)
        assert f"comm={strategy}" in j.cmd and f"--nproc_per_node={peers}" in j.cmd
        assert f"hydra.run.dir={j.run_dir.resolve()}" in j.cmd


def test_strategy_table_says_when_peers_outnumber_cores():
    rows = report.aggregate([run("allreduce_x4", 0, True, 3.0, comm_calls=10, updates=5)])
    text = tables.format_strategies(rows, cores=2)
    assert "allreduce_x4" in text and "4 peers on 2 cores are oversubscribed" in text
    assert "oversubscribed" not in tables.format_strategies(rows, cores=8)


def test_cost_model_fit_and_formulas_by_hand():
    from p2prl.bench import cost
    alpha, beta = 1e-4, 1e-9
    sizes = [1e3, 1e4, 1e5, 1e6]
    assert cost.fit(sizes, [alpha + beta * s for s in sizes]) == (pytest.approx(alpha), pytest.approx(beta))
    S = 1e6
    assert cost.predict("param_server", 2, S, alpha, beta) == pytest.approx(2 * (alpha + beta * S))
    assert cost.predict("param_server", 8, S, alpha, beta) == pytest.approx(14 * (alpha + beta * S))
    assert cost.ring(alpha, beta, S, 4) == pytest.approx(6 * (alpha + beta * S / 4))
    # small messages: recursive doubling (2 rounds for 4 peers) beats the ring's 6 steps
    assert cost.predict("allreduce", 4, 64, alpha, beta) == pytest.approx(2 * (alpha + beta * 64))
    assert cost.predict("local_sgd", 4, S, alpha, beta, average_every=4) == pytest.approx(
        cost.allreduce(alpha, beta, S, 4) / 4 + cost.allreduce(alpha, beta, cost.TERMS_BYTES, 4))
    assert cost.predict("gossip", 256, S, alpha, beta) < cost.predict("param_server", 256, S, alpha, beta)


def test_fixed_budget_tasks_run_their_budget_and_report_the_return(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--tasks", "breakout-ppo", "--seeds", "0", "--budget", "4096"])
    one, two, whole, sb3 = bench.plan(a, tmp_path)
    for j in (one, two, whole):
        assert {"algo=ppo", "env=breakout", "train.target_return=null", "train.total_steps=4096"} <= set(j.cmd)
    assert "algo.num_envs=8" in whole.cmd and "--nproc_per_node=2" not in whole.cmd  # SB3's 8 envs on 1 peer
    assert not any(c.startswith("algo.num_envs") for c in one.cmd + two.cmd)  # the preset's 4 per peer
    assert "--target" not in sb3.cmd and sb3.cmd[sb3.cmd.index("--steps") + 1] == "4096"
    assert sb3.cmd[sb3.cmd.index("--env") + 1] == "BreakoutNoFrameskip-v4"
    rec = report.derive({"final_step": 4096, "sps": 80.0, "episode_return_mean": 1.5, "max_rss_mb": [900.0, 950.5],
                         "wall_s": 60.0, "loop_s": 51.2}, 70.0)
    assert rec["max_rss_mb"] == 950.5 and not rec["reached"]
    rows = report.aggregate([{**rec, "task": "breakout-ppo", "system": "p2prl-2", "seed": 0, "error": None,
                              "launch_to_exit_s": 70.0}])
    text = tables.format_budget(rows)
    assert "breakout-ppo" in text and "950" in text and "1.5" in text and "80" in text


def test_dqn_learning_starts_reach_p2prl_and_sb3_alike(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--tasks", "breakout-dqn", "breakout-ppo", "--seeds", "0", "--budget", "20000"])
    whole = next(j for j in bench.plan(a, tmp_path) if j.system == "p2prl-1-global" and j.task == "breakout-dqn")
    assert {"algo.learning_starts=100000", "algo.target_update_interval=250"} <= set(whole.cmd)  # SB3's (the zoo's)
    a = bench.parse_args(["--tasks", "breakout-dqn", "breakout-ppo", "--seeds", "0", "--budget", "20000",
                          "--learning-starts", "2000"])
    jobs = bench.plan(a, tmp_path)
    for j in jobs:
        dqn = j.task == "breakout-dqn"
        if j.system == "sb3":
            assert (j.cmd[j.cmd.index("--learning-starts") + 1] == "2000") if dqn else "--learning-starts" not in j.cmd
        else:
            starts = [c for c in j.cmd if c.startswith("algo.learning_starts=")]
            assert starts == (["algo.learning_starts=2000"] if dqn else [])
    with pytest.raises(SystemExit) as refused:
        bench.parse_args(["--learning-starts", "-1"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == "python -m p2prl.bench: error: --learning-starts=-1: must be >= 0\n"
    with pytest.raises(SystemExit) as refused:  # the SB3 worker: DQN only
        bench_sb3.main(["--algo", "ppo", "--env", "CartPole-v1", "--learning-starts", "0", "--out", str(tmp_path / "r")])
    assert refused.value.code == 2
    assert "--learning-starts=0: allowed: an integer >= 0, with --algo dqn" in capsys.readouterr().err


def test_budget_table_and_png_show_speed_against_sb3_and_the_return(tmp_path):
    runs_ = [{"task": "breakout-ppo", "system": system, "seed": seed, "error": None, "reached": False,
              "sps": sps + seed, "episode_return_mean": ret, "final_step": 4096, "launch_to_exit_s": 60.0}
             for seed in range(2) for system, sps, ret in (("p2prl-1-global", 330.0, 2.5), ("sb3", 272.0, -1.0))]
    rows = report.aggregate(runs_)
    assert tables.vs_sb3(rows) == [f"{330.5 / 272.5:.2f}x", "1.00x"]
    text = tables.format_budget(rows)
    assert "vs sb3" in text.splitlines()[0] and "1.21x" in text and "p2prl-1-global: 1 peer" in text
    panels = {"breakout-ppo": [("sps", "steps/s", False), ("episode_return_mean", "return", False)]}
    assert plot.bar_panels(rows, panels, tmp_path / "bench.png").read_bytes()[:8] == PNG


def test_scaling_on_breakout_and_the_extra_it_needs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--scaling", "breakout-dqn", "--seeds", "0"])
    one, _, two = bench.plan_scaling(a, tmp_path)
    assert "train.total_steps=20000" in one.cmd and "train.total_steps=40000" in two.cmd
    # the same share of each peer's steps acts alone: 2,000 per peer
    assert "algo.learning_starts=2000" in one.cmd and "algo.learning_starts=4000" in two.cmd
    assert {"algo=dqn", "env=breakout"} <= set(two.cmd)
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(missing={"ale_py"}))
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "breakout-ppo"])
    assert "atari extra" in capsys.readouterr().err


def test_cost_model_fits_the_two_peer_allreduce():
    from p2prl.bench import cost
    alpha, beta = 2e-4, 7e-10
    rows = [{"bytes": s, "allreduce_gloo_s": alpha + beta * s, "exchange_s": 5e-3} for s in (256, 4096, 65536, 1 << 20)]
    m = cost.model({"rows": rows})
    assert m["alpha_s"] == pytest.approx(alpha) and m["beta_s_per_byte"] == pytest.approx(beta)
    assert [r["model_s"] for r in m["measured_vs_model"]] == pytest.approx([r["allreduce_gloo_s"] for r in rows])
    assert m["measured_vs_model"][0]["exchange_s"] == 5e-3  # set beside, not fitted


def test_straggler_plan_and_table(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec())
    a = bench.parse_args(["--stragglers", "--seeds", "0"])
    wait, cut = bench.plan_stragglers(a, tmp_path)
    assert "env.id=p2prl.bench.straggler:SlowCartPole-v1" in wait.cmd and "--nproc_per_node=2" in wait.cmd
    assert "comm.straggler_frac=0.5" in cut.cmd and not any("straggler_frac" in c for c in wait.cmd)
    rec = report.derive({"reached": True, "steps_by_rank": [800, 200], "final_step": 1000, "wall_s": 3.0,
                         "time_to_target_s": 2.5, "loop_s": 2.0, "steps_to_target": 1000}, 4.0)
    assert rec["last_rank_share"] == pytest.approx(0.2)
    rows = report.aggregate([{**rec, "task": "t", "system": cut.system, "seed": 0, "error": None}])
    assert "0.200" in tables.format_stragglers(rows)


def test_the_straggler_env_is_slower_on_rank_1_only(monkeypatch):
    import gymnasium as gym
    from p2prl.bench import straggler
    monkeypatch.setenv("P2PRL_BENCH_SLOW_S", "0.25")
    monkeypatch.setenv("RANK", "1")
    slow = gym.make(straggler.ENV_ID)
    monkeypatch.setenv("RANK", "0")
    fast = gym.make(straggler.ENV_ID)
    delays = [next(w.delay for w in _chain(e) if isinstance(w, straggler.SlowOnRank1)) for e in (slow, fast)]
    assert delays == [0.25, 0.0]


def _chain(env):
    while True:
        yield env
        if not hasattr(env, "env"):
            return
        env = env.env


def test_startup_probes_subtract_the_training_loop_and_name_torchruns_own_cost(tmp_path):
    from p2prl.bench import startup
    from p2prl.bench.plans import p2prl_cmd
    cmds = startup.probes(p2prl_cmd, tmp_path)
    assert cmds["torchrun alone"][-2:] == ["--no-python", "true"] and "--nproc_per_node=2" in cmds["torchrun alone"]
    assert "p2prl.train" in cmds["p2prl 1 peer"] and "torch.distributed.run" in cmds["p2prl 2 peers"]
    launch = {"python": 0.1, "import torch": 1.0, "import p2prl.train": 1.5, "torchrun alone": 1.6,
              "p2prl 1 peer": 2.5, "p2prl 2 peers": 4.5}
    calls = []

    def execute(cmd, log, timeout):  # a fake run: the p2prl probes leave a summary with their loop time
        name = {"pass": "python", "import torch": "import torch", "import p2prl.train": "import p2prl.train",
                "true": "torchrun alone"}.get(cmd[-1])
        if name is None:
            name = "p2prl 2 peers" if "torch.distributed.run" in cmd else "p2prl 1 peer"
        calls.append(name)
        if name.startswith("p2prl"):
            run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir="))[len("hydra.run.dir="):])
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps({"loop_s": 0.5}))
        return 0, launch[name], False

    m = startup.measure(execute, p2prl_cmd, tmp_path, repeats=2)
    assert calls == list(launch) * 2  # interleaved: every probe, then again
    med = {r["probe"]: r["median"] for r in m["rows"]}
    assert med["p2prl 2 peers"] == 4.0 and med["p2prl 1 peer"] == 2.0 and med["torchrun alone"] == 1.6
    assert m["derived"] == pytest.approx({"two_peers_extra_s": 2.0, "torchrun_own_s": 1.5})
    text = startup.format_startup(m)
    assert "2 peers over 1 peer: +2.00 s" in text and "torchrun's own cost (torchrun alone - python): 1.50 s" in text


def test_presets_run_every_tuned_preset_on_two_peers_with_atari_budgets_cut(monkeypatch, tmp_path, capsys):
    from p2prl.bench.plans import plan_presets
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(present=("Box2D", "mujoco", "ale_py")))
    a = bench.parse_args(["--presets", "--seeds", "0", "1"])
    names = sorted(p.stem for p in (ROOT / "conf" / "tuned").glob("*.yaml"))
    assert [p.name for p in a.preset_list] == names and a.max_seconds == 3600
    by = {p.name: p for p in a.preset_list}
    assert by["ppo_cartpole"].target == 475 and by["ppo_cartpole"].budget == 100_000 and not by["ppo_cartpole"].cut
    assert by["ppo_breakout"].cut and by["ppo_breakout"].budget == 100_000 and by["ppo_breakout"].target is None
    assert by["dqn_pong"].cut and by["dqn_pong"].budget == 150_000
    assert not by["qlearning_frozenlake8x8"].cut and by["qlearning_frozenlake8x8"].budget == 4_000_000
    jobs = plan_presets(a, tmp_path)
    assert [(j.task, j.seed) for j in jobs] == [(n, s) for s in (0, 1) for n in names]
    assert all(j.system == "p2prl-2" and "--nproc_per_node=2" in j.cmd for j in jobs)
    breakout = next(j for j in jobs if j.task == "ppo_breakout")
    assert {"train.target_return=null", "train.total_steps=100000", "algo.anneal_lr=false"} <= set(breakout.cmd)
    cartpole = next(j for j in jobs if j.task == "ppo_cartpole")
    assert not any(c.startswith("train.total_steps") for c in cartpole.cmd)  # its own budget and target
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "ppo_nosuchenv"])
    assert "--presets ppo_nosuchenv: no such preset; allowed: a2c_cartpole" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(missing={"ale_py"}))
    assert not any("breakout" in p.name for p in bench.parse_args(["--presets"]).preset_list)  # skipped
    rows = report.aggregate([run("p2prl-2", s, r, t) | {"task": "ppo_cartpole", "episode_return_mean": 480.0}
                             for s, r, t in ((0, True, 10.0), (1, False, None))])
    text = tables.format_presets(rows, {"ppo_cartpole": {"target": 475, "budget": 100_000, "cut": False}})
    assert "ppo_cartpole  475     100,000  1/2" in text and "inf" in text and "480.0" in text


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # it ended while we looked
            pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigterm_stops_the_bench_and_the_run_under_way(tmp_path):
    # A long 2-peer run: torchrun's peers run in sessions of their own, so a bench that died on SIGTERM
    # without killing them would leave them training.
    cmd = [sys.executable, "-m", "p2prl.bench", "--tasks", "cartpole-ppo", "--seeds", "0", "--systems", "p2prl-2",
           "-o", "train.target_return=null", "-o", "train.total_steps=100000000", "--out", str(tmp_path)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob("runs/**/metrics.jsonl")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)  # polls for the first logged row: the peers are training
    assert list(tmp_path.glob("runs/**/metrics.jsonl")), "the run never logged a row"
    assert _processes_naming(str(tmp_path)), "no peer of the run found"
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "interrupted" in out, out[-2000:]
    deadline = time.monotonic() + 10
    while _processes_naming(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL lands asynchronously
    assert _processes_naming(str(tmp_path)) == [], "the bench left processes of its run behind"
