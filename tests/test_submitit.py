"""Peers without torchrun: SLURM's and submitit's tasks (p2prl.launcher_env), Hydra's submitit launchers
running each job of a sweep as one multi-peer job, preemption and requeue, and Optuna's sweeper.

The submitit_slurm tests run SLURM's commands as stubs (tests/slurm_stub.py) that start a job's "nodes"
on this machine; they and the submitit_local ones skip without the submitit extra, the Optuna one
without the optuna extra."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2prl.bench import procs
from p2prl.launcher_env import first_host, launcher_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=2",
        "train.total_steps=256", "train.log_every_steps=64", "train.target_return=null"]
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                                    reason="needs the submitit extra")
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                                  reason="needs the optuna extra")


# -- torchrun's variables from the launcher's ------------------------------------------------------
def test_a_slurm_task_takes_its_place_from_slurms_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    assert launcher_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                 "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000),
                                 "P2PRL_LAUNCHER_JOB": "123456"}
    # An array task's id, uneven nodes, and what the user set stays.
    env.update(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3", SLURM_STEP_TASKS_PER_NODE="5,3", MASTER_PORT="29999")
    got = launcher_env(env)
    assert got["P2PRL_LAUNCHER_JOB"] == "77_3" and got["LOCAL_WORLD_SIZE"] == "3" and got["MASTER_PORT"] == "29999"


def test_submitits_local_tasks_and_what_is_left_alone():
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_JOB_ID": "4242"}
    got = launcher_env(local)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_WORLD_SIZE"], got["MASTER_ADDR"]) == ("1", "2", "2", "127.0.0.1")
    assert launcher_env({**local, "RANK": "0"}) == {}  # torchrun's worker: torchrun's variables stand
    assert launcher_env({**local, "SUBMITIT_LOCAL_NTASKS": "1"}) == {}  # a world of one
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == {}  # a batch script, not one of srun's tasks
    assert [first_host(x) for x in ("node[01-02,05],gpu3", "a1,a2", "pre[3-4]-ib")] == ["node01", "a1", "pre3-ib"]


@pytest.fixture
def slurm(tmp_path):
    import slurm_stub
    slurm_stub.install(tmp_path / "bin", tmp_path / "slurm")
    yield {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    for pid in slurm_stub.started(tmp_path / "slurm"):  # a failed test's jobs (sbatch's run in their own session)
        procs.kill_tree(pid)


def srun(args: list[str], slurm: dict, job_id: int, timeout: float) -> subprocess.CompletedProcess:
    """`srun` (the stub) of two tasks on two "nodes", each `python -m p2prl.train ARGS`."""
    env = {**os.environ, **slurm, "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "localhost,localhost"}
    return subprocess.run(["srun", sys.executable, "-m", "p2prl.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_srun_tasks_are_peers_without_torchrun(tmp_path, slurm):
    job = 10000 + os.getpid() % 5000  # its port: 20000 + job id mod 20000
    p = srun([*TINY, f"hydra.run.dir={tmp_path / 'run'}"], slurm, job, 240)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["world_size"] == 2 and all(n > 0 for n in s["steps_by_rank"])
    # A bad value: both tasks meet at rank 0's store before anything is written, and say it once.
    p = srun(["algo.lr=-1", f"hydra.run.dir={tmp_path / 'bad'}"], slurm, job + 1, 120)
    assert p.returncode == 2 and p.stderr == "p2prl: error: algo.lr=-1: must be a positive number\n", p.stderr
    assert not (tmp_path / "bad").exists()


# -- Hydra's submitit launchers --------------------------------------------------------------------
LAUNCHER_BAD = [  # docs/validation.md's rows of the launchers and sweepers, checked as `python -m p2prl.train` would
    (["hydra/launcher=submitit_local", "hydra.launcher.nodes=2"],
     "hydra.launcher.nodes=2: submitit_local runs every job on this machine; allowed: 1"),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=0"],
     "hydra.launcher.tasks_per_node=0: must be a positive integer"),
]


@needs_submitit
@pytest.mark.parametrize("args, line", LAUNCHER_BAD, ids=[" ".join(a) for a, _ in LAUNCHER_BAD])
def test_bad_launcher_settings_are_one_line(args, line, tmp_path):
    from p2prl.launch import check_command_line
    assert check_command_line(["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == line
    assert not (tmp_path / "sweep").exists()


@needs_submitit
def test_a_submitit_launcher_under_torchrun_is_refused(monkeypatch, tmp_path):
    from p2prl.launch import check_command_line
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_command_line(["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}"]) == (
        "hydra/launcher=submitit_local: starts every job's peers itself (hydra.launcher.nodes x tasks_per_node), "
        "and under torchrun every peer would submit the sweep again: start one process; allowed under torchrun: basic")


@needs_optuna
def test_an_optuna_search_checks_one_drawn_job_first(tmp_path):
    from p2prl.launch import check_command_line
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    assert check_command_line(["-m", "hydra/sweeper=optuna", "algo.lr=interval(-1, 1)", sweep]) == \
        "algo.lr=-1.0: must be a positive number"  # an interval's lower end
    assert check_command_line(["-m", "hydra/sweeper=optuna", "algo.lr=tag(log, interval(1e-5, 1e-2))",
                               "algo.ent_coef=interval(0, 0.01)", sweep]) is None


def train(args: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2prl.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def summaries(sweep: Path) -> list[dict]:
    return [json.loads((sweep / job / "summary.json").read_text())
            for job in sorted((p.name for p in sweep.iterdir() if p.name.isdigit()), key=int)]


def assert_two_peers_agreed(s: dict, sweep: Path) -> None:
    """Both ranks trained in one world (each wrote its own files), their parameters identical at the
    end (the final digest check, every iteration here, would have stopped the job otherwise)."""
    run = Path(s["run_dir"])
    assert s["world_size"] == 2 and all(n > 0 for n in s["steps_by_rank"]) and s["final_step"] == 256
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["rank0", "rank1"]
    assert run.parent == sweep


@needs_submitit
@pytest.mark.timeout(600)
def test_a_2x2_sweep_on_submitit_local_runs_each_job_as_two_peers(tmp_path):
    sweep = tmp_path / "sweep"
    p = train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "algo.lr=1e-3,3e-4",
               "seed=0,1", *TINY, "comm.check_every=1", f"hydra.sweep.dir={sweep}"], timeout=560)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    jobs = summaries(sweep)
    assert sorted((s["config"]["algo"]["lr"], s["config"]["seed"]) for s in jobs) == \
        [(3e-4, 0), (3e-4, 1), (1e-3, 0), (1e-3, 1)]
    for s in jobs:
        assert_two_peers_agreed(s, sweep)
    assert "the sweep's jobs" in p.stdout + p.stderr and "algo.lr" in p.stdout + p.stderr  # the results table


@needs_submitit
@pytest.mark.timeout(600)
def test_submitit_slurm_jobs_start_peers_that_agree_on_their_ranks(tmp_path, slurm):
    sweep = tmp_path / "sweep"
    p = train(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
               "algo.lr=1e-3,3e-4", *TINY, "comm.check_every=1", f"hydra.sweep.dir={sweep}"], 560, slurm, tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for s in summaries(sweep):
        assert_two_peers_agreed(s, sweep)
        # The two tasks' node ids made two nodes; SLURM gave each task train.torch_threads CPUs.
        assert "flat over 2 node(s) of 1/1 peer(s)" in (Path(s["run_dir"]) / "train.log").read_text()
    scripts = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert scripts and all("#SBATCH --cpus-per-task=1\n" in f.read_text() for f in scripts)


@needs_submitit
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("torch") and __import__("torch").cuda.is_available(), reason="CUDA here")
def test_a_job_that_its_node_refuses_fails_alone_with_its_line_in_its_log(tmp_path, slurm):
    sweep = tmp_path / "sweep"
    p = train(["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "device=cuda", *TINY,
               f"hydra.sweep.dir={sweep}"], 260, slurm, tmp_path)
    line = "device=cuda: needs a CUDA GPU, found none; allowed here: auto, cpu"
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith(f"p2prl: error: {line} (job "), p.stderr
    logs = list((sweep / ".submitit").rglob("*_0_log.err"))
    assert [f.read_text() for f in logs] == [f"p2prl: error: {line}\n"]


def _tasks(parent: int) -> list[int]:
    """submitit's task processes below `parent`."""
    out = []
    for pid in procs.descendants(parent):
        try:
            if procs._env(pid, "SUBMITIT_LOCAL_GLOBALID") is not None:
                out.append(pid)
        except OSError:
            continue
    return out


def signal_and_resume(args: list[str], sweep: Path, tasks, env: dict | None = None, cwd: Path = ROOT) -> None:
    """Start a one-job sweep of 4096 steps (ARGS choose its launcher), send its tasks (`tasks()`: their
    pids) what SLURM sends before the time limit once it logged 3 rows, and check that it saved, was
    requeued and resumed from that checkpoint to the end."""
    args = ["-m", *args, *TINY[:-3], "train.total_steps=4096", "train.log_every_steps=64", "train.target_return=null",
            f"hydra.sweep.dir={sweep}"]
    job = subprocess.Popen([sys.executable, "-m", "p2prl.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=None if env is None else {**os.environ, **env})
    try:
        metrics = sweep / "0" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or never logged"
            time.sleep(0.2)  # polling a file another process writes, not synchronizing with it
        pids = tasks()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)  # submitit's choice of signal
        out, _ = job.communicate(timeout=280)
    finally:
        if job.poll() is None:
            procs.kill_tree(job.pid)
    assert job.returncode == 0, out[-3000:]
    s = summaries(sweep)[0]
    saved = s["resumed_at_step"]
    assert s["final_step"] == 4096 and s["world_size"] == 2 and 0 < saved < 4096
    assert s["resumed_from"] == str(sweep / "0" / "checkpoints" / f"step_{saved}.pt")
    log = (sweep / "0" / "train.log").read_text()
    assert f"the job was signalled: checkpoint at step {saved}; submitit requeues it" in log
    assert "Requeued job" in log and f"resumed from {s['resumed_from']} at step {saved}" in log
    rows = [json.loads(r)["step"] for r in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)) and rows[-1] == 4096  # one row per step, the requeued attempt's after the save


@needs_submitit
@pytest.mark.timeout(600)
def test_a_signalled_local_job_saves_is_requeued_and_resumes(tmp_path):
    signal_and_resume(["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"], tmp_path / "sweep",
                      lambda: _tasks(os.getpid()))


@needs_submitit
@pytest.mark.timeout(600)
def test_a_signalled_slurm_job_saves_is_requeued_and_resumes(tmp_path, slurm):
    import slurm_stub
    signal_and_resume(["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"],
                      tmp_path / "sweep", lambda: slurm_stub.started(tmp_path / "slurm", "SLURM_PROCID"), slurm, tmp_path)
    assert [f.read_text() for f in (tmp_path / "slurm").glob("restarts_*")] == ["1"]  # SLURM ran it once more


# -- Optuna ----------------------------------------------------------------------------------------
@needs_optuna
@needs_submitit
@pytest.mark.timeout(600)
def test_an_optuna_search_launches_each_trial_as_two_peers(tmp_path):
    sweep = tmp_path / "sweep"
    p = train(["-m", "hydra/sweeper=optuna", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
               "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "algo.lr=tag(log, interval(1e-4, 1e-2))", *TINY,
               f"hydra.sweep.dir={sweep}"], timeout=560)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    jobs = summaries(sweep)
    assert len(jobs) == 2 and all(s["world_size"] == 2 for s in jobs)
    import yaml
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(jobs, key=lambda s: s["episode_return_mean"])  # maximized: p2prl's default direction
    assert results["best_value"] == pytest.approx(best["episode_return_mean"])
    assert results["best_params"]["algo.lr"] == pytest.approx(best["config"]["algo"]["lr"])
    assert all(1e-4 <= s["config"]["algo"]["lr"] <= 1e-2 for s in jobs)
