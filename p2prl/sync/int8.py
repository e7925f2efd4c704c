"""`comm.compress=int8`: each member's message as 8-bit codes with one scale per chunk, and error feedback.

Each member adds its residual to its values, splits them into chunks of CHUNK values, and sends each
chunk as round(127 x / absmax) in int8 with absmax / 127 as its scale (in the values' dtype, float32):
1 + 4 / CHUNK bytes a value instead of 4. The exact tail (terms, flag) rides in the same message as raw
bytes. One
all-gather moves every member's message to every member, and each member decodes them all and adds
them in member order: the same bytes added in the same order (a multiply, then an add, no fused
multiply-add), so every member gets the same sum. The residual is what this member's own codes lost.

Why an all-gather and not a sum of codes: int8 codes of different scales cannot be added on the wire,
and a sum with one agreed scale (the peers' largest absmax, a small all-reduce first) either sums the
codes in a wider integer (int16: half of float32's bytes, int32: all of them) or gives each member
127 / N levels so that the sum fits int8. The all-gather keeps every member's 8 bits and its own scale
(so error feedback sees exactly what it lost), takes one collective, and moves (N - 1) / 4 of the bytes
of the float32 ring all-reduce's 2 (N - 1) / N: a quarter on 2 members, half on 4, as much at 8; beyond
8 members on the hop it moves more (the hierarchical layout's hop is the nodes' leaders, and
`comm.compress=lowrank` moves less at any size). torch's quantization hooks (also an all-gather) work
only as DDP comm hooks on DDP's GradBucket, without error feedback: p2prl has no DDP.
"""
from __future__ import annotations

from typing import Optional

import torch

from p2prl.comm.hop import Hop
from p2prl.config import CommConfig
from p2prl.sync.compression import ErrorFeedback, Layout

CHUNK = 1024  # values per scale: 0.4% more bytes than the codes alone; smaller chunks follow outliers closer


class Int8(ErrorFeedback):
    name = "int8"

    def __init__(self, layout: Layout, cfg: CommConfig, like: torch.Tensor) -> None:
        super().__init__(layout, cfg, like)
        self.chunks = -(-self.n // CHUNK)
        shape, kw = (self.chunks, CHUNK), {"dtype": like.dtype, "device": like.device}
        self._values = torch.zeros(self.chunks * CHUNK, **kw)  # padded with zeros
        self._codes = torch.zeros(shape, dtype=torch.int8, device=like.device)
        self._own, self._other, self._sum = (torch.zeros(shape, **kw) for _ in range(3))  # decoded values
        # bytes of a message's parts: codes, then scales (a multiple of CHUNK bytes: the scales stay aligned)
        self._nbytes = self.chunks * CHUNK, self.chunks * like.element_size()

    def encode(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (chunks, CHUNK) int8 and scales (chunks,) of `values` (chunks * CHUNK,); the codes are
        this object's buffer, valid until the next call."""
        blocks = values.view(self.chunks, CHUNK)
        low, high = torch.aminmax(blocks, dim=1)
        scales = torch.maximum(high, -low) / 127
        # A chunk of zeros keeps scale 0 (decodes to zeros); a non-finite scale decodes to NaN: skipped alike.
        divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
        self._codes.copy_(torch.div(blocks, divisor[:, None], out=self._other).round_().clamp_(-127, 127))
        return self._codes, scales

    @staticmethod
    def decode(codes: torch.Tensor, scales: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes x scales, (chunks, CHUNK), into `out` if given: a multiply, no fused multiply-add."""
        out = torch.empty(codes.shape, dtype=scales.dtype, device=codes.device) if out is None else out
        return out.copy_(codes).mul_(scales[:, None])

    @torch.no_grad()
    def sum(self, hop: Hop, x: torch.Tensor) -> None:
        n, values, (n_codes, n_scales) = self.n, self._values, self._nbytes
        torch.add(x[:n], self.residual, out=values[:n])
        codes, scales = self.encode(values)
        own = self.decode(codes, scales, out=self._own).view(-1)
        torch.sub(values[:n], own[:n], out=self.residual)
        self.keep_residual()
        message = torch.cat([codes.view(-1).view(torch.uint8), scales.view(torch.uint8), x[n:].view(torch.uint8)])
        rows = hop.all_gather(message)
        total, tails = self._sum, torch.zeros_like(x[n:])
        for member, row in enumerate(rows):  # member order, own values where they are ours
            decoded = self._own if member == hop.rank else self.decode(
                row[:n_codes].view(torch.int8).view(self.chunks, CHUNK),
                row[n_codes:n_codes + n_scales].view(x.dtype), out=self._other)
            if member == 0:
                total.copy_(decoded)
            else:
                total.add_(decoded)
            tails += row[n_codes + n_scales:].view(x.dtype)
        x[:n] = total.view(-1)[:n]
        x[n:] = tails
