"""conf/ ships inside the package: a regular (non-editable) install finds it from any directory."""
import json
import os
import subprocess
import sys

import pytest

from pathlib import Path

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_finds_its_config(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=150)
    assert (target / "p2prl" / "conf" / "config.yaml").is_file()
    assert (target / "p2prl" / "conf" / "tuned" / "ppo_cartpole.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "p2prl.train", "train.total_steps=256", f"hydra.run.dir={run}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["config"]["algo"]["gamma"] == 0.98  # the tuned ppo_cartpole preset was composed
