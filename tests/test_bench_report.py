"""`python -m p2prl.bench --report`: the results page and its PNGs from synthetic bench dirs written here
(bench.json, and each run's summary.json and metrics.jsonl as a bench leaves them), merging dirs, and
the refusals. Nothing is trained."""
import json
from pathlib import Path

import pytest

from p2prl.bench import references, results, runs as bench

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
HOST = {"platform": "Linux-test", "cpus": 8, "loadavg_at_start": [0.5, 0.4, 0.3], "python": "3.11", "torch": "2.13.0"}
STEPS = (200, 400, 600, 800, 1000)


def config(algo: str, env: str, env_id: str, target, budget: int) -> dict:
    return {"algo": {"name": algo}, "env": {"name": env, "id": env_id, "target_return": 1500},
            "train": {"total_steps": budget, "target_return": target}}


def write_run(out: Path, task: str, seed: int, returns, evals: dict, cfg: dict, reached_at=None) -> dict:
    """A p2prl run dir (summary.json, metrics.jsonl: a row per STEPS, time_s = step / 100, greedy
    evaluations at `evals`' steps) and its bench.json record; `reached_at`: it stopped at its target."""
    run_dir = out / "runs" / task / "p2prl-2" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "time_s": s / 100, "episode_return_mean": r, "sps": 100.0,
             **({"eval_return_mean": evals[s], "eval_return_std": 1.0} if s in evals else {})}
            for s, r in zip(STEPS, returns)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"reached": reached_at is not None, "steps_to_target": reached_at, "final_step": rows[-1]["step"],
               "time_to_target_s": reached_at and reached_at / 100, "episode_return_mean": returns[-1],
               "config": cfg, "git": {"commit": "abcdef0123456789", "dirty": False}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return {"task": task, "system": "p2prl-2", "seed": seed, "error": None, "watched": False,
            **{k: summary[k] for k in ("reached", "steps_to_target", "time_to_target_s", "final_step")}}


def write_bench(out: Path, records: list, presets: dict) -> Path:
    doc = {"created": "2026-01-02T03:04:05", "argv": ["bench", "--presets", "ppo_halfcheetah", "--out", out.name],
           "settings": {"target": None}, "host": HOST, "presets": presets, "runs": records}
    (out / "bench.json").write_text(json.dumps(doc))
    return out


CHEETAH = config("ppo", "halfcheetah", "HalfCheetah-v5", None, 1000)  # run past the target: the budget's end
PRESETS = {"ppo_halfcheetah": {"target": 1500, "budget": 1000, "cut": False}}


@pytest.fixture
def two_seeds(tmp_path) -> Path:
    """ppo_halfcheetah, seeds 0 (crosses 1500 at step 600) and 1 (never does)."""
    out = tmp_path / "a"
    return write_bench(out, [
        write_run(out, "ppo_halfcheetah", 0, [100, 800, 1600, 1700, 1800], {600: 1200.0, 1000: 3000.0}, CHEETAH),
        write_run(out, "ppo_halfcheetah", 1, [100, 300, 500, 700, 900], {600: 900.0, 1000: 2000.0}, CHEETAH)], PRESETS)


def returns_row(page: str, task: str) -> list[str]:
    line = next(x for x in page.splitlines() if x.startswith(f"| {task} | p2prl-2 |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_page_reports_returns_and_steps_to_target_over_seeds(two_seeds, tmp_path, capsys):
    page = tmp_path / "docs" / "results.md"
    assert bench.main(["--report", str(page), str(two_seeds)]) == 0
    text = page.read_text()
    task, system, env, seeds, budget, target, steps, greedy, trained, reached, to_target, seconds = \
        returns_row(text, "ppo_halfcheetah")
    assert (env, seeds, budget, target, steps) == ("HalfCheetah-v5", "0, 1", "1,000", "1500", "1000")
    assert greedy == "2500.0 (2000.0-3000.0)"  # the last evaluations' mean and range, not the earlier ones
    assert trained == "1350.0 (900.0-1800.0)"
    # The runs went on past the target: its first crossing from the rows; a miss is infinite.
    assert (reached, to_target, seconds) == ("1/2", "inf (600-inf)", "inf (6-inf)")
    assert f"`python -m p2prl.bench --report {page} {two_seeds}`" in text
    assert "| 2026-01-02T03:04:05 | Linux-test, 8 CPUs, load 0.5, 0.4, 0.3 |" in text and "abcdef0123" in text
    assert f"`python -m p2prl.bench --presets ppo_halfcheetah --out {two_seeds.name}`" in text
    assert (page.parent / "results" / "ppo_halfcheetah.png").read_bytes()[:8] == PNG
    assert "![ppo_halfcheetah](results/ppo_halfcheetah.png)" in text
    assert "1 PNG(s)" in capsys.readouterr().out


def test_the_env_column_tells_a_continuous_variant_from_the_discrete_task_of_its_id():
    lander = {"id": "LunarLander-v3", "kwargs": {"continuous": True}}
    assert results.env_label(lander) == "LunarLander-v3 (continuous)"
    assert results.env_label({**lander, "kwargs": {}}) == "LunarLander-v3"
    assert results.env_label({"id": "HalfCheetah-v5"}) == "HalfCheetah-v5"


def test_reference_rows_say_source_env_budget_and_evaluation(two_seeds, tmp_path):
    page = tmp_path / "results.md"
    results.write(page, [two_seeds], "cmd")
    refs = [x for x in page.read_text().splitlines() if x.startswith("| ppo_halfcheetah | [")]
    assert refs == [
        "| ppo_halfcheetah | [rl-baselines3-zoo](https://github.com/DLR-RM/rl-baselines3-zoo/blob/master/benchmark.md)"
        " | 5819.1 | HalfCheetah-v3 | 1,000,000 | yes (one agent, evaluated after training) |",
        "| ppo_halfcheetah | [CleanRL ppo_continuous_action.py](https://github.com/vwxyzjn/cleanrl/blob/master/docs/"
        "benchmark/ppo_continuous_action.md) | 1442.64 | HalfCheetah-v4 | 1,000,000 | no (training episodes, mean of 3 seeds) |"]
    assert {r.value for r in references.references("ppo", "walker2d")} == {3478.798, 2287.95}
    assert references.references("qlearning", "taxi") == []


def test_the_curve_draws_the_target_and_only_references_trained_no_longer(two_seeds, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(results, "_save", lambda fig, out: drawn.setdefault(out.name, fig) and out)
    runs = [{**results.measure(b, rec), "bench": b} for b, rec in results.merge(
        [results.Bench(two_seeds, json.loads((two_seeds / "bench.json").read_text()))]).values()]
    groups = {"p2prl-2": runs}
    short = references.Reference("ppo", "halfcheetah", references.ZOO, 1234.0, "HalfCheetah-v3", 1000, True)
    results.plot_task("t", groups, [short, *references.references("ppo", "halfcheetah")], tmp_path / "t.png")
    labels = [t.get_text() for t in drawn["t.png"].axes[0].get_legend().get_texts()]
    assert labels == ["p2prl-2 training (mean of 2)", "p2prl-2 greedy evaluation (mean of 2)",
                      "rl-baselines3-zoo: 1234 (HalfCheetah-v3, 1,000 steps)", "target 1500"]  # 1M-step ones left out


def returns_table(page: str) -> str:
    return page.split("## Returns")[1].split("## Published")[0]


def test_the_page_keeps_its_runs_and_regenerates_from_them_alone(two_seeds, tmp_path):
    """PAGE/data holds the runs the page shows and nothing else, as bench dirs the report reads: the page
    made from them alone has the same returns, and a newer dir named after them replaces a seed."""
    later = tmp_path / "b"
    write_bench(later, [write_run(later, "ppo_halfcheetah", 0, [100, 1600, 1700, 1800, 1900], {1000: 4000.0}, CHEETAH),
                        write_run(later, "ppo_halfcheetah", 1, [100, 300, 500, 700, 900], {1000: 100.0}, CHEETAH)],
                PRESETS)
    page = tmp_path / "docs" / "results.md"
    results.write(page, [later, two_seeds], "cmd")  # `later`'s runs both lose: nothing of it is kept
    data = page.parent / "results" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["a"]
    kept = json.loads((data / "a" / "bench.json").read_text())
    assert kept["source"] == str(two_seeds) and [r["seed"] for r in kept["runs"]] == [0, 1]
    rows = [json.loads(x) for x in (data / "a" / "runs" / "ppo_halfcheetah" / "p2prl-2" / "seed0" / "metrics.jsonl")
            .read_text().splitlines()]
    assert [r["step"] for r in rows] == list(STEPS) and set(rows[2]) == {"step", "time_s", "episode_return_mean",
                                                                          "eval_return_mean", "eval_return_std", "sps"}
    first = page.read_text()
    results.write(page, [data / "a"], "cmd")  # from the kept copy alone, in place
    again = page.read_text()
    assert returns_table(again) == returns_table(first) and f"| `{two_seeds}` (kept in `results/data/a`) |" in again
    assert sorted(p.name for p in data.iterdir()) == ["a"] and not (data.parent / "data.new").exists()
    for name in ("gone.png", "mine.png"):  # a task the earlier page showed; a figure that is not the page's
        (data.parent / name).write_bytes(PNG)
    page.write_text(page.read_text() + "\n![gone](results/gone.png)\n")
    results.write(page, [data / "a", later], "cmd")  # a newer dir wins both seeds: `a` is dropped
    assert sorted(p.name for p in data.iterdir()) == ["b"]
    assert sorted(p.name for p in data.parent.glob("*.png")) == ["mine.png", "ppo_halfcheetah.png"]
    assert not any(p.name.startswith("data.") for p in data.parent.iterdir())
    assert returns_row(page.read_text(), "ppo_halfcheetah")[7] == "2050.0 (100.0-4000.0)"


def test_a_write_that_stopped_between_the_renames_loses_no_kept_data(two_seeds, tmp_path):
    page = tmp_path / "results.md"
    results.write(page, [two_seeds], "cmd")
    data = tmp_path / "results" / "data"
    data.rename(data.with_name("data.old"))  # as if it stopped after moving the old data aside
    results.write(page, [data / "a"], "cmd")  # put back first, then read as usual
    assert json.loads((data / "a" / "bench.json").read_text())["source"] == str(two_seeds)
    assert not data.with_name("data.old").exists()


@pytest.mark.parametrize("inside", ["results/data", "results/data/x", "results/data/a/runs", "results/data.new/a"])
def test_a_dir_that_the_write_would_rebuild_is_refused(two_seeds, tmp_path, capsys, inside):
    page = tmp_path / "results.md"
    results.write(page, [two_seeds], "cmd")  # results/data/a: kept, allowed as input
    d = tmp_path / inside
    d.mkdir(parents=True, exist_ok=True)
    (d / "bench.json").write_text((two_seeds / "bench.json").read_text())  # a bench dir without `source`
    before = page.read_text()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--report", str(page), str(tmp_path / "results" / "data" / "a"), str(d)])
    assert stop.value.code == 2 and page.read_text() == before
    data = tmp_path / "results" / "data"
    assert capsys.readouterr().err == (f"python -m p2prl.bench: error: BENCH_DIR {d}: inside {data}, which --report "
                                       f"rebuilds; allowed: a bench --out dir outside it, or a dir that --report kept "
                                       f"there ({data}/NAME)\n")


def test_two_dirs_pool_their_seeds_and_the_later_wins_a_seed_in_both(two_seeds, tmp_path):
    later = tmp_path / "b"
    write_bench(later, [
        write_run(later, "ppo_halfcheetah", 1, [100, 1600, 1700, 1800, 1900], {1000: 4000.0}, CHEETAH),
        write_run(later, "ppo_halfcheetah", 2, [100, 200, 1500, 1600, 1700], {1000: 3500.0}, CHEETAH),
        write_run(later, "ppo_cartpole", 0, [100, 300, 480, 490, 500], {},
                  config("ppo", "cartpole", "CartPole-v1", 475, 100_000), reached_at=555)],
        {**PRESETS, "ppo_cartpole": {"target": 475, "budget": 100_000, "cut": False}})
    page = tmp_path / "results.md"
    results.write(page, [two_seeds, later], "cmd")
    text = page.read_text()
    row = returns_row(text, "ppo_halfcheetah")
    assert row[3] == "0, 1, 2" and row[7] == "3500.0 (3000.0-4000.0)"  # seed 1 from the later dir: 4000
    assert row[9:11] == ["3/3", "600 (400-600)"]
    cartpole = returns_row(text, "ppo_cartpole")  # stopped at its target: summary.json's step, not a row's
    assert cartpole[5:] == ["475", "1000", "-", "500.0", "1/1", "555", "6"]
    assert f"| `{two_seeds}` (kept in `results/data/a`) |" in text and "![ppo_cartpole](results/ppo_cartpole.png)" in text
    assert f"| `{later}` (kept in `results/data/b`) |" in text
    assert "| ppo_cartpole | [CleanRL ppo.py]" in text
    table = returns_table(text)
    assert table.index("| ppo_cartpole |") < table.index("| ppo_halfcheetah |")  # by task, not by dir
    results.write(page, [later, two_seeds], "cmd")  # the other order: seed 1 from the first dir (2000) now
    assert returns_row(page.read_text(), "ppo_halfcheetah")[7] == "2833.3 (2000.0-3500.0)"


@pytest.mark.parametrize("make, line", [
    (lambda d: None, "BENCH_DIR {d}: no bench.json; allowed: the --out dir of a python -m p2prl.bench run"),
    (lambda d: (d.mkdir(), (d / "bench.json").write_text('{"runs": []}')), "BENCH_DIR {d}: its bench.json holds no runs")])
def test_a_dir_without_results_is_refused_and_nothing_written(tmp_path, capsys, make, line):
    d, page = tmp_path / "bench", tmp_path / "results.md"
    make(d)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--report", str(page), str(d)])
    assert stop.value.code == 2 and not page.exists() and not (tmp_path / "results").exists()
    assert capsys.readouterr().err == f"python -m p2prl.bench: error: {line.format(d=d)}\n"


def test_validation_md_lists_the_report_refusals():
    doc = (ROOT / "docs" / "validation.md").read_text()
    for line in ("python -m p2prl.bench: error: BENCH_DIR bench/x: no bench.json; allowed: the --out dir of a "
                 "python -m p2prl.bench run", "python -m p2prl.bench: error: BENCH_DIR bench/x: its bench.json holds no runs",
                 "python -m p2prl.bench: error: --report needs at least one BENCH_DIR (the --out dir of a python -m "
                 "p2prl.bench run)", "python -m p2prl.bench: error: --report=results.txt: allowed: a Markdown file (PAGE.md)",
                 "python -m p2prl.bench: error: BENCH_DIR docs/results/data/x: inside docs/results/data, which --report "
                 "rebuilds; allowed: a bench --out dir outside it, or a dir that --report kept there "
                 "(docs/results/data/NAME)"):
        assert f"`{line}`" in doc, line


def test_a_bench_dir_without_report_is_refused(two_seeds, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main([str(two_seeds)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"python -m p2prl.bench: error: BENCH_DIR {two_seeds}: read only with --report PAGE.md\n"


def test_a_bench_task_with_sb3_beside_p2prl(tmp_path):
    """A fixed-budget task of the default mode: SB3's row from its record alone (no metrics), the budget
    and the watched target from the task, negative ranges written with "to"."""
    out = tmp_path / "sac"
    pendulum = config("sac", "pendulum", "Pendulum-v1", None, 20_000)
    p2prl_run = write_run(out, "pendulum-sac", 0, [-1200, -900, -400, -190, -150], {1000: -160.0}, pendulum)
    sb3 = [{"task": "pendulum-sac", "system": "sb3", "seed": s, "error": None, "watched": True, "reached": s == 0,
            "steps_to_target": 900 if s == 0 else None, "time_to_target_s": 30.0 if s == 0 else None,
            "final_step": 20_000, "episode_return_mean": -180.0 - 100 * s,
            "evaluations": [[10_000, -500.0, 9.0], [20_000, -170.0 - 60 * s, None]]} for s in (0, 1)]
    write_bench(out, [p2prl_run, *sb3], {})
    page = tmp_path / "results.md"
    results.write(page, [out], "cmd")
    text = page.read_text()
    line = next(x for x in text.splitlines() if x.startswith("| pendulum-sac | sb3 |"))
    assert line == ("| pendulum-sac | sb3 | Pendulum-v1 | 0, 1 | 20,000 | -200 | 20000 | -200.0 (-230.0 to -170.0) | "
                    "-230.0 (-280.0 to -180.0) | 1/2 | inf (900-inf) | inf (30-inf) |")
    assert returns_row(text, "pendulum-sac")[9:11] == ["1/1", "800"]  # p2prl crossed -200 at step 800
    assert "| pendulum-sac | [rl-baselines3-zoo](" in text and "| -156.995 | Pendulum-v1 | 20,000 |" in text


def test_two_bench_dirs_of_one_name_are_kept_apart(tmp_path):
    dirs = []
    for parent, seed in (("s1", 0), ("s2", 1)):
        out = tmp_path / parent / "hc"
        out.mkdir(parents=True)
        dirs.append(write_bench(out, [write_run(out, "ppo_halfcheetah", seed, [1, 2, 3, 4, 5], {}, CHEETAH)], PRESETS))
    page = tmp_path / "results.md"
    results.write(page, dirs, "cmd")
    data = tmp_path / "results" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["hc", "hc-2"]
    assert [json.loads((data / n / "bench.json").read_text())["source"] for n in ("hc", "hc-2")] == list(map(str, dirs))
