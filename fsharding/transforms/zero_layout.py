"""Dim-0 shard layout and bucketed collectives for ``fs.zero``.

Each sharded leaf of global shape ``(n, *rest)`` is split like ``torch.chunk`` (and like
DTensor's ``Shard(0)``): chunk ``c = ceil(n / N)``; rank ``r`` owns rows
``[r*c, min((r+1)*c, n))`` (trailing ranks may own none). For collectives every rank's chunk
is padded to ``c`` rows and leaves are packed into flat per-dtype buckets laid out rank-major
(``[N, S]``), so one ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` moves a whole
bucket. Padding lives only in these transient buffers: returned tensors never show it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["LeafLayout", "Bucket", "make_buckets", "shard_rows"]

BUCKET_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """Where one leaf lives: its global shape and its padded chunk size."""

    index: int  # position among the sharded leaves
    shape: tuple[int, ...]
    dtype: torch.dtype
    world: int

    @property
    def chunk_rows(self) -> int:
        return math.ceil(self.shape[0] / self.world) if self.shape[0] else 0

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def padded_numel(self) -> int:
        """Elements of one rank's padded chunk."""
        return self.chunk_rows * self.row_numel

    def rows(self, rank: int) -> tuple[int, int]:
        c, n = self.chunk_rows, self.shape[0]
        return min(rank * c, n), min((rank + 1) * c, n)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        lo, hi = self.rows(rank)
        return (hi - lo, *self.shape[1:])


def shard_rows(x: torch.Tensor, layout: LeafLayout, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a full tensor: a copy (never a view, so the full one can go)."""
    lo, hi = layout.rows(rank)
    return x[lo:hi].clone(memory_format=torch.contiguous_format)


@dataclasses.dataclass
class Bucket:
    """Leaves of one dtype packed into a flat rank-major buffer for one collective."""

    dtype: torch.dtype
    layouts: list[LeafLayout]
    offsets: list[int]
    numel: int  # per-rank segment size S

    def gather_input(self, shards: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """This rank's padded segment ``[S]`` from its local shards (one per layout)."""
        buf = torch.zeros(self.numel, dtype=self.dtype, device=device)
        for off, s in zip(self.offsets, shards):
            buf[off : off + s.numel()].copy_(s.reshape(-1))
        return buf

    def unpack_gathered(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Full leaves from the gathered ``[N*S]`` buffer."""
        world = self.layouts[0].world if self.layouts else 1
        view = out.view(world, self.numel)
        full = []
        for lay, off in zip(self.layouts, self.offsets):
            rows = view[:, off : off + lay.padded_numel].reshape(
                world * lay.chunk_rows, *lay.shape[1:]
            )
            full.append(rows[: lay.shape[0]].clone() if lay.shape[0] else rows[:0].clone())
        return full

    def scatter_input(self, fulls: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The rank-major ``[N*S]`` buffer of padded full tensors (for a reduce-scatter)."""
        world = self.layouts[0].world if self.layouts else 1
        buf = torch.zeros(world, self.numel, dtype=self.dtype, device=device)
        for lay, off, g in zip(self.layouts, self.offsets, fulls):
            n = lay.shape[0]
            if n == 0:
                continue
            blocks = buf[:, off : off + lay.padded_numel].view(world, lay.chunk_rows, -1)
            rows = g.reshape(n, -1)
            for r in range(world):
                lo, hi = lay.rows(r)
                if hi > lo:
                    blocks[r, : hi - lo].copy_(rows[lo:hi])
        return buf.view(-1)

    def unpack_scattered(self, out: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """This rank's (unpadded) shards from its reduced ``[S]`` segment."""
        shards = []
        for lay, off in zip(self.layouts, self.offsets):
            shape = lay.local_shape(rank)
            n = math.prod(shape)
            shards.append(out[off : off + n].view(shape).clone())
        return shards


# torch >= 2.12 renamed reduce_scatter_tensor (the old name warns); 2.6 has only the old one.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def make_buckets(layouts: Sequence[LeafLayout], bucket_bytes: int = BUCKET_BYTES) -> list[Bucket]:
    """Groups layouts by dtype into buckets of at most ``bucket_bytes`` per rank segment."""
    buckets: list[Bucket] = []
    open_: dict[torch.dtype, Bucket] = {}
    for lay in layouts:
        size = lay.padded_numel
        b = open_.get(lay.dtype)
        item = torch.empty((), dtype=lay.dtype).element_size()
        if b is None or (b.numel + size) * item > bucket_bytes and b.layouts:
            b = Bucket(lay.dtype, [], [], 0)
            open_[lay.dtype] = b
            buckets.append(b)
        b.layouts.append(lay)
        b.offsets.append(b.numel)
        b.numel += size
    return buckets


def all_gather_buckets(
    buckets: Sequence[Bucket],
    shards: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    device: torch.device,
) -> list[torch.Tensor]:
    """Full tensors for every sharded leaf (indexed like ``shards``), bucket by bucket.

    All buckets' collectives are launched asynchronously first, then awaited.
    """
    world = dist.get_world_size(group)
    pending = []
    for b in buckets:
        inp = b.gather_input([shards[lay.index] for lay in b.layouts], device)
        out = torch.empty(world * b.numel, dtype=b.dtype, device=device)
        work = dist.all_gather_into_tensor(out, inp, group=group, async_op=True)
        pending.append((b, out, work))
    full: list[torch.Tensor | None] = [None] * len(shards)
    for b, out, work in pending:
        work.wait()
        for lay, t in zip(b.layouts, b.unpack_gathered(out)):
            full[lay.index] = t
    return full  # type: ignore[return-value]


def reduce_scatter_buckets(
    buckets: Sequence[Bucket],
    fulls: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    device: torch.device,
) -> list[torch.Tensor]:
    """Each rank's shard of the rank-mean of full tensors (indexed like ``fulls``)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pending = []
    for b in buckets:
        inp = b.scatter_input([fulls[lay.index] for lay in b.layouts], device)
        out = torch.empty(b.numel, dtype=b.dtype, device=device)
        work = dist.reduce_scatter_tensor(
            out, inp, op=dist.ReduceOp.SUM, group=group, async_op=True
        )
        pending.append((b, out, work))
    shards: list[torch.Tensor | None] = [None] * len(fulls)
    for b, out, work in pending:
        work.wait()
        out.div_(world)
        for lay, t in zip(b.layouts, b.unpack_scattered(out, rank)):
            shards[lay.index] = t
    return shards  # type: ignore[return-value]


def all_reduce_mean(
    tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, bucket_bytes: int = BUCKET_BYTES
) -> list[torch.Tensor]:
    """The rank-mean of each tensor (flattened into per-dtype buckets, async)."""
    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[list[int]]] = {}
    for i, t in enumerate(tensors):
        groups = by_dtype.setdefault(t.dtype, [[]])
        cur = groups[-1]
        if cur and sum(tensors[j].numel() for j in cur) * t.element_size() > bucket_bytes:
            groups.append(cur := [])
        cur.append(i)
    pending = []
    for groups in by_dtype.values():
        for idx in groups:
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
            pending.append((idx, flat, work))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx, flat, work in pending:
        work.wait()
        flat.div_(world)
        off = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[off : off + n].view_as(tensors[i])
            off += n
    return out  # type: ignore[return-value]
