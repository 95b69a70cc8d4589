"""The dim-0 shard layout of ``fs.zero`` / ``fs.gather`` and the bucketed collectives on it.

This module owns one concept: where each rank's rows of a sharded leaf live, and how whole
buckets of such leaves move between ranks in one collective each. It has three parts:

* the layout: :class:`LeafLayout` (a leaf's global shape and padded chunk),
  :func:`shard_rows` and :func:`row_views` (a rank's rows of a full tensor);
* the buckets: :class:`Bucket` (leaves of one dtype packed into a flat rank-major buffer)
  built by :func:`make_buckets`, and :func:`flat_buckets` for plain all-reduces;
* the collectives on them: all-gather (:func:`all_gather_buckets`), reduce-scatter
  (:func:`reduce_scatter_buckets`), each also in a start / finish pair so several buckets
  are in flight before the first wait; :func:`all_reduce_mean` over several process
  groups in turn (hybrid sharding's replicate axes); and the sums of squared norms over the
  shards (:func:`sq_reduce`, :func:`leaf_sq_reduce`). Every one returns only after gloo's
  worker has let go of its tensors (``collectives.settle``);
* the deterministic reduction (``fs.zero(deterministic=True)``):
  :func:`canonical_reduce_scatter` (an all-to-all per bucket, then the received rows summed
  here in ``fs.accumulate``'s canonical tree, not by the backend), :func:`gather_rows` and
  :func:`canonical_rows_sum`.

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
from typing import Any

import torch
import torch.distributed as dist

from fsharding.parallel.collectives import settle, use_counts
from fsharding.transforms.accumulate import CanonicalSum

__all__ = [
    "LeafLayout",
    "shard_rows",
    "row_views",
    "Bucket",
    "make_buckets",
    "flat_buckets",
    "all_gather_buckets",
    "start_all_gather",
    "finish_all_gather",
    "reduce_scatter_buckets",
    "start_reduce_scatter",
    "finish_reduce_scatter",
    "all_reduce_mean",
    "sq_reduce",
    "leaf_sq_reduce",
    "gather_rows",
    "canonical_rows_sum",
    "canonical_reduce_scatter",
]

# Bytes of one collective's whole buffer (N rank segments for a bucket): DDP's 25 MB order.
# Kept under glibc's largest mmap threshold (32 MiB): a CPU buffer above it is a fresh mmap
# every step, whose page faults cost ~3x the copy itself (measured: 42 MiB fresh + copy
# 25.6 ms vs 8.8 ms into a reused buffer; 30 MiB 6.1 vs 5.8 ms: served from the heap).
BUCKET_BYTES = 24 * 2**20
MIN_SEGMENT_BYTES = 2**20  # a bucket's per-rank segment is never cut below this


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


def row_views(leaves: Sequence[torch.Tensor], layouts: Sequence, rank: int) -> list:
    """Rank ``rank``'s rows of each sharded leaf as a view (``layouts[i] is None``: the leaf).

    For fs.zero stages 1/2, whose full params stay: an out-of-place update only reads the
    views, a donated one updates them in place (writing into the donated full params).
    """
    out = []
    for x, lay in zip(leaves, layouts):
        if lay is not None:
            lo, hi = lay.rows(rank)
            x = x[lo:hi]
        out.append(x)
    return out


@dataclasses.dataclass
class Bucket:
    """Leaves of one dtype packed into a flat rank-major buffer for one collective."""

    dtype: torch.dtype
    layouts: list[LeafLayout]
    offsets: list[int]
    numel: int  # per-rank segment size S

    def gather_input(self, shards: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """This rank's padded segment ``[S]`` from its local shards (one per layout).
        Padding is left uninitialised: it is never read back (see ``unpack_gathered``)."""
        buf = torch.empty(self.numel, dtype=self.dtype, device=device)
        for off, s in zip(self.offsets, shards):
            buf[off : off + s.numel()].copy_(s.reshape(-1))
        return buf

    def unpack_gathered(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Full leaves from the gathered ``[N*S]`` buffer (each its own exact-size storage,
        one copy; the buffer and its padding can be freed right away)."""
        world = self.layouts[0].world if self.layouts else 1
        view = out.view(world, self.numel)
        full = []
        for lay, off in zip(self.layouts, self.offsets):
            n, c, rest = lay.shape[0], lay.chunk_rows, lay.shape[1:]
            t = torch.empty(lay.shape, dtype=out.dtype, device=out.device)
            if n:
                blocks = view[:, off : off + lay.padded_numel].view(world, c, *rest)
                k = n // c  # ranks whose chunk is complete
                t[: k * c].view(k, c, *rest).copy_(blocks[:k])
                if n > k * c:
                    t[k * c :].copy_(blocks[k, : n - k * c])
            full.append(t)
        return full

    def scatter_input(self, fulls: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The rank-major ``[N*S]`` buffer of padded full tensors (for a reduce-scatter).
        Padding is left uninitialised: its sums are never read (see ``unpack_scattered``)."""
        world = self.layouts[0].world if self.layouts else 1
        buf = torch.empty(world, self.numel, dtype=self.dtype, device=device)
        for lay, off, g in zip(self.layouts, self.offsets, fulls):
            n, c = lay.shape[0], lay.chunk_rows
            if n == 0:
                continue
            blocks = buf[:, off : off + lay.padded_numel].view(world, c, -1)
            rows = g.reshape(n, -1)
            k = n // c  # ranks whose chunk is complete: one copy for all of them
            blocks[:k].copy_(rows[: k * c].reshape(k, c, -1))
            if n > k * c:
                blocks[k, : n - k * c].copy_(rows[k * c :])
        return buf.view(-1)

    def unpack_scattered(self, out: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """This rank's (unpadded) shards from its reduced ``[S]`` segment: views of it when
        this rank's rows fill it (no copy; the shards share its storage), else copies (the
        padding is not kept alive)."""
        shapes = [lay.local_shape(rank) for lay in self.layouts]
        sizes = [math.prod(shape) for shape in shapes]
        exact = sum(sizes) == out.numel()
        return [
            out[off : off + n].view(shape) if exact else out[off : off + n].view(shape).clone()
            for off, n, shape in zip(self.offsets, sizes, shapes)
        ]


def make_buckets(layouts: Sequence[LeafLayout], bucket_bytes: int | None = None) -> list[Bucket]:
    """Groups layouts by dtype into buckets whose whole buffer (every rank's segment) holds
    at most ``bucket_bytes`` (a segment at least ``MIN_SEGMENT_BYTES``; a bigger leaf gets
    a bucket of its own)."""
    world = layouts[0].world if layouts else 1
    bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    bucket_bytes = max(bucket_bytes // world, min(MIN_SEGMENT_BYTES, bucket_bytes))
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


def flat_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int | None = None) -> list:
    """Index lists of ``tensors`` flattened together for one all-reduce each: by dtype, in
    order, at most ``bucket_bytes`` (a bigger tensor alone)."""
    bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    by_dtype: dict[torch.dtype, list[list[int]]] = {}
    for i, t in enumerate(tensors):
        chunks = by_dtype.setdefault(t.dtype, [[]])
        cur = chunks[-1]
        if cur and sum(tensors[j].numel() for j in cur) * t.element_size() > bucket_bytes:
            chunks.append(cur := [])
        cur.append(i)
    return [idx for chunks in by_dtype.values() for idx in chunks if idx]


# ----------------------------------------------------------------------------- collectives

# torch's functional collective ops (out of place; the op layer of
# torch.distributed._functional_collectives, the same in torch 2.6 and 2.13), called directly
# as in fsharding.parallel.collectives. Several are issued before the first is waited on.
_C = torch.ops._c10d_functional


def all_gather_buckets(
    buckets: Sequence[Bucket],
    shards: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    device: torch.device,
) -> list[torch.Tensor]:
    """Full tensors for every sharded leaf (indexed like ``shards``), bucket by bucket.

    All buckets' collectives are launched first, then awaited.
    """
    return finish_all_gather(start_all_gather(buckets, shards, group, device), len(shards))


def start_all_gather(
    buckets: Sequence[Bucket],
    shards: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    device: torch.device,
) -> list[tuple[Bucket, torch.Tensor]]:
    """Launches :func:`all_gather_buckets`' collectives; :func:`finish_all_gather` waits."""
    world = dist.get_world_size(group)
    pending = []
    for b in buckets:
        inp = b.gather_input([shards[lay.index] for lay in b.layouts], device)
        pending.append((b, _C.all_gather_into_tensor(inp, world, group.group_name)))
    return pending


def finish_all_gather(pending: list[tuple[Bucket, torch.Tensor]], n: int) -> list[torch.Tensor]:
    """The ``n`` full tensors of a :func:`start_all_gather` (waits for its collectives).
    Empties ``pending``: each gathered buffer is freed once unpacked."""
    full: list[torch.Tensor | None] = [None] * n
    pending.reverse()
    while pending:
        b, out = pending.pop()
        out = _C.wait_tensor(out)
        settle([(out, 1)])  # gloo's worker has dropped the work (no SIGABRT at exit)
        for lay, t in zip(b.layouts, b.unpack_gathered(out)):
            full[lay.index] = t
        del out
    return full  # type: ignore[return-value]


def reduce_scatter_buckets(
    buckets: Sequence[Bucket],
    fulls: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    device: torch.device,
) -> list[torch.Tensor]:
    """Each rank's shard of the rank-**sum** of full tensors (indexed like ``fulls``)."""
    rank = dist.get_rank(group)
    pending = [
        (b, start_reduce_scatter(b, [fulls[lay.index] for lay in b.layouts], group, device))
        for b in buckets
    ]
    shards: list[torch.Tensor | None] = [None] * len(fulls)
    for b, out in pending:
        for lay, t in zip(b.layouts, finish_reduce_scatter(b, out, rank)):
            shards[lay.index] = t
    return shards  # type: ignore[return-value]


def start_reduce_scatter(
    bucket: Bucket, fulls: Sequence[torch.Tensor], group: dist.ProcessGroup, device: torch.device
) -> torch.Tensor:
    """Packs one bucket's full tensors (in its layouts' order) and launches the sum-reduce-
    scatter; :func:`finish_reduce_scatter` waits."""
    inp = bucket.scatter_input(fulls, device)
    return _C.reduce_scatter_tensor(inp, "sum", dist.get_world_size(group), group.group_name)


def finish_reduce_scatter(bucket: Bucket, out: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """This rank's shards (in the bucket's layouts' order) of a started reduce-scatter."""
    out = _C.wait_tensor(out)
    settle([(out, 1)])  # gloo's worker has dropped the work (no SIGABRT at exit)
    return bucket.unpack_scattered(out, rank)


def all_reduce_mean(
    tensors: Sequence[torch.Tensor],
    groups: Sequence[dist.ProcessGroup],
    divisor: int,
    bucket_bytes: int | None = None,
) -> list[torch.Tensor]:
    """The sum of each tensor over every rank of ``groups`` (one axis after another, so
    over their product), divided by ``divisor``; flattened into per-dtype buckets.

    With no groups it only divides. Returns new tensors (views of the buckets).
    """
    flats = [
        (idx, torch.cat([tensors[i].reshape(-1) for i in idx]))
        for idx in flat_buckets(tensors, bucket_bytes)
    ]
    before = use_counts([flat for _, flat in flats])
    for group in groups:
        works = [
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
            for _, flat in flats
        ]
        while works:  # (no Work left referenced: it holds the buckets settle waits for)
            works.pop(0).wait()
        settle(before)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx, flat in flats:
        flat.div_(divisor)
        off = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[off : off + n].view_as(tensors[i])
            off += n
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------ norms over the shards


def sq_reduce(sq_per_leaf: list[torch.Tensor], layouts: Sequence, group: Any) -> torch.Tensor:
    """Global sum of squares from per-leaf local sums: sharded leaves summed over the
    shard axis (replicas along other data-parallel axes hold the same shards)."""
    if len(sq_per_leaf) == len(layouts):
        shard = [s for s, lay in zip(sq_per_leaf, layouts) if lay is not None]
        rep = [s for s, lay in zip(sq_per_leaf, layouts) if lay is None]
    else:
        shard, rep = sq_per_leaf, []
    total = torch.stack(shard).sum() if shard else torch.zeros(())
    before = use_counts([total])
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    settle(before)
    return total + (torch.stack(rep).sum().to(total.dtype) if rep else 0.0)


def leaf_sq_reduce(
    positions: list[int], sq: torch.Tensor, layouts: Sequence, group: Any
) -> torch.Tensor:
    """Per-leaf global squared norms (LAMB's trust ratio) from local ones: the leaves
    at ``positions`` (in params order) that are sharded are summed over the shard axis."""
    if not positions or max(positions) >= len(layouts):
        raise ValueError(
            "fs.zero: a per-leaf norm of the optimizer got a tree that is not "
            "params-shaped; per-leaf norms under fs.zero need params-shaped trees."
        )
    sharded = torch.tensor([layouts[i] is not None for i in positions], device=sq.device)
    part = torch.where(sharded, sq, torch.zeros_like(sq))
    before = use_counts([part])
    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
    settle(before)
    return torch.where(sharded, part, sq)


# ------------------------------------------------- the deterministic (canonical) reduction


def gather_rows(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[n, *x.shape]``: every rank's ``x`` over ``group``, in group-rank order (moves
    bits only: no arithmetic)."""
    n = dist.get_world_size(group)
    inp = x.detach().contiguous()
    before = use_counts([inp])
    out = _C.wait_tensor(_C.all_gather_into_tensor(inp.reshape(-1), n, group.group_name))
    settle([(out, 1), *before])
    return out.view(n, *x.shape)


def canonical_rows_sum(rows: torch.Tensor, skip: Sequence[bool]) -> torch.Tensor:
    """The sum of ``rows`` (along dim 0) in ``fs.accumulate``'s canonical tree, computed in
    place into them; a skipped row (a rank without tokens) is an empty leaf."""
    tree = CanonicalSum()
    for row, s in zip(rows, skip):
        tree.push(None if s else [row])
    out = tree.result()
    return torch.zeros_like(rows[0]) if out is None else out[0]


def canonical_reduce_scatter(
    buckets: Sequence[Bucket],
    fulls: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    rep_groups: Sequence[dist.ProcessGroup],
    skip: torch.Tensor,
    device: torch.device,
) -> list[torch.Tensor]:
    """This rank's shards of the canonical sum, over every data-parallel rank, of the full
    tensors ``fulls`` (indexed like the buckets' layouts; packed in the buckets' dtypes).

    Per bucket an all-to-all over ``group`` (the shard axis) hands each rank every rank's
    rows of its own shard — a reduce-scatter's traffic — and they are summed here in the
    canonical tree; with ``rep_groups`` (hybrid sharding, outer axes first) the summed
    shard is then all-gathered over each replicate axis, innermost first, and summed the
    same way. ``skip`` (bool, shaped like the replicate axes' sizes then the shard axis's
    when it has more than one rank) flags the ranks without tokens. All buckets'
    all-to-alls are launched before the first is awaited: the receive buffers of all of
    them (one full gradient in the buckets' dtype) are alive together."""
    world = dist.get_world_size(group)
    coords = [dist.get_rank(g) for g in rep_groups]  # outer axes first
    pending = []
    for b in buckets:
        inp = b.scatter_input([fulls[lay.index] for lay in b.layouts], device)
        if world > 1:
            before = use_counts([inp])
            sizes = [b.numel] * world
            work = _C.all_to_all_single(inp, sizes, sizes, group.group_name)
            pending.append((b, inp, before, work))
        else:
            pending.append((b, inp, [], None))
    rank = dist.get_rank(group)
    shards: list[torch.Tensor | None] = [None] * len(fulls)
    pending.reverse()
    while pending:
        b, inp, before, work = pending.pop()
        if work is not None:
            out = _C.wait_tensor(work)
            settle([(out, 1), *before])
            del inp, before, work
            seg = canonical_rows_sum(out.view(world, b.numel), skip[tuple(coords)].tolist())
            level = skip.all(-1)
        else:
            seg, level = inp.view(-1), skip
        for g, j in zip(rep_groups[::-1], range(len(coords) - 1, -1, -1)):
            seg = canonical_rows_sum(gather_rows(seg, g), level[tuple(coords[:j])].tolist())
            level = level.all(-1)
        for lay, t in zip(b.layouts, b.unpack_scattered(seg, rank)):
            shards[lay.index] = t
    return shards  # type: ignore[return-value]
