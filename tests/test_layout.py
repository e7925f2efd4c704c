"""The package's boundaries, as its files state them: only comm/ imports torch.distributed (and the
`p2prl train --nproc` wrapper, which runs torchrun itself), a sync strategy's name is spelled in code
only in its table, and algorithms reach the other peers only through `Peer` and their envs only
through the collector."""
import re
from pathlib import Path

import p2prl
from p2prl.sync.table import STRATEGIES

ROOT = Path(p2prl.__file__).resolve().parent
CODE = sorted(ROOT.rglob("*.py"))


def _lines(pattern: re.Pattern) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{i + 1}" for path in CODE
            for i, line in enumerate(path.read_text().splitlines()) if pattern.search(line)]


def test_only_comm_imports_torch_distributed():
    imports = re.compile(r"^\s*(from torch\.distributed\b|import torch\.distributed\b|from torch import distributed)")
    outside = [where for where in _lines(imports) if not where.startswith(("comm/", "torchrun.py:"))]
    assert outside == []
    assert any(where.startswith("comm/") for where in _lines(imports))  # the pattern does find imports


def test_a_strategy_name_is_spelled_in_code_only_in_the_table():
    quoted = re.compile("|".join(rf"[\"']{name}[\"']" for name in STRATEGIES))
    found = _lines(quoted)
    assert found and all(where.startswith("sync/table.py:") for where in found), found


def test_algorithms_reach_peers_only_through_the_sync_package_and_envs_only_through_the_collector():
    """No file of p2prl/algos/ imports the communicator, marks a phase, calls a collective or steps an
    env itself: the runner marks phases, `Peer` offers what is shared, the collector steps the envs."""
    forbidden = re.compile(r"^\s*(from p2prl\.comm\b|import p2prl\.comm\b|from p2prl import comm\b)|\.phase\s*=|"
                           r"\.(all_reduce|all_gather|broadcast|sum_with_next|agree)\w*\(|\benvs\.(step|reset)\(|"
                           r"\.(_?comm|communicator)\b")
    found = [where for where in _lines(forbidden) if where.startswith("algos/")]
    assert found == []
    assert any(where.startswith("sync/") for where in _lines(forbidden))  # the pattern does find them
