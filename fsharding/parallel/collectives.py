"""Differentiable named-axis collectives (JAX's ``psum``, ``all_gather``, ...): ``fs.psum``,
``fs.pmean``, ``fs.pmax``, ``fs.all_gather``, ``fs.psum_scatter``, ``fs.ppermute``,
``fs.axis_index``, ``fs.axis_size``, and the current mesh they read.

They are called inside ``fs.shard`` (or any code run under :func:`bind_mesh`) with a mesh
axis name; the mesh comes from the context (``_context.MESH``). Each takes a tensor or a
pytree of tensors. Built on torch's functional collectives (``torch.ops._c10d_functional``,
the ops under ``torch.distributed._functional_collectives``), wrapped in autograd Functions
with JAX's transposes (``shard_map(check_rep=False)``):

=================  =========================================
collective         backward
=================  =========================================
psum               psum
pmean              pmean
pmax               psum of the cotangent, to the maximal elements (ties share it)
all_gather         psum_scatter (and back)
psum_scatter       all_gather
ppermute           ppermute with the inverse permutation
=================  =========================================

On a local mesh, or along an axis of size 1, every collective is the identity (with JAX's
shapes: an untiled ``all_gather`` adds a dim of size 1). ``axis_name`` may be a tuple of
axes for ``psum``/``pmean``/``pmax``/``all_gather``/``psum_scatter``/``axis_index``/
``axis_size`` (the first axis major); ``ppermute`` takes one axis.

For library code: :func:`bind_mesh` makes a mesh current (``fs.shard`` uses it around
``fn``), :func:`current_mesh` reads it. During a backward pass with no mesh bound (e.g. a
``remat`` region recomputing a collective) the most recently bound mesh is used. The
autograd Functions over one process group (``_AllReduceSum``, ``_AllGather``, ...) and the
raw waited collectives (``_raw_all_reduce``, ...) are ``fs.shard``'s building blocks too.
Each returns only after gloo's worker thread has let go of its tensors (``settle``, in
``fsharding._compat``: no SIGABRT at exit); ``settle`` and ``use_counts`` are importable from
here as well.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import optree
import torch

from fsharding import _context
from fsharding._compat import settle, use_counts
from fsharding.parallel.mesh import Mesh

__all__ = [
    "psum",
    "pmean",
    "pmax",
    "all_gather",
    "psum_scatter",
    "ppermute",
    "axis_index",
    "axis_size",
    "bind_mesh",
    "current_mesh",
]

AxisName = str | tuple[str, ...]

_CURRENT = _context.MESH
_LAST: list[Mesh | None] = [None]  # the last mesh bound, for recomputation during backward


@contextlib.contextmanager
def bind_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Makes ``mesh`` the current mesh of the named-axis collectives in this context
    (``fs.shard`` binds its mesh around ``fn``)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"bind_mesh: mesh must be an fs.Mesh, got {type(mesh).__name__}.")
    token = _CURRENT.set(mesh)
    _LAST[0] = mesh
    try:
        yield mesh
    finally:
        _CURRENT.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh bound by the innermost ``fs.shard`` / :func:`bind_mesh`, else None (in a
    backward pass with none bound: the last mesh bound, for remat's recomputation)."""
    mesh = _CURRENT.get()
    if mesh is None and torch._C._current_graph_task_id() != -1:
        mesh = _LAST[0]  # inside a backward pass (remat recomputation)
    return mesh


def _axes(axis_name: Any, api: str) -> tuple[Mesh, tuple[str, ...]]:
    mesh = current_mesh()
    if mesh is None:
        raise RuntimeError(
            f"{api}: axis name {axis_name!r} is not bound: named-axis collectives run inside "
            f"fs.shard(fn, mesh=..., in_specs=..., out_specs=...), whose mesh defines the "
            f"axes. Call {api.removeprefix('fs.')} from the function passed to fs.shard."
        )
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, tuple) or not names or not all(isinstance(a, str) for a in names):
        raise TypeError(
            f"{api}: axis_name must be an axis name or a tuple of axis names, got {axis_name!r}."
        )
    for a in names:
        if a not in mesh.axis_names:
            raise ValueError(
                f"{api}: unknown axis {a!r}; the current mesh has axes {mesh.axis_names}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{api}: axis_name {axis_name!r} repeats an axis.")
    return mesh, names


def _groups(mesh: Mesh, names: Sequence[str]) -> list[tuple[Any, int]]:
    """(process group, size) of each named axis that needs communication (size > 1)."""
    shape = mesh.shape
    return [(mesh.group(a), shape[a]) for a in names if shape[a] > 1]


def _map(fn: Any, x: Any, api: str) -> Any:
    def one(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{api}: expected tensors, got a leaf of type {type(leaf).__name__}.")
        return fn(leaf)

    return optree.tree_map(one, x)


# --------------------------------------------------------------------------------------
# autograd Functions over one process group (forward / transpose)
# --------------------------------------------------------------------------------------


# torch's functional collective ops, the op layer of torch.distributed._functional_collectives
# (out of place, traceable by torch.compile, the same in torch 2.6 and 2.13). They are called
# directly: funcol's Python wrappers pass eager results through a custom op whose first call
# imports torch._dynamo, seconds per process; and their names changed in torch 2.12.
_C = torch.ops._c10d_functional


def _returned(out: torch.Tensor, before: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``out`` (a collective's result, waited) once the backend has dropped the work."""
    settle([(out, 1), *before])
    return out


def _raw_all_reduce(x: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    x = x.contiguous()
    before = use_counts([x])
    return _returned(_C.wait_tensor(_C.all_reduce(x, op, group.group_name)), before)


def _raw_all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along ``dim``, in group rank order."""
    n = group.size()
    x = x.contiguous()
    before = use_counts([x])
    out = _C.wait_tensor(_C.all_gather_into_tensor(x, n, group.group_name))
    out = _returned(out, before)
    return out if dim == 0 else torch.cat(out.chunk(n), dim)


def _raw_reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Block ``rank`` (along ``dim``, divisible) of the sum of every rank's ``x``."""
    n = group.size()
    if dim != 0:
        x = torch.cat(x.chunk(n, dim), 0)
    x = x.contiguous()
    before = use_counts([x])
    return _returned(
        _C.wait_tensor(_C.reduce_scatter_tensor(x, "sum", n, group.group_name)), before
    )


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _raw_all_reduce(x, "sum", group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return _AllReduceSum.apply(g, ctx.group), None


class _AllGather(torch.autograd.Function):  # tiled, along `dim`
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _raw_all_gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return _ReduceScatter.apply(g, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):  # sum, tiled, along `dim`
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _raw_reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return _AllGather.apply(g, ctx.dim, ctx.group), None, None


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: tuple, me: int, n: int, group: Any) -> Any:
        ctx.args = (tuple((d, s) for s, d in perm), me, n, group)
        dst = next((d for s, d in perm if s == me), None)
        src = next((s for s, d in perm if d == me), None)
        flat = x.contiguous().reshape(-1)
        ins = [flat.numel() if j == dst else 0 for j in range(n)]
        outs = [flat.numel() if j == src else 0 for j in range(n)]
        flat = flat if dst is not None else flat[:0]  # all_to_all wants sum(ins) elements
        before = use_counts([flat])
        out = _C.wait_tensor(_C.all_to_all_single(flat, outs, ins, group.group_name))
        out = _returned(out, before)
        return torch.zeros_like(x) if src is None else out.reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return (_Permute.apply(g, *ctx.args), None, None, None, None)


class _AllReduceMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = _raw_all_reduce(x, "max", group)
        ctx.group = group
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, out = ctx.saved_tensors
        hit = (x == out).to(g.dtype)
        count = _AllReduceSum.apply(hit, ctx.group)
        return _AllReduceSum.apply(g, ctx.group) * hit / count, None


# --------------------------------------------------------------------------------------
# the public collectives
# --------------------------------------------------------------------------------------


def psum(x: Any, axis_name: AxisName) -> Any:
    """Sums ``x`` over the ranks of ``axis_name``; every rank gets the sum.

    ``x`` is a tensor or a pytree of tensors (a Python number counts the ranks: ``psum(1,
    "dp")`` is the axis size). Its transpose is ``psum`` (JAX ``check_rep=False``).

    Args:
        x: a tensor or a pytree of tensors (or a Python number), this rank's value.
        axis_name: a mesh axis name, or a tuple of them.

    Returns:
        The sum, with ``x``'s structure, shapes and dtypes.

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice.
        TypeError: a bad ``axis_name``, or a leaf of ``x`` that is not a tensor.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: (fs.psum({"a": x}, "dp"), fs.psum(1, "dp")),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P(), out_specs=fs.P())
        >>> total, n = f(torch.tensor(3.0))
        >>> total["a"].item(), n
        (3.0, 1)
    """
    mesh, names = _axes(axis_name, "fs.psum")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x * math.prod(mesh.shape[a] for a in names)
    groups = _groups(mesh, names)

    def one(t: torch.Tensor) -> torch.Tensor:
        for group, _ in groups:
            t = _AllReduceSum.apply(t, group)
        return t

    return _map(one, x, "fs.psum")


def pmean(x: Any, axis_name: AxisName) -> Any:
    """The mean of ``x`` over the ranks of ``axis_name`` (``psum(x) / axis_size``).

    Args:
        x: a tensor or a pytree of tensors, this rank's value.
        axis_name: a mesh axis name, or a tuple of them (the first major).

    Returns:
        The mean, with ``x``'s structure, shapes and dtypes.

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice.
        TypeError: a bad ``axis_name``, or a leaf of ``x`` that is not a tensor.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: fs.pmean(x, "dp"),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P("dp"), out_specs=fs.P())
        >>> f(torch.tensor([2.0, 4.0])).tolist()
        [2.0, 4.0]
    """
    mesh, names = _axes(axis_name, "fs.pmean")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    n = math.prod(mesh.shape[a] for a in names)
    return optree.tree_map(lambda t: t / n if n > 1 else t, psum(x, axis_name))


def pmax(x: Any, axis_name: AxisName) -> Any:
    """The elementwise maximum of ``x`` over the ranks of ``axis_name``.

    Its gradient goes to the ranks holding the maximum (split evenly among ties, like
    ``torch.amax``), summed over the ranks' cotangents.

    Args:
        x: a tensor or a pytree of tensors, this rank's value.
        axis_name: a mesh axis name, or a tuple of them (the first major).

    Returns:
        The elementwise maximum, with ``x``'s structure, shapes and dtypes.

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice.
        TypeError: a bad ``axis_name``, or a leaf of ``x`` that is not a tensor.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: fs.pmax(x, "dp"),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P("dp"), out_specs=fs.P())
        >>> f(torch.tensor([1.0, -1.0])).tolist()
        [1.0, -1.0]
    """
    mesh, names = _axes(axis_name, "fs.pmax")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    groups = _groups(mesh, names)

    def one(t: torch.Tensor) -> torch.Tensor:
        for group, _ in groups:
            t = _AllReduceMax.apply(t, group)
        return t

    return _map(one, x, "fs.pmax")


def _dim(d: int, ndim: int, api: str, arg: str) -> int:
    if not -ndim <= d < ndim:
        raise ValueError(f"{api}: {arg}={d} is out of range for a tensor with {ndim} dims.")
    return d % ndim


def all_gather(x: Any, axis_name: AxisName, *, axis: int = 0, tiled: bool = False) -> Any:
    """Gathers ``x`` from every rank of ``axis_name``, in rank order.

    ``tiled=False`` stacks the blocks along a new dim at ``axis`` (size = axis size);
    ``tiled=True`` concatenates them along the existing dim ``axis``. The transpose is
    :func:`psum_scatter`.

    Args:
        x: a tensor or a pytree of tensors, this rank's value.
        axis_name: a mesh axis name, or a tuple of them (the first major).
        axis: where the blocks go: a new dim (``tiled=False``) or an existing one.
        tiled: concatenate along ``axis`` instead of stacking.

    Returns:
        Every rank's ``x``, in rank order along ``axis``.

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice, or an ``axis`` out
            of range.
        TypeError: a bad ``axis_name``, or a leaf of ``x`` that is not a tensor.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: fs.all_gather(x, "dp"),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P("dp"), out_specs=fs.P())
        >>> f(torch.ones(2, 3)).shape
        torch.Size([1, 2, 3])
    """
    api = "fs.all_gather"
    mesh, names = _axes(axis_name, api)
    groups = _groups(mesh, names)

    def one(t: torch.Tensor) -> torch.Tensor:
        if tiled:
            d = _dim(axis, t.dim(), api, "axis")
        else:
            d = _dim(axis, t.dim() + 1, api, "axis")
            t = t.unsqueeze(d)
        for group, _ in reversed(groups):  # minor axis first: the first axis ends up major
            t = _AllGather.apply(t, d, group)
        return t

    return _map(one, x, api)


def psum_scatter(
    x: Any, axis_name: AxisName, *, scatter_dimension: int = 0, tiled: bool = False
) -> Any:
    """Sums ``x`` over the ranks of ``axis_name`` and leaves each rank its block.

    ``tiled=True``: dim ``scatter_dimension`` (divisible by the axis size) is cut into
    blocks, rank ``i`` keeps block ``i`` of the sum. ``tiled=False``: that dim must equal
    the axis size and is removed. The transpose is :func:`all_gather`.

    Args:
        x: a tensor or a pytree of tensors, this rank's value.
        axis_name: a mesh axis name, or a tuple of them (the first major).
        scatter_dimension: the dim cut into one block per rank.
        tiled: keep the dim (its size divided by the axis size) instead of removing it.

    Returns:
        This rank's block of the sum.

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice, or a
            ``scatter_dimension`` of the wrong size.
        TypeError: a bad ``axis_name``, or a leaf of ``x`` that is not a tensor.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: fs.psum_scatter(x, "dp"),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P(), out_specs=fs.P("dp"))
        >>> f(torch.ones(1, 3)).shape
        torch.Size([3])
    """
    api = "fs.psum_scatter"
    mesh, names = _axes(axis_name, api)
    n = math.prod(mesh.shape[a] for a in names)
    groups = _groups(mesh, names)

    def one(t: torch.Tensor) -> torch.Tensor:
        d = _dim(scatter_dimension, t.dim(), api, "scatter_dimension")
        size = t.shape[d]
        if (size != n) if not tiled else (size % n):
            need = f"equal to the axis size {n}" if not tiled else f"divisible by {n}"
            raise ValueError(
                f"{api}: dim {d} of a tensor of shape {tuple(t.shape)} must be {need} "
                f"(axis_name={axis_name!r}, tiled={tiled})."
            )
        for group, _ in groups:  # major axis first
            t = _ReduceScatter.apply(t, d, group)
        return t if tiled else t.squeeze(d)

    return _map(one, x, api)


def ppermute(x: Any, axis_name: str, perm: Sequence[tuple[int, int]]) -> Any:
    """Sends ``x`` along ``axis_name``: ``(src, dst)`` pairs by axis index.

    A rank that is no pair's ``dst`` gets zeros. Sources and destinations must each be
    unique. The transpose is the inverse permutation. One axis only.

    Args:
        x: a tensor or a pytree of tensors, this rank's value.
        axis_name: one mesh axis name.
        perm: ``(src, dst)`` pairs of axis indices.

    Returns:
        What ``x``'s source rank sent (zeros where none did).

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an unknown axis, several axes, or a bad ``perm``.
        TypeError: ``perm`` is not a sequence of pairs.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: (fs.ppermute(x, "dp", [(0, 0)]), fs.ppermute(x, "dp", [])),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P("dp"), out_specs=fs.P("dp"))
        >>> [y.tolist() for y in f(torch.ones(2))]
        [[1.0, 1.0], [0.0, 0.0]]
    """
    api = "fs.ppermute"
    mesh, names = _axes(axis_name, api)
    if len(names) != 1:
        raise ValueError(f"{api}: takes one axis name, got {axis_name!r}.")
    n, me = mesh.shape[names[0]], mesh.coordinate[names[0]]
    try:
        pairs = tuple((int(s), int(d)) for s, d in perm)
    except (TypeError, ValueError):
        raise TypeError(
            f"{api}: perm must be a sequence of (src, dst) pairs, got {perm!r}."
        ) from None
    srcs, dsts = [s for s, _ in pairs], [d for _, d in pairs]
    if (
        any(not 0 <= i < n for i in srcs + dsts)
        or len(set(srcs)) < len(srcs)
        or len(set(dsts)) < len(dsts)
    ):
        raise ValueError(
            f"{api}: perm {list(pairs)} must hold (src, dst) pairs of axis indices in "
            f"[0, {n}) with no repeated src and no repeated dst (axis {names[0]!r})."
        )
    group = mesh.group(names[0]) if n > 1 else None

    def one(t: torch.Tensor) -> torch.Tensor:
        if group is None or not pairs:
            return t if (me, me) in pairs else torch.zeros_like(t)
        return _Permute.apply(t, pairs, me, n, group)

    return _map(one, x, api)


def axis_index(axis_name: AxisName) -> int:
    """This rank's index along ``axis_name`` (a Python int; row-major over a tuple).

    Args:
        axis_name: a mesh axis name, or a tuple of them (the first major).

    Returns:
        This rank's index, in ``[0, axis_size(axis_name))``.

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice.
        TypeError: a bad ``axis_name``.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: fs.axis_index("dp"),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P(), out_specs=fs.P())
        >>> f(torch.ones(1))
        0
    """
    mesh, names = _axes(axis_name, "fs.axis_index")
    coord, shape, idx = mesh.coordinate, mesh.shape, 0
    for a in names:
        idx = idx * shape[a] + coord[a]
    return idx


def axis_size(axis_name: AxisName) -> int:
    """The number of ranks along ``axis_name`` (the product over a tuple).

    Args:
        axis_name: a mesh axis name, or a tuple of them.

    Returns:
        The axis size (the product of the sizes over a tuple).

    Raises:
        RuntimeError: called outside ``fs.shard`` (no mesh bound).
        ValueError: an axis the mesh does not have, or one given twice.
        TypeError: a bad ``axis_name``.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.shard(lambda x: fs.axis_size(("dp", "tp")),
        ...              mesh=fs.Mesh(dp=1, tp=1), in_specs=fs.P(), out_specs=fs.P())
        >>> f(torch.ones(1))
        1
    """
    mesh, names = _axes(axis_name, "fs.axis_size")
    return math.prod(mesh.shape[a] for a in names)
