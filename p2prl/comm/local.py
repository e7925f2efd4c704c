"""A world of one peer: the same interface, no process group, no special cases upstream."""
from __future__ import annotations

from typing import Any

import torch

from p2prl.comm.base import Communicator


class LocalComm(Communicator):
    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.device = device or torch.device("cpu")

    def _all_reduce_sum(self, tensor: torch.Tensor) -> None:
        pass

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        pass

    def _all_gather_object(self, obj: Any) -> list:
        return [obj]
