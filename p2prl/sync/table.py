"""The table of sync strategies behind `comm=`: name -> class (each in its own file, on base.py's Strategy).

The only place a strategy's name is spelled in code: configs, the algorithm registry, the precheck and
the benchmark read it from here, and each class says what they need to know of it (base.py).
"""
from __future__ import annotations

from p2prl.checks import ConfigError, choice, show
from p2prl.comm import Communicator
from p2prl.config import CommConfig
from p2prl.sync.allreduce import AllReduce
from p2prl.sync.base import Strategy
from p2prl.sync.bucket import GradientBucket
from p2prl.sync.compress import COMPRESSIONS
from p2prl.sync.gossip import Gossip
from p2prl.sync.local_sgd import LocalSGD
from p2prl.sync.param_server import ParamServer

STRATEGIES: dict[str, type[Strategy]] = {"allreduce": AllReduce, "param_server": ParamServer,
                                         "local_sgd": LocalSGD, "gossip": Gossip}
DEFAULT = next(iter(STRATEGIES))  # conf/comm/allreduce.yaml's, on which every other comm= preset builds
# comm.* keys that switch a strategy's feature on, with their "off" value and what the feature does: a
# strategy that does not read one (its `keys`) refuses it switched on, rather than silently ignore it.
SWITCHES = {"overlap": (False, "overlaps its sums"), "compress": ("none", "compresses its sums")}


def strategy(name: str) -> type[Strategy]:
    """The class `comm.strategy` names."""
    choice("comm.strategy", name, tuple(STRATEGIES))
    return STRATEGIES[name]


def check(cfg: CommConfig) -> None:
    """The checks of `comm` that depend on its strategy (precheck runs them once, where a composed
    config becomes a RunConfig); ConfigError for the first that fails."""
    cls = strategy(cfg.strategy)
    choice("comm.compress", cfg.compress, tuple(COMPRESSIONS))
    for key, (off, feature) in SWITCHES.items():
        value = getattr(cfg, key)
        if value != off and key not in cls.keys:
            users = " or ".join(f"comm={name}" for name, c in STRATEGIES.items() if key in c.keys)
            raise ConfigError(f"comm.{key}", value, f"only {users} {feature}, not comm={cfg.strategy}; "
                                                    f"allowed: {show(off)}")
    cls.check(cfg)


def check_world(cfg: CommConfig, world_size: int) -> None:
    """The checks of `comm` that depend on the number of peers (precheck's preflight runs them)."""
    strategy(cfg.strategy).check_world(cfg, world_size)


def make_strategy(comm: Communicator, cfg: CommConfig, bucket: GradientBucket) -> Strategy:
    """The strategy `comm.strategy` names, sharing `bucket`'s updates over `comm`."""
    return STRATEGIES[cfg.strategy](comm, cfg, bucket)
