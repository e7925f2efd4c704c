"""The table of sync strategies behind `comm=`: name -> class (each in its own file, on base.py's Strategy)."""
from __future__ import annotations

from p2prl.comm import Communicator
from p2prl.config import CommConfig
from p2prl.sync.allreduce import AllReduce
from p2prl.sync.base import Strategy
from p2prl.sync.bucket import GradientBucket
from p2prl.sync.gossip import Gossip
from p2prl.sync.local_sgd import LocalSGD
from p2prl.sync.param_server import ParamServer

STRATEGIES: dict[str, type[Strategy]] = {"allreduce": AllReduce, "param_server": ParamServer,
                                         "local_sgd": LocalSGD, "gossip": Gossip}


def make_strategy(comm: Communicator, cfg: CommConfig, bucket: GradientBucket) -> Strategy:
    """The strategy `comm.strategy` names, sharing `bucket`'s updates over `comm`."""
    return STRATEGIES[cfg.strategy](comm, cfg, bucket)
