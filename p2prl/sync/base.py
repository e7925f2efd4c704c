"""How a learner's local gradient becomes an update on every peer: the sync strategies behind `comm=`.

The learner fills its bucket (`bucket.flat` = [gradient | named terms | finiteness flag]) and hands the
step to its strategy, which owns the communication and calls back:
- `apply(flat, veto)`: check the terms (finite, not vetoed), clip the gradient part of `flat`, step
  the optimizer on this peer's parameters; returns the learner's Update;
- `follow(extras, applied, vetoed)`: count an update another peer applied (parameter server).

| strategy | per update | parameters |
|---|---|---|
| allreduce | one all-reduce of the gradient (+ terms) | identical |
| param_server | every peer sends its gradient to rank 0, which steps and sends the parameters back | identical |
| local_sgd | none (the terms: once per iteration; every update with a KL veto); parameters averaged every `comm.average_every` updates (optionally through an outer Nesterov step, DiLoCo) | differ between averages |
| gossip | parameters averaged with one partner (the terms: as local_sgd) | differ |

Every decision that changes the schedule (KL early stop, a NaN skip where the peers' parameters are
identical) is taken on terms averaged over all peers, so every peer takes it alike under every strategy.
Where each peer steps alone, a non-finite gradient without a veto is skipped by its own peer only: it
changes that peer's parameters, not the schedule.

Each strategy also declares what the rest of p2prl needs to know of it (the class attributes below,
`check`, `check_world` and `predict`): the table (`p2prl.sync.table`) is where they are read.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol

import torch

from p2prl.comm import Communicator
from p2prl.config import CommConfig
from p2prl.sync.bucket import GradientBucket

Apply = Callable[[torch.Tensor, Any], Any]
Follow = Callable[[torch.Tensor, bool, bool], Any]


class Link(Protocol):
    """A cost model of moving bytes between peers (`p2prl.bench.cost`'s alpha-beta model): seconds."""

    def allreduce(self, nbytes: float, n: int) -> float:
        """One all-reduce of `nbytes` among `n` peers."""

    def send(self, nbytes: float) -> float:
        """One message of `nbytes` from a peer to another."""

    def terms(self, n: int) -> float:
        """The all-reduce of the named terms and the finiteness flag alone, among `n` peers."""

    def send_local(self, nbytes: float) -> float:
        """One message of `nbytes` between two peers of one node (not over its link)."""

    colocated: int  # peers per node in a flat layout (ranks numbered node by node, as torchrun does)


class Checkpointed:
    """The checkpoint hooks of a strategy or a compression, here with nothing to save: a subclass that
    keeps state overrides them."""

    def state_dict(self) -> dict:
        """Shared state (identical on every peer, the shared checkpoint): schedule counters, outer
        optimizer state, a compression's warm start."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        """This peer's own state (its rank's checkpoint file): a compression's residual."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass


class Strategy(Checkpointed):
    differs = False  # True: peers' parameters differ between syncs (no bit-identity check)
    local = False  # True: each peer applies its own gradient (its finiteness must ride in the flag)
    # True: also serves algorithms that sum exact tables themselves instead of gradients (tabular
    # Q-learning), which need every peer to hold the same table after each sum.
    tables = False
    keys: tuple[str, ...] = ()  # the comm.* keys it reads, besides the transport's (backend, topology, ...)
    central = False  # True: one peer serves every other (the parameter server), the baseline p2prl beats
    overlap = False  # True: a step returns the previous update, its own still in flight (comm.overlap)
    # False while the learner steps a part of an update (`Learner.step(count=False)`): schedules that count
    # updates (local SGD's average_every) let it pass; gossip mixes after every part.
    counting = True
    # The part of the bucket a step must share (`Learner.step(span=...)`; None: all of it): outside it every
    # peer's bucket is zero. A strategy that can only share the whole bucket shares it, zeros and all.
    span: Optional[slice] = None

    @classmethod
    def period(cls, settings: Mapping[str, Any]) -> int:
        """Updates after which its pattern of communication repeats (a benchmark times them together)."""
        return 1

    @classmethod
    def check(cls, cfg: CommConfig) -> None:
        """Refuse settings of its own keys that it cannot honour (ConfigError)."""

    @classmethod
    def check_world(cls, cfg: CommConfig, world_size: int) -> None:
        """Refuse settings it cannot honour on `world_size` peers (ConfigError)."""

    @classmethod
    def predict(cls, link: Link, n: int, nbytes: float, settings: Mapping[str, Any]) -> float:
        """Seconds of communication per update of a model of `nbytes` on `n` peers, by `link`'s cost
        model; `settings`: the values of its `keys`."""
        raise NotImplementedError

    def __init__(self, comm: Communicator, cfg: CommConfig, bucket: GradientBucket) -> None:
        self.comm, self.cfg, self.bucket = comm, cfg, bucket

    def step(self, apply: Apply, follow: Follow, veto: Any) -> Optional[Any]:
        """Turn the local gradient in `bucket.flat` into an update on every peer; the finished Update
        (None if none finished in this call)."""
        raise NotImplementedError

    def finish(self, apply: Apply, veto: Any, discard: bool) -> Optional[Any]:
        """Complete an update still in flight (None: none is)."""
        return None

    def average_parameters(self) -> Optional[torch.Tensor]:
        """The peers' mean parameters (a collective), where they differ; None where they are identical."""
        if not self.differs:
            return None
        mean = self.bucket.flat_param.detach().clone()
        return self.comm.all_reduce_mean(mean)

    def logs(self) -> dict[str, float]:
        """Scalars for metrics.jsonl (a collective: every peer calls it at the same rows). Where the
        parameters differ: `consensus_distance`, the root mean square distance of the peers'
        parameters from their mean."""
        if not self.differs:
            return {}
        param = self.bucket.flat_param.detach()
        mean = self.average_parameters()
        sq = torch.tensor([float((param - mean).pow(2).sum())], dtype=torch.float64)
        return {"consensus_distance": float(self.comm.all_reduce_mean(sq)) ** 0.5}


def _local_terms(strategy: Strategy, apply: Apply, veto: Any):
    """For strategies whose peers step alone: apply this peer's own gradient. With a veto (a decision
    every peer must take alike, PPO's KL stop) the terms and the finiteness flag are averaged first, a
    small all-reduce per update, and a non-finite gradient anywhere is skipped everywhere. Without
    one nothing is shared here: each peer checks its own gradient and terms, and the learner sums the
    terms and the skips over the peers once per iteration (`Learner.take_means`), so that a model
    whose gradients are too small to hide a collective's latency does not pay one every update."""
    if veto is not None:
        strategy.comm.all_reduce_mean(strategy.bucket.extras)
    return apply(strategy.bucket.flat, veto)
