import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/peers.py for spawned workers

# Spawned peers and subprocess runs import p2prl from the checkout and show no progress bar.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"),
                                                         os.environ.get("PYTHONPATH")]))
os.environ["P2PRL_NO_PROGRESS"] = "1"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
