"""One update, identical on every peer: zero -> backward -> average over peers -> clip -> optimizer step.

`Learner.step(loss, terms)` is the whole update. The gradient and the named scalar `terms` (losses,
KL, ...) travel in one flat bucket, averaged by one collective; the averaged terms come back, so the
caller can take collective decisions on them (KL early stop) and the learner keeps their means for
metrics.jsonl. A non-finite averaged gradient is the same on every peer (one NaN anywhere poisons the
sum), so every peer skips that update alike; a non-finite loss rides along in the bucket as a NaN
flag, so it skips the update even where its gradient happens to be finite. `skipped_in_a_row`
(identical on every peer) lets the runner stop a run that only produces NaNs.

Where peers step alone (local_sgd, gossip) and no veto asks for a shared decision, the terms are not
shared per update (`p2prl.sync.base._local_terms`): each peer skips its own non-finite gradient, and
`take_means()`, which every algorithm calls once per iteration on every peer, sums the terms, the
skips and each peer's streak of skips over the peers in one small collective; after it `skipped` and
`skipped_in_a_row` (the longest streak on any peer) are identical on every peer again. `updates`
counts this peer's own.

How the peers share the update is the sync strategy's job (`comm=`, `p2prl.sync.base`): the
all-reduce (default; with `comm.overlap` each gradient is averaged in the background while the next
is computed, one step stale), a parameter server, local SGD or gossip. Callers see no difference but
that `step` may return None (nothing finished yet) and that `finish()` completes the last one.

With an optimizer of several parameter groups (`p2prl.sync.optim`: SAC's actor, critics and
temperature in one bucket), `gates` names a term per gated group: the group steps only on updates where
that term, averaged over the peers, is not 0 (TD3's actor on its delayed updates). The term rides with its own
gradient, so the decision follows the update it belongs to under every strategy, overlap included.
An update may also come in parts, one step each: `step(..., only=groups, count=False)` steps the named
groups alone and counts nothing, and the last part, counted, carries the update's terms (SAC's critics,
then its actor through the stepped critics: `p2prl.algos.offpolicy`). Parts need each step finished when
it returns, so no overlap.
"""
from __future__ import annotations

import math
from typing import Callable, Collection, Mapping, NamedTuple, Optional, Sequence

import torch

from p2prl.comm import Communicator
from p2prl.config import CommConfig
from p2prl.sync.bucket import GradientBucket
from p2prl.sync.optim import FlatOptimizer
from p2prl.sync.table import make_strategy
from p2prl.timing import Stopwatch

Veto = Callable[[dict[str, float]], bool]


class Update(NamedTuple):
    """One finished gradient: whether it was applied, and the peers' mean of each named term."""

    applied: bool  # False: skipped (non-finite) or vetoed
    vetoed: bool
    terms: dict[str, float]


class Learner:
    def __init__(self, params: Sequence[torch.nn.Parameter],
                 make_optimizer: Callable[[torch.nn.Parameter], FlatOptimizer], comm: Communicator,
                 max_grad_norm: Optional[float], terms: Sequence[str], sync: CommConfig,
                 clock: Optional[Stopwatch] = None, gates: Optional[Mapping[str, str]] = None) -> None:
        self.comm, self.max_grad_norm = comm, max_grad_norm
        # backward: the gradient; optimizer: the strategy's sharing besides its collectives, clip, step
        self.clock = clock if clock is not None else Stopwatch(comm)
        self.term_names = tuple(terms)
        self.gates = dict(gates or {})  # optimizer group -> the term that says whether it steps
        assert set(self.gates.values()) <= set(self.term_names), f"gates {self.gates} name unknown terms"
        self.bucket = GradientBucket(comm, params, len(self.term_names) + 1)  # + the finiteness flag
        # Before the strategy copies the parameters (DiLoCo's anchor): it must copy rank 0's, not this peer's.
        self.bucket.broadcast_parameters()
        # The optimizer sees one flat parameter (the model's parameters are views of it).
        self.optimizer = make_optimizer(self.bucket.flat_param)
        assert set(self.gates) <= {g.get("name") for g in self.optimizer.param_groups}, f"gates {self.gates}"
        self.strategy = make_strategy(comm, sync, self.bucket)
        self.updates = 0  # applied
        self.skipped = 0  # non-finite
        self.vetoed = 0
        self.skipped_in_a_row = 0
        self._sums = [0.0] * len(self.term_names)
        self._summed = 0
        # Terms kept on each peer and summed once per iteration (local strategies without a veto):
        self._deferred = False  # whether an update since the last take_means() kept its terms here
        self._own_streak = 0  # this peer's own skips in a row
        self._agreed_skipped = 0  # `skipped` as of the last sum over the peers
        # Finished gradients, applied or not: identical on every peer (DQN syncs its target on it), also
        # where `updates` is this peer's own and `skipped` the sum over the peers.
        self.attempts = 0
        # The step in progress: the groups it leaves alone besides the gated ones, and whether it counts.
        self._resting: tuple[str, ...] = ()
        self._counted = True

    def step(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], veto: Optional[Veto] = None,
             only: Optional[Collection[str]] = None, count: bool = True, span: Optional[slice] = None
             ) -> Optional[Update]:
        """Backward `loss`, share the gradient and `terms` (scalars) with the peers, clip and step.

        `veto(averaged_terms)`, taken on the terms averaged over all peers (so on every peer alike), may
        refuse the update. Returns the finished update: this one, or with overlap the previous one
        (None on the first call). `only`: the optimizer groups this step may move (default: all);
        `count=False`: a part of an update (above), neither counted nor its terms kept. `span`: the part
        of the bucket to share, where the gradient outside it is zero on every peer (the groups `only`
        leaves out); where it leaves out the terms, they stay home, zero, and the part counts nothing.
        """
        assert set(terms) == set(self.term_names), f"terms {sorted(terms)} != {sorted(self.term_names)}"
        groups = [g["name"] for g in self.optimizer.param_groups]
        assert only is None or set(only) <= set(groups), f"only {only} names groups not in {groups}"
        assert (only is None and count) or not self.strategy.overlap, "parts of an update cannot overlap"
        self._resting = () if only is None else tuple(g for g in groups if g not in only)
        self._counted = self.strategy.counting = count
        extras_home = span is not None and (span.stop or self.bucket.flat.numel()) <= self.bucket.grads.numel()
        assert not (extras_home and count), "a counted step shares its terms"
        self.strategy.span = span
        with self.clock("backward"):
            self.bucket.zero_grad()
            loss.backward()
            extras = self.bucket.extras
            for i, name in enumerate(self.term_names):
                extras[i] = terms[name].detach()
            # 0 if finite, NaN for NaN or inf: for the loss, and where peers step alone their gradients too.
            flag = loss.detach() * 0
            extras[-1] = flag + self.bucket.grads.sum() * 0 if self.strategy.local else flag
            if extras_home:  # not shared: zero, so no peer decides alone on them
                extras.zero_()
        self._deferred = self._deferred or (self.strategy.local and veto is None)
        with self.clock("optimizer"):
            return self.strategy.step(self._apply, self._follow, veto)

    def finish(self, veto: Optional[Veto] = None, discard: bool = False) -> Optional[Update]:
        """Complete the update still in flight (comm.overlap) and apply it, or only drop it with
        `discard` (after an early stop); None when nothing is in flight."""
        with self.clock("optimizer"):
            return self.strategy.finish(self._apply, veto, discard)

    def _apply(self, flat: torch.Tensor, veto: Optional[Veto]) -> Update:
        n = self.bucket.grads.numel()
        averaged = flat[n:].tolist()
        terms = dict(zip(self.term_names, averaged))
        # min and max propagate NaN and are +-inf where any value is: one pass, where isfinite(flat).all()
        # allocates a mask in several passes (0.35 ms for 142k values, 6 ms for the Nature CNN's 1.7M).
        if not all(math.isfinite(x) for x in torch.aminmax(flat)):
            return self._follow(flat[n:], False, False)
        if veto is not None and veto(terms):
            return self._follow(flat[n:], False, True)
        self.skipped_in_a_row = 0
        grads = flat[:n]
        if self.max_grad_norm is not None:
            norm = float(grads.norm())
            if norm > self.max_grad_norm:
                grads.mul_(self.max_grad_norm / (norm + 1e-6))
        param = self.bucket.flat_param
        param.grad = grads  # the averaged gradient may live in an overlap send buffer
        self.optimizer.step(skip=[*self._resting, *(group for group, term in self.gates.items() if terms[term] == 0.0)])
        param.grad = self.bucket.grads
        return self._follow(flat[n:], True, False)

    def _follow(self, extras: torch.Tensor, applied: bool, vetoed: bool) -> Update:
        """Count an update (applied here, or by the parameter server) and keep its terms' sums."""
        averaged = extras.tolist()
        terms = dict(zip(self.term_names, averaged))
        if not self._counted:
            return Update(applied, vetoed, terms)
        self.attempts += 1
        if applied:
            self.updates += 1
            self.skipped_in_a_row = self._own_streak = 0
            self._sums = [a + b for a, b in zip(self._sums, averaged)]
            self._summed += 1
        elif vetoed:
            self.vetoed += 1
        else:
            self.skipped += 1
            self._own_streak += 1
            self.skipped_in_a_row = self._own_streak
        return Update(applied, vetoed, terms)

    def take_means(self) -> dict[str, float]:
        """The mean of each term over the updates applied since the last call (empty if none). Every
        peer calls it at the same points; where terms stayed on each peer it is a collective (above)."""
        if self._deferred:
            self._sum_kept_terms()
        if self._summed == 0:
            return {}
        out = {k: v / self._summed for k, v in zip(self.term_names, self._sums)}
        self._sums = [0.0] * len(self.term_names)
        self._summed = 0
        return out

    def _sum_kept_terms(self) -> None:
        """Sum the terms, applied updates and skips kept on each peer since the last call, and gather
        each peer's streak of skips, in one collective; `skipped` and `skipped_in_a_row` agree after it."""
        n, world = len(self.term_names), self.comm.world_size
        table = torch.zeros(n + 2 + world, dtype=torch.float64)
        table[:n] = torch.tensor(self._sums, dtype=torch.float64)
        table[n] = self._summed
        table[n + 1] = self.skipped - self._agreed_skipped
        table[n + 2 + self.comm.rank] = self._own_streak  # slots are disjoint: the sum gathers
        self.comm.all_reduce_sum(table)
        self._sums, self._summed = table[:n].tolist(), int(table[n])
        self.skipped = self._agreed_skipped = self._agreed_skipped + int(table[n + 1])
        self.skipped_in_a_row = int(table[n + 2:].max())
        self._deferred = False

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _load_optimizer(self, state: dict) -> None:
        """The optimizer's moments and step counts; each group's learning rate stays this run's."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates, "skipped": self.skipped,
                "vetoed": self.vetoed, "skipped_in_a_row": self.skipped_in_a_row, "attempts": self.attempts,
                "strategy": self.strategy.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        """Restore the optimizer's moments and the counters. The learning rate stays this run's: it
        follows from the config (and the schedule), which may have changed on resume."""
        self._load_optimizer(s["optimizer"])
        self.updates, self.skipped, self.vetoed = int(s["updates"]), int(s["skipped"]), int(s["vetoed"])
        self.attempts = int(s.get("attempts", self.updates + self.skipped + self.vetoed))  # older checkpoints
        self.skipped_in_a_row = self._own_streak = int(s["skipped_in_a_row"])
        self._agreed_skipped = self.skipped
        self.strategy.load_state_dict(s.get("strategy", {}))

    # -- each rank's own: its parameters and optimizer where they differ (local_sgd, gossip), and its
    # strategy's own state (a compression's residual) --------------------------------------------------
    def rank_state_dict(self) -> dict:
        own = self.strategy.rank_state_dict()
        s = {"strategy": own} if own else {}
        if self.strategy.differs:
            s.update(params=self.bucket.flat_param.detach().clone(), optimizer=self.optimizer.state_dict())
        return s

    def load_rank_state_dict(self, s: dict) -> None:
        if "params" in s:
            with torch.no_grad():
                self.bucket.flat_param.copy_(s["params"])
            self._load_optimizer(s["optimizer"])
        self.strategy.load_rank_state_dict(s.get("strategy", {}))
