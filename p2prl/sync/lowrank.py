"""`comm.compress=lowrank`: PowerSGD (Vogels et al. 2019), rank `comm.compress_rank`, with error feedback.

Every parameter of two or more dimensions whose rank-r factors are smaller than it, (n + m) r < n m,
travels as a rank-r approximation of its matrix M (n x m: the first dimension by the rest) plus the
member's residual: P = M Q (Q: m x r, the same on every member), all-reduce P, orthogonalize it (P^ :
n x r, Gram-Schmidt), Q = M^T P^, all-reduce Q; the sum is P^ Q^T. The rest (biases, small matrices)
and the exact tail (terms, flag) ride uncompressed in P's all-reduce: two collectives per update. Q
starts from a seeded normal draw and is warm-started from the last sum (orthogonalized), so one power
iteration per update follows the gradient's dominant subspace as it drifts; a Q that turns non-finite
or loses a column (a NaN update, a layer with no gradient) starts again from the seeded draw, on every
member alike (the decision reads the same bytes everywhere).

Error feedback is the member's own loss, M - P^ (M^T P^)^T, which by linearity sums over members to
exactly what the sum lost. Every member computes P^ and P^ Q^T from the same all-reduced bytes; the
product is built from outer products (a multiply, then an add: the same rounding on any CPU), the
orthogonalization's norms and dot products are reductions, identical between peers of one CPU type
and torch build (the periodic parameter check, `comm.check_every`, would catch peers that differ).

torch's PowerSGD exists only as a DDP comm hook (`powerSGD_hook` on DDP's GradBucket; p2prl has no DDP);
it also compresses everything in its bucket (the terms and flag must stay exact here), takes three
collectives, and feeds back the member's gradient minus the peers' decompressed mean, not what the
member's own message lost.
"""
from __future__ import annotations

import math

import torch

from p2prl.comm.hop import Hop
from p2prl.config import CommConfig
from p2prl.sync.compression import ErrorFeedback, Layout

SEED = 0x5EED  # Q's first draw: the same on every member without a broadcast


class LowRank(ErrorFeedback):
    name = "lowrank"

    def __init__(self, layout: Layout, cfg: CommConfig, like: torch.Tensor) -> None:
        super().__init__(layout, cfg, like)
        self.rank = cfg.compress_rank
        self.matrices: list[tuple[int, int, int, int]] = []  # offset, n, m, r
        self.exact: list[tuple[int, int]] = []  # (offset, length) of what travels uncompressed
        for offset, shape in layout.offsets():
            n, m = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
            r = min(self.rank, n, m)
            if len(shape) >= 2 and (n + m) * r < n * m:
                self.matrices.append((offset, n, m, r))
            else:
                self.exact.append((offset, n * m))
        self.exact.append((self.n, layout.tail))
        self._n_p = sum(n * r for _, n, _, r in self.matrices)
        self._n_exact = sum(k for _, k in self.exact)
        self._first = self._draw(like)
        self.q = self._first.clone()  # [Q of every matrix], flat
        self._buf_p = torch.zeros(self._n_p + self._n_exact, dtype=like.dtype, device=like.device)
        self._buf_q = torch.zeros_like(self.q)

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED)
        qs = [torch.randn(m, r, generator=g, dtype=like.dtype) for _, _, m, r in self.matrices]
        for q in qs:
            orthogonalize(q)
        return (torch.cat([q.reshape(-1) for q in qs]) if qs else torch.zeros(0, dtype=like.dtype)).to(like.device)

    def _views(self, flat: torch.Tensor, dims: str):
        """Each matrix's n x r (dims "n") or m x r (dims "m") view into `flat`."""
        out, offset = [], 0
        for _, n, m, r in self.matrices:
            k = n if dims == "n" else m
            out.append(flat[offset:offset + k * r].view(k, r))
            offset += k * r
        return out

    @torch.no_grad()
    def sum(self, hop: Hop, x: torch.Tensor) -> None:
        x[:self.n].add_(self.residual)
        ms = [x[o:o + n * m].view(n, m) for o, n, m, _ in self.matrices]
        ps, qs = self._views(self._buf_p, "n"), self._views(self.q, "m")
        for mat, p, q in zip(ms, ps, qs):
            torch.matmul(mat, q, out=p)
        at = self._n_p
        for offset, k in self.exact:
            self._buf_p[at:at + k] = x[offset:offset + k]
            at += k
        hop.all_reduce_sum(self._buf_p)
        mine = self._views(self._buf_q, "m")
        for mat, p, q in zip(ms, ps, mine):
            orthogonalize(p)
            torch.matmul(mat.t(), p, out=q)
        self.residual.zero_()  # the uncompressed values lose nothing
        for (offset, n, m, _), mat, p, q in zip(self.matrices, ms, ps, mine):
            self.residual[offset:offset + n * m].view(n, m).copy_(mat).sub_(p @ q.t())
        self.keep_residual()
        hop.all_reduce_sum(self._buf_q)
        for mat, p, q in zip(ms, ps, mine):
            outer_sum(p, q, out=mat)
        at = self._n_p
        for offset, k in self.exact:
            x[offset:offset + k] = self._buf_p[at:at + k]
            at += k
        self._warm_start()

    def _warm_start(self) -> None:
        """The next update's Q: this sum's, orthogonalized, where it still spans r directions."""
        self.q.copy_(self._buf_q)
        full = all([orthogonalize(q) for q in self._views(self.q, "m")])
        if not full or not bool(torch.isfinite(self.q).all()):
            self.q.copy_(self._first)

    def state_dict(self) -> dict:
        return {"form": self.name, "rank": self.rank, "q": self.q.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("form") == self.name and state.get("rank") == self.rank and state["q"].shape == self.q.shape:
            self.q.copy_(state["q"])


def orthogonalize(a: torch.Tensor) -> bool:
    """Gram-Schmidt on the columns of `a` (k x r), in place. A column with no norm left (M had no
    component there) becomes zeros and contributes nothing; a NaN stays NaN (the update is skipped
    alike everywhere). Returns whether every column kept a norm."""
    full = True
    for i in range(a.shape[1]):
        col = a[:, i]
        norm = col.norm()
        if norm == 0:
            col.zero_()
            full = False
        else:
            col.div_(norm)
        if i + 1 < a.shape[1]:
            rest = a[:, i + 1:]
            rest.sub_(col[:, None] * (col @ rest)[None, :])
    return full


def outer_sum(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = p q^T (n x r by m x r) as the sum of r outer products, elementwise: the same rounding on
    every CPU, where a matrix product's summation order depends on the CPU's vector width."""
    torch.mul(p[:, :1], q[:, 0][None, :], out=out)
    for k in range(1, p.shape[1]):
        out.add_(p[:, k:k + 1] * q[:, k][None, :])
    return out
