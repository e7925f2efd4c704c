"""All communication between peers. The only package that imports torch.distributed.

base.py (the Communicator interface), local.py (a world of one), process_group.py (gloo/NCCL),
hierarchical.py (node, leaders, node), connect.py (`open_comm`: joining, flat or hierarchical),
shm.py (sums through shared memory on one node), bucket.py (the flat gradient bucket),
strategy.py with allreduce.py, param_server.py, local_sgd.py, gossip.py (how an update is shared),
store.py (heartbeats, start-up exchange), agreement.py (same config everywhere), digest.py (same parameters everywhere).
"""
from p2prl.comm.agreement import agree_before_start, agree_on_config
from p2prl.comm.bucket import GradientBucket
from p2prl.comm.base import Communicator
from p2prl.comm.digest import check_identical, parameter_digest
from p2prl.comm.local import LocalComm
from p2prl.comm.connect import open_comm
from p2prl.comm.process_group import PeerFailure
from p2prl.comm.strategies import make_strategy
from p2prl.comm.strategy import Strategy

__all__ = ["Communicator", "LocalComm", "GradientBucket", "PeerFailure", "agree_before_start", "agree_on_config",
           "check_identical", "open_comm", "parameter_digest", "Strategy", "make_strategy"]
