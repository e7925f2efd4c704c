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

import itertools
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
        self.exact: list[tuple[int, int]] = []  # (offset, length) of what travels uncompressed, runs merged
        for offset, shape in [*layout.offsets(), (self.n, torch.Size([layout.tail]))]:
            n, m = (shape[0], math.prod(shape[1:])) if len(shape) else (1, 1)  # a 0-d parameter: one value
            r = min(self.rank, n, m)
            if len(shape) >= 2 and (n + m) * r < n * m:
                self.matrices.append((offset, n, m, r))
            elif self.exact and sum(self.exact[-1]) == offset:
                self.exact[-1] = (self.exact[-1][0], self.exact[-1][1] + n * m)
            else:
                self.exact.append((offset, n * m))
        # Matrices of one shape side by side in P and Q: orthogonalized together, in a handful of ops.
        self.matrices.sort(key=lambda t: t[1:])
        kw = {"dtype": like.dtype, "device": like.device}
        n_p = sum(n * r for _, n, _, r in self.matrices)
        self._buf_p = torch.zeros(n_p + sum(k for _, k in self.exact), **kw)  # [P of every matrix | exact]
        self._buf_q = torch.zeros(sum(m * r for _, _, m, r in self.matrices), **kw)
        self._first = self._draw(like)
        self.q = self._first.clone()  # the warm start: Q of every matrix
        self._ps, self._p_groups = self._views(self._buf_p, 1)
        self._qs, self._q_groups = self._views(self._buf_q, 2)
        self._warm, self._warm_groups = self._views(self.q, 2)
        self._tmp = torch.zeros(max((n * m for _, n, m, _ in self.matrices), default=0), **kw)

    def _views(self, flat: torch.Tensor, dim: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each matrix's (n or m, by `dim`) x r view into `flat`, and each run of one shape's (B, n or m, r)."""
        views, groups, offset = [], [], 0
        for (n, m, r), run in itertools.groupby(self.matrices, key=lambda t: t[1:]):
            k, count = (n, m)[dim - 1], len(list(run))
            group = flat[offset:offset + count * k * r].view(count, k, r)
            groups.append(group)
            views.extend(group.unbind(0))
            offset += count * k * r
        return views, groups

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED)
        q = torch.randn(self._buf_q.numel(), generator=g, dtype=like.dtype).to(like.device)
        for group in self._views(q, 2)[1]:
            orthogonalize(group)
        return q

    @torch.no_grad()
    def sum(self, hop: Hop, x: torch.Tensor) -> None:
        x[:self.n].add_(self.residual)
        ms = [x[o:o + n * m].view(n, m) for o, n, m, _ in self.matrices]
        for mat, p, q in zip(ms, self._ps, self._warm):
            torch.matmul(mat, q, out=p)
        at = len(self._buf_p) - sum(k for _, k in self.exact)
        for offset, k in self.exact:
            self._buf_p[at:at + k] = x[offset:offset + k]
            at += k
        hop.all_reduce_sum(self._buf_p)
        for group in self._p_groups:
            orthogonalize(group)
        for (offset, n, m, _), mat, p, q in zip(self.matrices, ms, self._ps, self._qs):
            torch.matmul(mat.t(), p, out=q)
            # what this member's message loses: M - P^ (M^T P^)^T (the exact values lose nothing: 0 there)
            torch.addmm(mat, p, q.t(), alpha=-1, out=self.residual[offset:offset + n * m].view(n, m))
        self.keep_residual()
        hop.all_reduce_sum(self._buf_q)
        for mat, p, q in zip(ms, self._ps, self._qs):
            outer_sum(p, q, out=mat, tmp=self._tmp[:mat.numel()].view_as(mat))
        at = len(self._buf_p) - sum(k for _, k in self.exact)
        for offset, k in self.exact:
            x[offset:offset + k] = self._buf_p[at:at + k]
            at += k
        self._warm_start()

    def _warm_start(self) -> None:
        """The next update's Q: this sum's, orthogonalized, where it still spans r directions."""
        self.q.copy_(self._buf_q)
        full = all([orthogonalize(group) for group in self._warm_groups])
        if not full or not bool(torch.isfinite(self.q.sum())):
            self.q.copy_(self._first)

    def state_dict(self) -> dict:
        return {"form": self.name, "rank": self.rank, "q": self.q.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("form") == self.name and state.get("rank") == self.rank and state["q"].shape == self.q.shape:
            self.q.copy_(state["q"])


def orthogonalize(a: torch.Tensor) -> bool:
    """Gram-Schmidt on the columns of each matrix of `a` (B, k, r), in place. A column with no norm left
    (M had no component there) becomes zeros and contributes nothing; a NaN stays NaN (the update is
    skipped alike everywhere). Returns whether every column kept a norm."""
    norms = []
    for i in range(a.shape[2]):
        col = a[:, :, i]
        norm = torch.linalg.vector_norm(col, dim=1, keepdim=True)  # (B, 1)
        norms.append(norm)
        col.div_(torch.where(norm == 0, torch.ones_like(norm), norm))
        if i + 1 < a.shape[2]:
            rest = a[:, :, i + 1:]
            rest.sub_(col[:, :, None] * torch.bmm(col[:, None, :], rest))
    return bool((torch.cat(norms) > 0).all())


def outer_sum(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """out = p q^T (n x r by m x r) as the sum of r outer products, a multiply then an add each (`tmp`:
    n x m scratch): the same rounding on every CPU, where a matrix product's summation order depends
    on the CPU's vector width."""
    torch.mul(p[:, :1], q[:, 0][None, :], out=out)
    for k in range(1, p.shape[1]):
        out.add_(torch.mul(p[:, k:k + 1], q[:, k][None, :], out=tmp))
    return out
