"""`python -m p2prl.torchrun ARGS`: torchrun with the same arguments, as `p2prl train --nproc N` starts it,
except in what it prints and returns when peers fail.

A bad command line ends every peer with exit code 2 after rank 0 printed its one line
(`p2prl.precheck`); torchrun itself would then log each failure, print a traceback and its failure
summary, and exit 1. Here, when every failed peer exited 2, this exits 2 and prints nothing more. Any
other failure gets torchrun's failure summary (without the traceback around it) and exit 1, as from
torchrun. OMP_NUM_THREADS defaults to 1 here, as torchrun sets it for N > 1 peers (without its banner):
p2prl sets each peer's threads itself (`train.torch_threads`).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

BAD_INPUT = 2


class _BadInputFailures(logging.Filter):
    """Drops the agent's per-peer "failed (exitcode: 2)" record: that peer has said why itself. Holds
    back its "Sending process ... closing signal" records until the outcome is known: after bad input
    they only say that one peer exited a moment before the others."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Sending process") and not getattr(record, "p2prl_released", False):
            self.held.append(record)
            return False
        return not (str(record.msg).startswith("failed (exitcode") and record.args
                    and record.args[0] == BAD_INPUT)

    def release(self, logger: logging.Logger) -> None:
        for record in self.held:
            record.p2prl_released = True
            logger.handle(record)
        self.held.clear()


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    failures = _BadInputFailures()
    agent_log.addFilter(failures)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        if all(f.exitcode == BAD_INPUT for f in e.failures.values()):
            return BAD_INPUT
        failures.release(agent_log)
        print(e.format_msg(), file=sys.stderr)
        return 1
    failures.release(agent_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
