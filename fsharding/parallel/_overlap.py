"""fs.zero's gradient reduction overlapped with backward (``gather="boundary"``, stages 0-3).

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
from typing import Any

import torch
import torch.distributed as dist

from fsharding import _context as _taps
from fsharding.parallel import _buckets as _lay

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

    ``live=False``: probe only. Stages 1-3 reduce-scatter ``z.buckets`` over ``z.group``;
    stage 0 all-reduces flat buckets over the only data-parallel group.

    Every rank issues the same collectives in the same order, whatever its graph: buckets
    are launched strictly in one fixed sequence (last bucket first, backward's usual
    order), a complete bucket waiting for those before it; a bucket with a leaf that got
    no grad on this rank is launched by :meth:`finish`, in the same sequence. Whether the
    overlapped result is used is agreed by all ranks (a MIN all-reduce after every bucket
    was launched), so no rank falls back alone.
    """

    def __init__(self, z: Any, leaves: list[torch.Tensor], live: bool) -> None:
        self.z, self.live = z, live
        self.n = len(leaves)
        self.shapes = [x.shape for x in leaves]
        self.tapped: dict[int, tuple[torch.Tensor, int]] = {}
        self.ok, self.agreed = True, False
        self.scatter = z.stage >= 1
        if self.scatter:  # bucket members: leaf positions (not layout indices)
            pos = {lay.index: i for i, lay in enumerate(z.layouts) if lay is not None}
            self.members = [[pos[lay.index] for lay in b.layouts] for b in z.buckets]
        else:
            self.members = _lay.flat_buckets(leaves)
        self.bucket_of = {i: b for b, m in enumerate(self.members) for i in m}
        self.missing = [len(m) for m in self.members]
        self.order = list(reversed(range(len(self.members))))
        self.next = 0  # position in ``order`` of the next bucket to launch
        self.pending: dict[int, Any] = {}
        self.lock = threading.Lock()  # hooks of CUDA leaves run on autograd's device thread
        self.taps: _taps.Taps | None = _taps.Taps(leaves, self._on_grad)

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
        z = self.z
        if self.scatter:
            bucket = z.buckets[b]
            self.pending[b] = _lay.start_reduce_scatter(bucket, ordered, z.group, z.device)
        else:
            flat = torch.cat([g.reshape(-1) for g in ordered])
            self.pending[b] = (flat, dist.all_reduce(flat, group=z.group, async_op=True))

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
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.z.device)
        for group in self.z.dp_groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        self.agreed = bool(flag.item())
        if not (self.agreed and self.live):
            for b in list(self.pending):  # launched, not to be used: let them end
                self._wait(b)
            return None
        if self.scatter:
            shards: list[Any] = [None] * sum(lay is not None for lay in self.z.layouts)
            for b in range(len(self.members)):
                for lay, x in zip(self.z.buckets[b].layouts, self._wait(b)):
                    shards[lay.index] = x
            return shards
        out = list(g)
        for b in range(len(self.members)):
            for j, x in zip(self.members[b], self._wait(b)):
                out[j] = x
        return out

    def _wait(self, b: int) -> list[torch.Tensor]:
        z, pending = self.z, self.pending.pop(b)
        if self.scatter:
            return _lay.finish_reduce_scatter(z.buckets[b], pending, z.rank)
        flat, work = pending
        work.wait()
        flat.div_(z.dp)
        out, off = [], 0
        for j in self.members[b]:
            n = self.shapes[j].numel()
            out.append(flat[off : off + n].view(self.shapes[j]))
            off += n
        return out
