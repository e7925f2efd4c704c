"""The divergence check: are the peers' shared tensors still bit-identical?"""
from __future__ import annotations

import hashlib

import torch

from p2prl.comm.base import Communicator
from p2prl.comm.process_group import PeerFailure


def parameter_digest(tensors: list[torch.Tensor]) -> int:
    """A 63-bit digest of the exact bits of `tensors` (order matters)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_identical(comm: Communicator, tensors: list[torch.Tensor], what: str = "parameters") -> None:
    """Stop with a clear error if any peer's `tensors` differ bit-wise from rank 0's."""
    digests = torch.zeros(comm.world_size, dtype=torch.int64)
    digests[comm.rank] = parameter_digest(tensors)
    comm.all_reduce_sum(digests)
    bad = [r for r in range(comm.world_size) if digests[r] != digests[0]]
    if bad:
        raise PeerFailure(f"{what} diverged between peers: rank(s) {bad} differ from rank 0")
