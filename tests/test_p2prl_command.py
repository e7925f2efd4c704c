"""The `p2prl` command: each subcommand's help (what it does, an example), `p2prl train --nproc N`
through torchrun, exit codes passed through, and the console script entry."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2prl import cli

pytestmark = pytest.mark.timeout(150)
ROOT = Path(__file__).resolve().parents[1]
TINY = ["algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=2", "algo.update_epochs=1",
        "train.total_steps=128", "train.log_every_steps=64", "train.target_return=null"]


def p2prl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2prl", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "plot", "bench"])
def test_each_subcommand_says_what_it_does_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: p2prl {command}") and "example" in text
    assert f"\n  p2prl {command} " in text  # the example is a command line of this subcommand


def test_overview_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in ("train", "evaluate", "export", "plot", "bench"))
    assert cli.main(["nosuch"]) == 2
    assert capsys.readouterr().err.strip() == \
        "p2prl: error: unknown command 'nosuch'; allowed: train, evaluate, export, plot, bench"
    assert cli.main([]) == 2


def test_train_command_line():
    assert cli.train_command(1, ["algo=dqn"]) == [sys.executable, "-m", "p2prl.train", "algo=dqn"]
    assert cli.train_command(3, ["-m", "seed=0,1"]) == [
        sys.executable, "-m", "p2prl.torchrun", "--standalone", "--nproc_per_node=3", "-m", "p2prl.train",
        "-m", "seed=0,1"]


def test_nproc_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--nproc", "0", "algo=ppo"])
    assert e.value.code == 2 and "--nproc=0: must be a positive integer" in capsys.readouterr().err


def test_nproc_with_a_submitit_launcher_is_refused(capsys):
    assert cli.main(["train", "--nproc", "2", "-m", "hydra/launcher=submitit_slurm", "algo.lr=1e-3,3e-4"]) == 2
    assert capsys.readouterr().err == ("p2prl: error: --nproc=2: hydra/launcher=submitit_slurm starts each job's "
                                       "peers itself (hydra.launcher.tasks_per_node x hydra.launcher.nodes); "
                                       "allowed with it: 1\n")


def test_train_on_two_peers_through_torchrun(run_dir):
    p = p2prl("train", "--nproc", "2", *TINY, f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_step"] == 128


def test_train_passes_the_exit_code_through(tmp_path):
    p = p2prl("train", "algo.lr=-1", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == "p2prl: error: algo.lr=-1: must be a positive number"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, line", [
    ("algo=ppoo", "p2prl: error: algo=ppoo: unknown algo; allowed: a2c, dqn, ppo, qlearning"),
    ("algo.lr=-1", "p2prl: error: algo.lr=-1: must be a positive number")])
def test_bad_input_on_two_peers_is_one_line_and_exit_2(bad, line, tmp_path):
    # torchrun alone would add a log line per peer, a traceback and its failure summary, and exit 1.
    p = p2prl("train", "--nproc", "2", bad, f"hydra.run.dir={tmp_path / 'run'}", timeout=90)
    assert p.returncode == 2 and p.stderr.strip() == line, p.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_other_peer_failures_keep_torchruns_summary_and_exit_1():
    p = subprocess.run([sys.executable, "-m", "p2prl.torchrun", "--standalone", "--nproc_per_node=2", "-m",
                        "no_such_module_p2prl"], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert p.returncode == 1 and "no_such_module_p2prl FAILED" in p.stderr and "exitcode  : 1" in p.stderr
    assert "ChildFailedError" not in p.stderr  # the summary without the agent's traceback around it


def test_console_scripts():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["p2prl"] == "p2prl.cli:main" and scripts["p2prl-train"] == "p2prl.train:main"
