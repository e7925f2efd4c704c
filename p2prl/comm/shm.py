"""Sums through one shared-memory segment, for peers that share a node and each own a core.

Over loopback gloo a small all-reduce takes ~0.3 ms when both peers are ready, but about one call in
five waits milliseconds for a thread wake-up (gloo's socket thread, then the caller) on a loaded
2-core CPU machine: that alone was 10-15% of a CartPole PPO run. Peers on one node can meet in memory
instead. Each peer copies its tensor into its own slot and publishes the call's sequence number; then
it polls until every peer has published and sums the slots in rank order: the same bytes added in the
same order, so every peer gets a bit-identical result. No kernel, no thread hand-off: ~25 µs per call
on the same machine.

For sums over several nodes (`p2prl.comm.hierarchical`) one segment serves the peers of each node, and
`finish(k, across)` lets the node's first peer alone add the slots, hand the node's sum to `across`
(the leaders' all-reduce between nodes) and publish the result in a result slot, which the node's
other peers copy: the same bytes on every peer of every node.

A tensor larger than a slot is summed in slot-sized pieces of its flat view, one call each.

Each peer has two slots, used alternately (call k uses slot k % 2). A peer may overwrite slot k % 2
at call k because every other peer has finished reading call k - 2 from it: a peer completes every
earlier call before it publishes the next one (a sum started in the background is completed first),
so having published call k - 1 means having finished call k - 2.

Beside its sequence number each peer publishes, per slot, the call number, byte count and dtype of
the tensor in it, packed into one word. Every peer compares them before summing: peers whose calls
differ (a sum of 4 floats against one of 8, float32 against float64) stop with an error naming both
calls instead of adding unrelated bytes, as gloo would refuse them too.

Between two sums a peer runs a forward and backward pass, which leaves the sum's own code cold: each
Python-level operation on the way costs several times what it does in a tight loop. So the header is
read and written as plain machine words (a memoryview, no numpy indexing), the description is one word,
and a sum is a handful of operations.

The segment itself (its layout, creation, attaching and end) is `p2prl.comm.segment`'s; the protocol
and its argument are read together, which is why this file stays one, a little over 250 lines.

The ordering argument needs stores seen in program order and loads done in program order (x86-64's
memory model): the data written before a sequence number is visible before it. Python cannot issue
the fences other architectures need, so elsewhere the peers keep to gloo.
"""
from __future__ import annotations

import mmap
import os
import time
from typing import Callable, Optional

import torch

from p2prl.comm.segment import META, PID, SEQ, SLOT_BYTES, WORDS, alive, header_bytes, open_segment

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
CODES = {d: code for code, d in enumerate(DTYPES)}  # other dtypes (uint32, float8, ...) sum through gloo
BYTES_BITS, CODE_BITS = 21, 5  # a description: call << 26 | bytes (<= SLOT_BYTES) << 5 | dtype code
CHECK_S = 0.02  # while waiting, how often to check the clock and the awaited peer's process


class SumFailed(RuntimeError):
    """A peer did not publish in time, its process exited, or (`mismatch`) the peers' calls differ."""

    def __init__(self, message: str, mismatch: bool = False) -> None:
        super().__init__(message)
        self.mismatch = mismatch


class SharedMemorySum:
    """Sums through the peers' shared segment (`p2prl.comm.segment`): a header per peer (sequence
    number, pid, what each slot holds) and the slots."""

    def __init__(self, mm: mmap.mmap, rank: int, world_size: int, names: Optional[list[int]] = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.names = names or list(range(world_size))  # the peers' ranks in the run, for messages
        self._mm = mm
        # One line per peer, then one for the result sequence number (sums shared by the first peer).
        self.words = memoryview(mm)[:header_bytes(world_size)].cast("q")
        data = torch.frombuffer(mm, dtype=torch.uint8, offset=header_bytes(world_size))
        self.slots = data[:world_size * 2 * SLOT_BYTES].view(world_size, 2, SLOT_BYTES)
        self.results = data[world_size * 2 * SLOT_BYTES:].view(2, SLOT_BYTES)
        self.calls = 0  # calls published by this peer
        self._views: dict[tuple, torch.Tensor] = {}  # (rank, parity, dtype, shape) -> slot view (`_slot`)
        self._pending: Optional[tuple[torch.Tensor, int, float]] = None  # published, not yet summed

    def close(self) -> None:
        """Unmap the segment (only when no sum will use it again)."""
        self.words.release()
        del self.slots, self.results
        self._views.clear()
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass

    @staticmethod
    def fits(tensor: torch.Tensor) -> bool:
        """Whether `tensor` goes through the segment in one call (so `publish` can take it): by device,
        dtype and size only, which every peer of a collective shares (a layout-dependent choice could send
        one peer to gloo and another here)."""
        return SharedMemorySum.takes(tensor) and tensor.numel() * tensor.element_size() <= SLOT_BYTES

    @staticmethod
    def takes(tensor: torch.Tensor) -> bool:
        """Whether `sum` takes `tensor` (a CPU tensor of a dtype in DTYPES: one larger than a slot goes
        in pieces)."""
        return tensor.device.type == "cpu" and tensor.dtype in CODES

    def _slot(self, rank: int, k: int, like: torch.Tensor) -> torch.Tensor:
        """Peer `rank`'s slot for call `k`, viewed as `like`; the views are kept (a PPO run sums the same
        bucket hundreds of times per rollout, and building views is most of a small sum's Python time)."""
        key = (rank, k % 2, like.dtype, like.shape)
        view = self._views.get(key)
        if view is None:
            nbytes = like.numel() * like.element_size()
            view = self._views[key] = self.slots[rank, k % 2, :nbytes].view(like.dtype).view(like.shape)
        return view

    @torch.no_grad()
    def sum(self, tensor: torch.Tensor, timeout_s: float, scale: Optional[float] = None) -> None:
        """Sum `tensor` over all peers, in place; one larger than a slot is summed in slot-sized
        pieces of its flat view, one call each (a 6.7 MB CNN gradient: 7 calls, still about 4x faster
        than gloo over loopback on a 2-core CPU machine).

        With `scale` every peer publishes `tensor * scale` (1 / world size: the mean, in the pass
        that copies it anyway); every peer still adds the same bytes in the same order."""
        if self.fits(tensor):
            self._finish(self._publish(tensor, timeout_s, scale), None)
            return
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        step = SLOT_BYTES // tensor.element_size()
        for start in range(0, flat.numel(), step):
            piece = flat[start:start + step]
            self._finish(self._publish(piece, timeout_s, scale), None)
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view(tensor.shape))

    @torch.no_grad()
    def publish(self, tensor: torch.Tensor, timeout_s: float) -> int:
        """Copy `tensor` into this peer's slot and announce it; returns the call number for `finish`,
        which writes the sum into `tensor` (left untouched until then). A sum still pending from an
        earlier `publish` is completed first."""
        if not self.fits(tensor):
            raise ValueError(f"a shared-memory call takes a CPU tensor of at most {SLOT_BYTES} bytes and a "
                             f"dtype in shm.DTYPES, not {tensor.numel() * tensor.element_size()} bytes of "
                             f"{tensor.dtype} on {tensor.device}")
        return self._publish(tensor, timeout_s)

    def _publish(self, tensor: torch.Tensor, timeout_s: float, scale: Optional[float] = None) -> int:
        if self._pending is not None:
            self._finish(self._pending[1], None)
        k = self.calls + 1
        if scale is None:
            self._slot(self.rank, k, tensor).copy_(tensor)
        else:
            torch.mul(tensor, scale, out=self._slot(self.rank, k, tensor))
        line = self.rank * WORDS
        self.words[line + META + k % 2] = _describe(k, tensor)
        self.words[line + SEQ] = k  # after the data and its description: the stores become visible in this order
        self.calls = k
        self._pending = (tensor, k, timeout_s)
        return k

    @torch.no_grad()
    def finish(self, k: int, across: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Wait until every peer published call `k`, then write the sum (in rank order) into the
        tensor published with it; a no-op if call `k` is already complete.

        With `across` (every peer passes one, or none does): only the first peer sums, calls
        `across(sum)` to reduce it further in place (between nodes), and shares the result.
        """
        self._finish(k, across)

    def _finish(self, k: int, across: Optional[Callable[[torch.Tensor], None]]) -> None:
        if self._pending is None or self._pending[1] != k:
            assert k <= self.calls, f"shared-memory sum {k} was never published"
            return
        tensor, _, timeout_s = self._pending
        if across is not None and self.rank != 0:
            self._pending = None
            self._await(0, k, timeout_s, self.world_size * WORDS + SEQ, "the sum of its node")
            tensor.copy_(self._result(k, tensor))
            return
        self._await_all(k, timeout_s)
        self._pending = None
        self._check_calls(k, tensor)
        if self.world_size == 1:
            tensor.copy_(self._slot(0, k, tensor))
        else:
            torch.add(self._slot(0, k, tensor), self._slot(1, k, tensor), out=tensor)
        for q in range(2, self.world_size):
            tensor.add_(self._slot(q, k, tensor))
        if across is not None:
            across(tensor)
            self._result(k, tensor).copy_(tensor)
            self.words[self.world_size * WORDS + SEQ] = k  # after the result: visible in this order

    def _result(self, k: int, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        return self.results[k % 2, :nbytes].view(like.dtype).view(like.shape)

    def _await_all(self, k: int, timeout_s: float) -> None:
        words = self.words
        started = None  # one clock for the whole call, however many peers it waits for
        for line in range(0, self.world_size * WORDS, WORDS):
            if words[line + SEQ] < k:  # not published yet: poll (the common case for other peers, never for this one)
                started = time.monotonic() if started is None else started
                self._await(line // WORDS, k, timeout_s, line + SEQ, f"shared-memory sum {k}", started)
            assert words[line + SEQ] <= k + 1, "a peer can be at most one call ahead: it waits for call k + 1 first"

    def _await(self, q: int, k: int, timeout_s: float, word: int, what: str,
               started: Optional[float] = None) -> None:
        """Poll header word `word` until it reaches `k`, at most `timeout_s` after `started` (default:
        now); peer q (local index) is the one it waits for."""
        words = self.words
        started = time.monotonic() if started is None else started
        check = started + CHECK_S
        while words[word] < k:
            os.sched_yield()  # the core is this peer's own, but let its other threads run
            now = time.monotonic()
            if now >= check:
                check = now + CHECK_S
                if not alive(words[q * WORDS + PID]):
                    if words[word] >= k:  # it published, then exited: what it left is all we need
                        return
                    raise SumFailed(f"rank {self.names[q]}'s process exited")
                if now - started > timeout_s:
                    raise SumFailed(f"rank {self.names[q]} did not reach {what} within {timeout_s:g} s")

    def _check_calls(self, k: int, tensor: torch.Tensor) -> None:
        """Every peer's slot for call `k` holds a tensor of this peer's size and dtype, or stop."""
        mine = _describe(k, tensor)
        held = self.words[META + k % 2:self.world_size * WORDS:WORDS]
        if held.tolist().count(mine) != self.world_size:
            what = "; ".join(f"rank {self.names[q]}: {_show(c)}" for q, c in enumerate(held.tolist()))
            raise SumFailed(f"the peers' shared-memory sum {k} differs ({what})", mismatch=True)


def _describe(k: int, tensor: torch.Tensor) -> int:
    """What a slot holds, as one word: call number, byte count and dtype code."""
    nbytes = tensor.numel() * tensor.element_size()
    return (k << (BYTES_BITS + CODE_BITS)) | (nbytes << CODE_BITS) | CODES[tensor.dtype]


def _show(described: int) -> str:
    k, nbytes = described >> (BYTES_BITS + CODE_BITS), (described >> CODE_BITS) & ((1 << BYTES_BITS) - 1)
    code = described & ((1 << CODE_BITS) - 1)
    if code >= len(DTYPES):
        return f"call {k}: {nbytes} bytes of another dtype"
    dtype = DTYPES[code]
    size = torch.empty((), dtype=dtype).element_size()
    return f"call {k}: {nbytes // size} x {str(dtype).replace('torch.', '')}"


def open_shared_sum(rank: int, world_size: int, all_gather: Callable[[object], list],
                    names: Optional[list[int]] = None) -> Optional[SharedMemorySum]:
    """Sums through one segment mapped on every peer (a collective: every peer calls it); None on
    every peer if any of them could not map it (`p2prl.comm.segment.open_segment`), and the peers
    keep to gloo."""
    mm = open_segment(rank, world_size, all_gather)
    return None if mm is None else SharedMemorySum(mm, rank, world_size, names)
