"""How a gradient travels in a blocking sum (`comm.compress`): as it is, or compressed.

`none` averages the flat gradient as it is. `bf16` sends it as bfloat16: half the bytes; every peer
adds the same rounded values in the same order, so every peer gets the same rounded sum and the
parameters stay identical. Each form is a class in COMPRESSIONS whose `mean(comm, flat)` averages
`flat` (the learner's bucket: [gradient | named terms | finiteness flag]) over the peers in place.
"""
from __future__ import annotations

import torch

from p2prl.comm import Communicator


class Uncompressed:
    """The gradient travels as it is: one all-reduce mean."""

    def __init__(self, like: torch.Tensor) -> None:
        pass

    def mean(self, comm: Communicator, flat: torch.Tensor) -> None:
        comm.all_reduce_mean(flat)


class BFloat16(Uncompressed):
    """The sum travels as bfloat16 (half the bytes); the mean is taken after it, in `flat`'s dtype."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__(like)
        self._half = torch.zeros_like(like, dtype=torch.bfloat16)

    def mean(self, comm: Communicator, flat: torch.Tensor) -> None:
        self._half.copy_(flat)
        comm.all_reduce_sum(self._half)
        flat.copy_(self._half).div_(comm.world_size)


COMPRESSIONS: dict[str, type[Uncompressed]] = {"none": Uncompressed, "bf16": BFloat16}
