"""The results page: `python -m p2prl.bench --report PAGE.md BENCH_DIR [BENCH_DIR ...]` writes one Markdown
page, and beside it one PNG per task in a folder named after the page (docs/results.md:
docs/results/<task>.png), from bench dirs that `python -m p2prl.bench` already wrote (their bench.json
and each p2prl run's summary.json and metrics.jsonl). It runs nothing.

Per task (a `--presets` preset or a bench task) and system, over its seeds: the budget, the greedy
evaluation return at the end (each run's last `train.eval_every_steps` evaluation; mean, min-max), the
training return at the end, steps and seconds to the target (median, min-max; a run that went on past
the target, e.g. with `-o train.target_return=null`, counts the first row whose training return window
reached the preset's target), and the published returns of `p2prl.bench.references`. The PNG draws the
training return and the greedy evaluations against global steps (mean and min-max band over seeds), and
as horizontal lines the target and every reference trained for no more steps than the budget (one
trained longer is listed, not drawn: a 10M-step Atari score beside a 100k-step curve says nothing).

Several bench dirs merge run by run: the seeds of a task pool across dirs, and where two dirs hold the
same task, system and seed, the dir named later wins (name a rerun after the run it replaces).

The page keeps its own data: the record of every run it shows (its dir's bench.json narrowed to those runs,
each p2prl run's summary.json and its metrics rows cut to the columns the page reads) goes to
PAGE/data/<bench dir's name>/, a bench dir itself, so the page can be regenerated, and grown, on any machine:
`--report docs/results.md docs/results/data/* NEW_BENCH_DIR`. Every write rebuilds data/ (a dir in it that
--report did not make is refused as input) and removes the PNGs that only the earlier page linked.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

import numpy as np

from p2prl.atomic import write_atomic
from p2prl.bench import report, tables
from p2prl.bench.references import Reference, references
from p2prl.bench.tasks import TASKS
from p2prl.plot import _figure, _save, draw_band, read_metrics, series
from p2prl.sweep import saved_config

PROG = "python -m p2prl.bench"


# The metrics columns the page reads (`measure`, `plot_task`), and a run's speed: what PAGE/data keeps of a row.
KEPT_COLUMNS = ("step", "time_s", "episode_return_mean", "eval_return_mean", "eval_return_std", "sps", "comm_frac")


@dataclass(frozen=True)
class Bench:
    path: Path  # as named on the command line
    doc: dict[str, Any]  # its bench.json

    @property
    def source(self) -> str:
        """Where its runs were made: the dir named, or for a kept copy the dir it was copied from."""
        return self.doc.get("source") or str(self.path)


def data_folder(page: Path) -> Path:
    """Where the page keeps the records of its runs (`keep`): PAGE/data."""
    return page.parent / page.stem / "data"


def check_dirs(page: Path, dirs: Sequence[Path], error: Callable[[str], NoReturn]) -> None:
    """Refuse, through `error` (one line, exit 2), a page that is not Markdown, a dir that holds no bench
    results, and a dir that the write would rebuild under it (PAGE/data itself, anything deeper in it or
    in its staging folders, and a dir in it that `keep` did not make), before anything is written."""
    if page.suffix != ".md":
        error(f"--report={page}: allowed: a Markdown file (PAGE.md)")
    if not dirs:
        error("--report needs at least one BENCH_DIR (the --out dir of a python -m p2prl.bench run)")
    data = data_folder(page)
    owned = [data.resolve(), *(data.with_name(data.name + x).resolve() for x in (".new", ".old"))]
    for d in dirs:
        doc = report.read_json(d / "bench.json")
        if doc is None:
            error(f"BENCH_DIR {d}: no bench.json; allowed: the --out dir of a python -m p2prl.bench run")
        if not doc.get("runs"):
            error(f"BENCH_DIR {d}: its bench.json holds no runs")
        r = d.resolve()
        if any(r == o or (o in r.parents and not (r.parent == owned[0] and doc.get("source"))) for o in owned):
            error(f"BENCH_DIR {d}: inside {data}, which --report rebuilds; allowed: a bench --out dir outside it, "
                  f"or a dir that --report kept there ({data}/NAME)")


def merge(benches: Sequence[Bench]) -> dict[tuple[str, str, int], tuple[Bench, dict[str, Any]]]:
    """Every run record by (task, system, seed); a key that several dirs hold keeps the last dir's."""
    runs: dict[tuple[str, str, int], tuple[Bench, dict[str, Any]]] = {}
    for b in benches:
        for rec in b.doc["runs"]:
            runs[(rec["task"], rec["system"], rec["seed"])] = (b, rec)
    return runs


def _target(doc: dict[str, Any], task: str, cfg: Optional[dict[str, Any]]) -> Optional[float]:
    """The run's own target, else its task's: the preset's default, the bench task's (or --target)."""
    if cfg and cfg["train"].get("target_return") is not None:
        return cfg["train"]["target_return"]
    if task in doc.get("presets", {}):
        return doc["presets"][task]["target"]
    if task in TASKS:
        return TASKS[task].target if doc["settings"].get("target") is None else doc["settings"]["target"]
    return cfg["env"].get("target_return") if cfg else None


def env_label(env: dict[str, Any]) -> str:
    """The gymnasium id a run's env section names, and "continuous" where its keyword arguments make the
    actions so (LunarLander-v3 with continuous=True is not the discrete task of the same id)."""
    return env["id"] + (" (continuous)" if (env.get("kwargs") or {}).get("continuous") else "")


def run_dir(b: Bench, rec: dict[str, Any]) -> Path:
    return b.path / "runs" / rec["task"] / rec["system"] / f"seed{rec['seed']}"


def measure(b: Bench, rec: dict[str, Any]) -> dict[str, Any]:
    """One run: its record in bench.json completed from its dir (evaluations, the training return at the
    end, the target's first crossing for a run that did not stop at it) and its curves."""
    task, run_dir_ = rec["task"], run_dir(b, rec)
    summary = report.read_json(run_dir_ / "summary.json") or {}
    cfg = summary.get("config") or saved_config(run_dir_)
    rows = read_metrics(run_dir_) if (run_dir_ / "metrics.jsonl").is_file() else []
    target = _target(b.doc, task, cfg)
    if cfg:
        algo, env, env_id = cfg["algo"]["name"], cfg["env"]["name"], env_label(cfg["env"])
        budget = cfg["train"]["total_steps"]
    else:  # an SB3 run (a bench task's), or a p2prl run that never wrote its config
        t = TASKS.get(task)
        algo, env = (t.algo, t.env) if t else task.partition("_")[::2]
        env_id = t.gym_id if t else "-"
        budget = (b.doc["settings"].get("budget") or t.budget) if t and t.fixed else None
    m = {k: rec.get(k) for k in ("system", "seed", "reached", "steps_to_target", "time_to_target_s", "final_step",
                                 "episode_return_mean")}
    m.update(task=task, algo=algo, env=env, env_id=env_id, budget=budget, target=target, git=summary.get("git"),
             failed=rec.get("error") is not None, stopped=bool(rec.get("reached")) and not rec.get("watched"),
             evaluations=rec.get("evaluations") or [], train=series(rows))
    if rows:
        seen = report.watched(rows, target)
        m["evaluations"] = seen["evaluations"]
        trained = m["train"][1]
        m["episode_return_mean"] = float(trained[-1]) if len(trained) else m["episode_return_mean"]
        if not m["reached"] and target is not None:
            m.update({k: seen[k] for k in ("reached", "steps_to_target", "time_to_target_s")})
    m["eval_return_mean"] = m["evaluations"][-1][1] if m["evaluations"] else None
    return m


def spread(values: Sequence[Optional[float]]) -> Optional[dict[str, float]]:
    """Mean, min and max of the known values (None: none known)."""
    xs = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)} if xs else None


def _distinct(values: Sequence[Any], show: Callable[[Any], str]) -> str:
    return ", ".join(show(v) for v in dict.fromkeys(v for v in values if v is not None)) or "-"


def row(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The page's row of one task and system over its runs (seeds)."""
    r, targeted = runs[0], any(m["target"] is not None for m in runs)
    failed = sum(m["failed"] for m in runs)
    seeds = ", ".join(str(m["seed"]) for m in sorted(runs, key=lambda m: m["seed"]))
    seeds += f" ({failed} failed)" if failed else ""
    return [r["task"], r["system"], r["env_id"], seeds, _distinct([m["budget"] for m in runs], lambda v: f"{v:,}"),
            _distinct([m["target"] for m in runs], lambda v: f"{v:g}"),
            tables.fmt(report.stat(m["final_step"] for m in runs if m["final_step"] is not None), 0),
            tables.fmt(spread([m["eval_return_mean"] for m in runs]), 1, "mean"),
            tables.fmt(spread([m["episode_return_mean"] for m in runs]), 1, "mean"),
            f"{sum(bool(m['reached']) for m in runs)}/{len(runs)}" if targeted else "-",
            tables.fmt(report.stat(m["steps_to_target"] for m in runs), 0) if targeted else "-",
            tables.fmt(report.stat(m["time_to_target_s"] for m in runs), 0) if targeted else "-"]


def plot_task(task: str, groups: dict[str, list[dict[str, Any]]], refs: Sequence[Reference], out: Path) -> Path:
    """Training return (solid) and greedy evaluations (dashed, dots) of each system against global steps,
    the target and the references trained for at most the budget as horizontal lines."""
    fig, (ax,) = _figure(width=7.0)
    runs = [m for ms in groups.values() for m in ms]
    for i, (system, ms) in enumerate(groups.items()):
        trained = [m for m in ms if len(m["train"][0])]
        if trained:
            draw_band(ax, [m["train"] for m in trained], [m["stopped"] for m in trained], f"C{i}", f"{system} training")
        evaluated = [m for m in ms if m["evaluations"]]
        if evaluated:
            curves = [tuple(np.array([e[:2] for e in m["evaluations"]], dtype=float).T) for m in evaluated]
            draw_band(ax, curves, [m["stopped"] for m in evaluated], f"C{i}", f"{system} greedy evaluation",
                      linestyle="--", marker="o", markersize=3)
    budget = max((m["budget"] for m in runs if m["budget"]), default=0)
    for k, ref in enumerate(r for r in refs if r.budget <= budget):
        ax.axhline(ref.value, color=f"C{len(groups) + k}", linestyle="-.", linewidth=1,
                   label=f"{ref.source.name}: {ref.value:g} ({ref.env_id}, {ref.budget:,} steps)")
    targets = {m["target"] for m in runs if m["target"] is not None}
    for target in targets:
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set(title=task, xlabel="global env steps", ylabel="return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def where(benches: Sequence[Bench], runs: Sequence[dict[str, Any]], kept: Sequence[Optional[Path]]) -> str:
    """Each bench dir (and where `keep` put its copy): when, on what machine, with which versions and
    command, from which p2prl commit."""
    body = []
    for b, copy in zip(benches, kept):
        h, mine = b.doc["host"], [m for m in runs if m["bench"] is b]
        versions = ", ".join(f"{k} {h[k]}" for k in ("python", "torch", "gymnasium", "mujoco", "stable_baselines3")
                             if k in h)
        commits = _distinct([m["git"] and m["git"]["commit"][:10] + ("+dirty" if m["git"].get("dirty") else "")
                             for m in mine], str)
        load = ", ".join(f"{x:.1f}" for x in h["loadavg_at_start"])
        command = f"{PROG} {shlex.join(b.doc['argv'][1:])}"
        copy_ = f" (kept in `{copy}`)" if copy is not None else ""
        body.append([f"`{b.source}`{copy_}", b.doc["created"], f"{h['platform']}, {h['cpus']} CPUs, load {load}", versions,
                     commits, f"`{command}`"])
    return tables.markdown_table(("bench dir", "created", "machine at the start", "versions", "p2prl commit",
                                  "bench command"), body)


RETURNS_NOTE = """Mean (min-max) over seeds for returns, median (min-max) for steps and seconds to the target (inf: a
run that never reached it). Greedy return at the end: each run's last greedy evaluation
(`train.eval_every_steps`, `train.eval_episodes` episodes): at the budget, or for a run that stopped at its target
the last one before it; `-`: no evaluations (run the bench with `-o train.eval_every_steps=N`). Training return:
the mean of the last 20 finished training episodes. Steps to target: global env steps when the training return
first reached the target; seconds: from the start of training, on the machine above."""


def page(benches: Sequence[Bench], runs: Sequence[dict[str, Any]], command: str, figures: str,
         kept: Sequence[Optional[Path]], regenerate: str) -> tuple[str, dict]:
    """The Markdown page, and the PNGs to draw: {task: (its systems' runs, its references)}; `kept`: where
    each bench's copy went (`keep`), relative to the page; `regenerate`: the command that remakes the page
    from the copies."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for m in sorted(runs, key=lambda m: (m["task"], m["system"])):  # the same page whatever the dirs' order
        groups.setdefault(m["task"], {}).setdefault(m["system"], []).append(m)
    table = [row(ms) for systems in groups.values() for ms in systems.values()]
    refs = {task: references(s[next(iter(s))][0]["algo"], s[next(iter(s))][0]["env"]) for task, s in groups.items()}
    ref_rows = [[task, f"[{r.source.name}]({r.source.url})", f"{r.value:g}", r.env_id, f"{r.budget:,}",
                 ("yes" if r.deterministic else "no") + f" ({r.source.how})"] for task, rs in refs.items() for r in rs]
    parts = [
        "# Results", f"Generated by `{command}` from the bench dirs below; regenerate it rather than edit it. "
        f"The records of its runs are kept in `{figures}/data/`, so `{regenerate}` regenerates it on any machine "
        "with new runs added (a run in a newer dir replaces the same task, system and seed).",
        "## Where and when", where(benches, runs, kept),
        "## Returns", tables.markdown_table(("task", "system", "env", "seeds", "budget", "target", "steps run",
                                             "greedy return at the end", "training return at the end", "reached",
                                             "steps to target", "seconds to target"), table), RETURNS_NOTE,
        "## Published references",
        tables.markdown_table(("task", "source", "return", "env", "trained for", "greedy evaluation"), ref_rows)
        if ref_rows else "None of these tasks has one.",
        "## Curves", *(f"![{task}]({figures}/{task}.png)" for task in groups)]
    return "\n\n".join(parts) + "\n", {task: (systems, refs[task]) for task, systems in groups.items()}


def _copy_run(src: Path, dst: Path) -> None:
    """The files of one run dir that the page reads: summary.json (else Hydra's saved config) and the
    metrics rows cut to KEPT_COLUMNS."""
    dst.mkdir(parents=True)
    if (src / "summary.json").is_file():
        shutil.copyfile(src / "summary.json", dst / "summary.json")
    elif (src / ".hydra" / "config.yaml").is_file():
        (dst / ".hydra").mkdir()
        shutil.copyfile(src / ".hydra" / "config.yaml", dst / ".hydra" / "config.yaml")
    if (src / "metrics.jsonl").is_file():
        rows = [{k: r[k] for k in KEPT_COLUMNS if k in r} for r in read_metrics(src)]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def keep(data: Path, benches: Sequence[Bench], used: Sequence[tuple[Bench, dict[str, Any]]]) -> list[Optional[Path]]:
    """Stage the new content of the folder `data` (in data.new; `swap` puts it in place) from the runs the
    page shows: per bench that has one, a bench dir of its own (bench.json narrowed to those runs, with
    `source` saying where they were made, and each run's files, `_copy_run`), named after the bench dir
    (a copy already in `data` keeps its name). Where each bench's copy will be."""
    recs = {id(b): [rec for u, rec in used if u is b] for b in benches}
    home, shown = data.resolve(), [b for b in benches if recs[id(b)]]
    names = {id(b): b.path.name for b in shown if b.path.resolve().parent == home}
    for b in shown:
        if id(b) not in names:
            base, n = b.path.resolve().name, 1
            while (name := base if n == 1 else f"{base}-{n}") in names.values():
                n += 1
            names[id(b)] = name
    new = data.with_name(data.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    kept: list[Optional[Path]] = []
    for b in benches:
        if not recs[id(b)]:
            kept.append(None)
            continue
        out = new / names[id(b)]
        for rec in recs[id(b)]:
            _copy_run(run_dir(b, rec), run_dir(Bench(out, {}), rec))
        (out / "bench.json").write_text(json.dumps({**b.doc, "source": b.source, "runs": recs[id(b)]}, indent=1) + "\n")
        kept.append(data / names[id(b)])
    return kept


def swap(data: Path) -> None:
    """Put the staged data.new in place of `data`; the old content is removed only once the new is in."""
    old = data.with_name(data.name + ".old")
    if data.exists():
        data.rename(old)
    data.with_name(data.name + ".new").rename(data)
    shutil.rmtree(old, ignore_errors=True)


def recover(data: Path) -> None:
    """After a write that stopped between `swap`'s two renames: data.old is the kept data, put it back."""
    old = data.with_name(data.name + ".old")
    if old.exists():
        if data.exists():  # stopped after the second rename: data is the new one
            shutil.rmtree(old)
        else:
            old.rename(data)


def linked_pngs(page_path: Path) -> set[Path]:
    """The PNGs in PAGE/ that the page now on disk shows."""
    text = page_path.read_text() if page_path.is_file() else ""
    folder = page_path.parent / page_path.stem
    return {folder / name for name in re.findall(rf"!\[[^\]]*\]\({re.escape(page_path.stem)}/([^/)]+\.png)\)", text)}


def write(page_path: Path, dirs: Sequence[Path], command: str) -> list[Path]:
    """Read and merge `dirs` (checked by `check_dirs`), keep the records of its runs (`keep`), draw the
    PNGs, then swap the records in, remove the PNGs that only the earlier page showed and write the page,
    last; the files written (the page, then the PNGs)."""
    data = data_folder(page_path)
    recover(data)
    benches = [Bench(d, report.read_json(d / "bench.json")) for d in dirs]
    used = list(merge(benches).values())
    runs = [{**measure(b, rec), "bench": b} for b, rec in used]
    kept = keep(data, benches, used)
    text, figures = page(benches, runs, command, page_path.stem,
                         [k and k.relative_to(page_path.parent) for k in kept],
                         f"{PROG} --report {shlex.quote(str(page_path))} {shlex.quote(str(data))}/* NEW_BENCH_DIR ...")
    pngs = [plot_task(task, systems, refs, data.parent / f"{task}.png")
            for task, (systems, refs) in figures.items()]
    swap(data)
    for stale in linked_pngs(page_path) - set(pngs):
        stale.unlink(missing_ok=True)
    write_atomic(page_path, text)
    return [page_path, *pngs]


def main(page_path: Path, dirs: Sequence[Path], emit: Callable[[str], None]) -> int:
    command = f"{PROG} {shlex.join(['--report', str(page_path), *map(str, dirs)])}"
    written = write(page_path, dirs, command)
    emit(f"wrote {written[0]} and {len(written) - 1} PNG(s) in {page_path.parent / page_path.stem}")
    return 0
