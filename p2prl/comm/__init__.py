"""All communication between peers. The only package that imports torch.distributed."""
from p2prl.comm.allreduce import GradientAllReduce
from p2prl.comm.base import Communicator
from p2prl.comm.local import LocalComm
from p2prl.comm.peers import (PeerFailure, agree_before_start, agree_on_config, check_identical, open_comm,
                              pin_cores, resolve_backend, torchrun_world)

__all__ = ["Communicator", "LocalComm", "GradientAllReduce", "PeerFailure", "agree_before_start",
           "agree_on_config", "check_identical", "open_comm", "pin_cores", "resolve_backend", "torchrun_world"]
