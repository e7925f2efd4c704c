"""The table of sync strategies behind `comm=`: name -> class (each in its own file, on strategy.py's base)."""
from __future__ import annotations

from p2prl.comm.allreduce import AllReduce
from p2prl.comm.base import Communicator
from p2prl.comm.bucket import GradientBucket
from p2prl.comm.gossip import Gossip
from p2prl.comm.local_sgd import LocalSGD
from p2prl.comm.param_server import ParamServer
from p2prl.comm.strategy import Strategy
from p2prl.config import CommConfig

STRATEGIES: dict[str, type[Strategy]] = {"allreduce": AllReduce, "param_server": ParamServer,
                                         "local_sgd": LocalSGD, "gossip": Gossip}


def make_strategy(comm: Communicator, cfg: CommConfig, bucket: GradientBucket) -> Strategy:
    """The strategy `comm.strategy` names, sharing `bucket`'s updates over `comm`."""
    return STRATEGIES[cfg.strategy](comm, cfg, bucket)
