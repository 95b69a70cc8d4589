"""fs.zero's gradient reduction overlapped with backward (``gather="boundary"``, stages 0-3).

This module owns :class:`Overlap` (one step's reduction started bucket by bucket from
gradient taps during backward, checked and agreed by every rank afterwards) and the
switch :data:`ENABLED` / :func:`enabled`. It is given what it reduces and over which groups
explicitly; it knows nothing of ``fs.zero``'s state.

While the grad function runs, :mod:`~fsharding._context` hands each param's
gradient over as soon as autograd has it. When every gradient of a bucket has arrived the
bucket is packed and its collective launched asynchronously (stage 0: all-reduce; stages
1-3: reduce-scatter), while backward goes on with earlier layers: DDP's reducer, without
hooks on a model. After the grad function returns, :meth:`Overlap.finish` waits and
unpacks.

That is only right if the grads the grad function returns *are* the tapped ones, unchanged:
each tapped exactly once, the same tensor object, not modified in place since (by the
version counter: a write through ``.data`` or raw storage is not seen, so don't). Accumulation
over microbatches (several backwards), loss-scale unscaling (new tensors) or any
post-processing breaks it. So the first step of a ``fs.zero`` only *probes* (taps, checks,
launches nothing); overlap is switched on from the second step if the probe held, and off
for good the first time a step does not hold (that step waits for what it launched and
falls back to reducing the returned grads after the grad function: correct either way).
On by default except on gloo (:data:`ENABLED`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from fsharding import _context
from fsharding.parallel import _buckets as _lay
from fsharding.parallel.collectives import settle, use_counts

__all__ = ["Overlap", "enabled"]

# None: on for every backend but gloo. On gloo (CPU) the collectives run on the same cores
# as backward, so overlap bought no time (GPT small, 2 ranks x 1 thread: stage 1 532.6 vs
# 523.9 ms/step without) and held the buckets and gloo's buffers during backward (+85 MiB
# peak RSS). NCCL runs them beside the compute (DDP's and FSDP2's reason to overlap).
ENABLED: bool | None = None


def enabled(group: Any, device: torch.device | None = None) -> bool:
    """Whether ``fs.zero`` overlaps its reduction with backward on ``group`` for params on
    ``device`` (CPU tensors always go through gloo, even in a ``"cpu:gloo,cuda:nccl"`` group)."""
    if ENABLED is not None:
        return ENABLED
    return dist.get_backend(group) != "gloo" and (device is None or device.type != "cpu")


class Overlap:
    """One step's tapped reduction of the full grads of ``leaves`` (the grad_fn's params).

    Args:
        leaves: the params the grad function differentiates (full tensors), in leaf order.
        live: False: probe only (tap and check, launch nothing).
        group: the process group the buckets are reduced over (the shard axis).
        agree_groups: every data-parallel group; whether the overlapped result is used is
            agreed over all of them.
        device: the device of the agreement flag (the params').
        buckets: stages 1-3: the buckets of the sharded leaves, reduce-scattered (a sum)
            over ``group``. None (stage 0): flat per-dtype buckets of every leaf,
            all-reduced over ``group`` and divided by ``divisor``.
        layouts: with ``buckets``, each leaf's layout (None: a leaf not sharded).
        divisor: stage 0: the number of data-parallel ranks (the mean's divisor).

    Every rank issues the same collectives in the same order, whatever its graph: buckets
    are launched strictly in one fixed sequence (last bucket first, backward's usual
    order), a complete bucket waiting for those before it; a bucket with a leaf that got
    no grad on this rank is launched by :meth:`finish`, in the same sequence. Whether the
    overlapped result is used is agreed by all ranks (a MIN all-reduce after every bucket
    was launched), so no rank falls back alone.
    """

    def __init__(
        self,
        leaves: list[torch.Tensor],
        *,
        live: bool,
        group: dist.ProcessGroup,
        agree_groups: Sequence[dist.ProcessGroup],
        device: torch.device,
        buckets: Sequence[_lay.Bucket] | None = None,
        layouts: Sequence[_lay.LeafLayout | None] = (),
        divisor: int = 1,
    ) -> None:
        self.live = live
        self.group, self.agree_groups, self.device = group, list(agree_groups), device
        self.rank = dist.get_rank(group)
        self.divisor = divisor
        self.n = len(leaves)
        self.shapes = [x.shape for x in leaves]
        self.tapped: dict[int, tuple[torch.Tensor, int]] = {}
        self.ok, self.agreed = True, False
        self.buckets = list(buckets) if buckets is not None else None
        if self.buckets is not None:  # bucket members: leaf positions (not layout indices)
            pos = {lay.index: i for i, lay in enumerate(layouts) if lay is not None}
            self.members = [[pos[lay.index] for lay in b.layouts] for b in self.buckets]
            self.n_sharded = len(pos)
        else:
            self.members = _lay.flat_buckets(leaves)
        self.bucket_of = {i: b for b, m in enumerate(self.members) for i in m}
        self.missing = [len(m) for m in self.members]
        self.order = list(reversed(range(len(self.members))))
        self.next = 0  # position in ``order`` of the next bucket to launch
        self.pending: dict[int, Any] = {}
        self.lock = threading.Lock()  # hooks of CUDA leaves run on autograd's device thread
        self.taps: _context.Taps | None = _context.Taps(leaves, self._on_grad)

    def _on_grad(self, i: int, g: torch.Tensor) -> None:
        with self.lock:
            if i in self.tapped:  # a second backward through the same params
                self.ok = False
                return
            self.tapped[i] = (g, g._version)
            b = self.bucket_of.get(i)
            if b is None:
                return
            self.missing[b] -= 1
            while self.live and self.ok and self.next < len(self.order):
                nb = self.order[self.next]
                if self.missing[nb]:
                    break
                self._launch(nb, [self.tapped[j][0] for j in self.members[nb]])
                self.next += 1

    def _launch(self, b: int, ordered: list[torch.Tensor]) -> None:
        if self.buckets is not None:
            bucket = self.buckets[b]
            self.pending[b] = _lay.start_reduce_scatter(bucket, ordered, self.group, self.device)
        else:
            flat = torch.cat([g.reshape(-1) for g in ordered])
            before = use_counts([flat])
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self.pending[b] = (flat, work, before)

    def valid(self, g: list[torch.Tensor]) -> bool:
        """Whether the returned grads ``g`` are the tapped ones, untouched since (this
        rank's view; :attr:`agreed` is every rank's after :meth:`finish`)."""
        if not self.ok or len(g) != self.n:
            return False
        return all(g[i] is t and t._version == v for i, (t, v) in self.tapped.items())

    def finish(self, g: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """What ``fs.zero``'s reduction would compute from the returned grads ``g``:
        stage 0 the mean grads (every leaf), stages 1-3 this rank's shards of the sum over
        the shard axis (indexed like the sharded leaves). None: not valid on some rank, or
        a probe; the caller then reduces ``g`` itself, on every rank."""
        self.taps = None  # the leaves (full params at stage 3) need not live longer
        ok = self.valid(g)
        with self.lock:
            if self.live:  # the rest, in the same sequence on every rank (even if not ok)
                for b in self.order[self.next :]:
                    self._launch(b, [g[j] for j in self.members[b]])
                self.next = len(self.order)
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.device)
        before = use_counts([flag])
        for group in self.agree_groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            settle(before)  # gloo's worker has dropped the work (no SIGABRT at exit)
        self.agreed = bool(flag.item())
        if not (self.agreed and self.live):
            for b in list(self.pending):  # launched, not to be used: let them end
                self._wait(b)
            return None
        if self.buckets is not None:
            shards: list[Any] = [None] * self.n_sharded
            for b in range(len(self.members)):
                for lay, x in zip(self.buckets[b].layouts, self._wait(b)):
                    shards[lay.index] = x
            return shards
        out = list(g)
        for b in range(len(self.members)):
            for j, x in zip(self.members[b], self._wait(b)):
                out[j] = x
        return out

    def _wait(self, b: int) -> list[torch.Tensor]:
        if self.buckets is not None:
            return _lay.finish_reduce_scatter(self.buckets[b], self.pending.pop(b), self.rank)
        flat, work, before = self.pending.pop(b)
        work.wait()
        del work  # (a Work left referenced holds the bucket settle waits for)
        settle(before)  # gloo's worker has dropped the work (no SIGABRT at exit)
        flat.div_(self.divisor)
        out, off = [], 0
        for j in self.members[b]:
            n = self.shapes[j].numel()
            out.append(flat[off : off + n].view(self.shapes[j]))
            off += n
        return out
