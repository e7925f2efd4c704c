"""How bytes move between peers: the transport. The only package that imports torch.distributed.

base.py (the Communicator interface), local.py (a world of one), process_group.py (gloo/NCCL),
hierarchical.py (node, leaders, node), hop.py (the network hop a compressed sum crosses), connect.py
(`open_comm`: joining, flat or hierarchical), shm.py (sums through shared memory on one node) in
segment.py's segment, store.py (heartbeats, start-up exchange), agreement.py (same config everywhere),
digest.py (same parameters everywhere).
What is exchanged (the learner, the sync strategies) is `p2prl.sync`'s; where a peer runs,
`p2prl.host`'s.
"""
from p2prl.comm.agreement import agree_before_start, agree_on_config
from p2prl.comm.base import Communicator
from p2prl.comm.digest import check_identical, parameter_digest
from p2prl.comm.local import LocalComm
from p2prl.comm.connect import open_comm
from p2prl.comm.process_group import PeerFailure
from p2prl.comm.store import StartTimeout

__all__ = ["Communicator", "LocalComm", "PeerFailure", "StartTimeout", "agree_before_start", "agree_on_config",
           "check_identical", "open_comm", "parameter_digest"]
