"""``fs.shard``: JAX's ``shard_map`` on torch.distributed.

``shard(fn, mesh=m, in_specs=..., out_specs=...)`` runs ``fn`` once per rank on local
blocks, with the named-axis collectives (``fs.psum``, ``fs.all_gather``, ...) bound to
``m``. The semantics are JAX's ``shard_map(check_rep=False)``, written out:

* **Inputs.** A plain tensor argument is the *global* value, identical on every rank;
  ``shard`` slices this rank's block by its spec (no communication). In backward the slice
  transposes to an all-gather over the spec's axes (and a ``psum`` over the mesh axes the
  spec leaves out), so the gradient is the global gradient, identical on every rank. A
  DTensor argument keeps its layout (its placements must match the spec): ``fn`` gets its
  local shard and the gradient is a DTensor with the same placements. Per-rank data enters
  with ``fs.from_local`` (no communication).
* **Outputs.** An output whose spec names axes is assembled into the global tensor
  (all-gathered along those dims; in backward this rank's slice of the cotangent). An output
  must be replicated over the axes its spec leaves out (``check=True`` verifies); in
  backward its cotangent is divided by the product of their sizes, which with ``psum``
  transposing to ``psum`` makes every gradient exact.
* **Errors** (specs that do not match the arguments' pytree, unknown axes, a spec longer
  than the tensor, a dim not divisible by its axes) are raised on every rank before any
  communication, deterministically from the identical inputs.

On a local mesh ``fn`` runs once on the whole arguments and collectives are identities.

This module owns ``fs.shard``: matching specs to argument and output pytrees, slicing the
inputs (``_Split``) and assembling the outputs (``_Assemble``), and ``check=True``'s
replication check. The specs' own checks live with ``fs.P`` (``parallel/mesh``), the
collectives with ``fs.psum`` (``parallel/collectives``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.parallel.collectives import (
    _AllGather,
    _AllReduceSum,
    _raw_all_gather,
    _raw_all_reduce,
    bind_mesh,
)
from fsharding.parallel.mesh import Mesh, P, check_spec, check_spec_shape, entry_axes, placements

__all__ = ["shard"]

_API = "fs.shard"


def shard(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    mesh: Mesh,
    in_specs: Any,
    out_specs: Any,
    check: bool = False,
) -> Any:
    """Maps ``fn`` over the blocks of its arguments on ``mesh`` (JAX ``shard_map``).

    Args:
        fn: a function of positional arguments (pytrees of tensors) run per rank on local
            blocks; it may call ``fs.psum``, ``fs.all_gather``, ... with the mesh's axes.
        mesh: the :class:`fs.Mesh`.
        in_specs: a pytree prefix of the argument tuple with :class:`fs.P` leaves (one ``P``
            covers a whole argument, or all of them). ``P()`` means replicated.
        out_specs: a pytree prefix of ``fn``'s output with ``P`` leaves. Axes a spec leaves
            out must hold replicated values.
        check: verify at run time (small all-reduces, plus one all-gather per output and
            left-out axis) that outputs are replicated over the axes their spec leaves out;
            raises ``ValueError`` naming the output, the axis and the difference, on every
            rank.

    Returns:
        The sharded function: same arguments (global values, or DTensors), global outputs.

    Raises:
        ValueError, TypeError: on the call, before any communication: specs that do not
            match the arguments (naming the path), unknown axes (listing the mesh's),
            a spec longer than the tensor, a dim not divisible by its axes' size, keyword
            arguments.

    Example:
        >>> import torch, fsharding as fs
        >>> w = torch.arange(4.0)
        >>> f = fs.shard(lambda t: (fs.all_gather(t, "dp", tiled=True) * w).sum(),
        ...              mesh=fs.Mesh(dp=1), in_specs=fs.P("dp"), out_specs=fs.P())
        >>> x = torch.ones(4, requires_grad=True)
        >>> f(x).backward()
        >>> x.grad.tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    if fn is None:
        return functools.partial(
            shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check=check
        )
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{_API}: mesh must be an fs.Mesh, got {type(mesh).__name__}.")
    if not isinstance(check, bool):
        raise TypeError(f"{_API}: check must be a bool, got {check!r}.")
    if isinstance(in_specs, list):
        in_specs = tuple(in_specs)
    for what, specs in (("in_specs", in_specs), ("out_specs", out_specs)):
        for path, spec in _tree.leaves_with_path(specs):
            check_spec(spec, mesh, _API, f"{what}{'' if path == '<root>' else path}")

    @functools.wraps(fn)
    def sharded(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(
                f"{_API}: the sharded function takes positional arguments only (got keywords "
                f"{sorted(kwargs)}); pass them positionally with a spec each, or close over them."
            )
        leaves, treedef = optree.tree_flatten(args)
        specs = _match(in_specs, args, "in_specs", "args")
        plans = [_in_plan(x, path, spec, mesh) for x, (path, spec) in zip(leaves, specs)]
        local = [x if plan is None else plan(x) for x, plan in zip(leaves, plans)]
        with bind_mesh(mesh):
            out = fn(*optree.tree_unflatten(treedef, local))
        out_leaves, out_def = optree.tree_flatten(out)
        out_specs_ = _match(out_specs, out, "out_specs", "output")
        for y, (path, spec) in zip(out_leaves, out_specs_):
            _check_output(y, path, spec, mesh)
        if mesh.is_local:
            return out
        if check:
            _check_replicated(mesh, [(p, s, y) for y, (p, s) in zip(out_leaves, out_specs_)])
        assembled = [
            _Assemble.apply(y, _plan(spec, mesh, y.shape, block=True))
            if isinstance(y, torch.Tensor)
            else y
            for y, (_, spec) in zip(out_leaves, out_specs_)
        ]
        return optree.tree_unflatten(out_def, assembled)

    return sharded


# --------------------------------------------------------------------------------------
# specs against pytrees
# --------------------------------------------------------------------------------------


def _entry(node: Any, e: Any) -> str:
    fields = getattr(type(node), "_fields", None)
    return f".{fields[e]}" if fields and isinstance(e, int) else f"[{e!r}]"


def _match(specs: Any, tree: Any, what: str, root: str) -> list[tuple[str, P]]:
    """``(path, spec)`` for every leaf of ``tree``, with ``specs`` a prefix of it."""
    out: list[tuple[str, P]] = []

    def rec(s: Any, t: Any, path: str) -> None:
        if isinstance(s, P):
            for sub, _ in _tree.leaves_with_path(t):
                out.append((path + ("" if sub == "<root>" else sub), s))
            return
        t_is_leaf = optree.tree_structure(t).is_leaf()
        if t_is_leaf or type(s) is not type(t):
            got = "None" if s is None else f"a {type(s).__name__}"
            raise ValueError(
                f"{_API}: {what} does not match {root} at {path}: {what} has {got} there, "
                f"{root} has {_short(t) if t_is_leaf else 'a ' + type(t).__name__}. Make "
                f"{what} a prefix of the {root} pytree with fs.P leaves (one P covers a whole "
                f"subtree; fs.P() is replicated)."
            )
        fs_, ft = optree.tree_flatten_one_level(s), optree.tree_flatten_one_level(t)
        if list(fs_.entries) != list(ft.entries):
            raise ValueError(
                f"{_API}: {what} does not match {root} at {path}: entries "
                f"{list(fs_.entries)} in {what} vs {list(ft.entries)} in {root}. Make "
                f"{what} a prefix of the {root} pytree."
            )
        for e, cs, ct in zip(fs_.entries, fs_.children, ft.children):
            rec(cs, ct, path + _entry(s, e))

    rec(specs, tree, root)
    return out


def _short(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a leaf of type {type(x).__name__}"


# --------------------------------------------------------------------------------------
# per-leaf plans: slicing in, assembling out
# --------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    slices: tuple[tuple[int, int, int], ...]  # (dim, start, length) of this rank's block
    gathers: tuple[tuple[int, tuple[Any, ...]], ...]  # (dim, groups of its axes, major first)
    reduce: tuple[Any, ...]  # groups of the unmentioned axes (size > 1)
    replicas: int  # product of the unmentioned axes' sizes


def _plan(spec: P, mesh: Mesh, shape: Any, *, split: bool = True, block: bool = False) -> _Plan:
    """``shape`` is the global shape, or the block's with ``block=True``."""
    sizes, coord = mesh.shape, mesh.coordinate
    slices, gathers = [], []
    for dim, entry in enumerate(spec if split else ()):
        axes = [a for a in entry_axes(entry) if sizes[a] > 1]
        if not axes:
            continue
        n, idx = math.prod(sizes[a] for a in axes), 0
        for a in axes:
            idx = idx * sizes[a] + coord[a]
        length = shape[dim] if block else shape[dim] // n
        slices.append((dim, idx * length, length))
        gathers.append((dim, tuple(mesh.group(a) for a in axes)))
    rest = [a for a in mesh.axis_names if a not in spec.axes and sizes[a] > 1]
    return _Plan(
        tuple(slices),
        tuple(gathers),
        tuple(mesh.group(a) for a in rest),
        math.prod(sizes[a] for a in rest),
    )


def _take(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    for dim, start, length in plan.slices:
        x = x.narrow(dim, start, length)
    return x


def _gather(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    for dim, groups in plan.gathers:
        for group in reversed(groups):  # minor axis first: the first axis ends up major
            x = _AllGather.apply(x, dim, group)
    return x


class _Split(torch.autograd.Function):
    """This rank's block; backward: psum over unmentioned axes, all-gather the block."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        ctx.plan = plan
        return _take(x, plan)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        for group in ctx.plan.reduce:
            g = _AllReduceSum.apply(g, group)
        return _gather(g, ctx.plan), None


class _Assemble(torch.autograd.Function):
    """The global output; backward: this rank's slice over the replica count."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, plan: _Plan) -> torch.Tensor:
        ctx.plan = plan
        return _gather(y, plan) if plan.gathers else y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        g = _take(g, ctx.plan)
        return (g / ctx.plan.replicas if ctx.plan.replicas > 1 else g), None


def _in_plan(x: Any, path: str, spec: P, mesh: Mesh) -> Callable[[Any], Any] | None:
    """Validates one argument leaf; returns how to get its block (None: pass as is)."""
    if not isinstance(x, torch.Tensor):
        if spec.axes:
            raise TypeError(
                f"{_API}: {path} is a {type(x).__name__}, which cannot be split by {spec!r}; "
                f"give non-tensor leaves the spec fs.P()."
            )
        return None
    check_spec_shape(spec, mesh, x.shape, _API, path)
    if _tree.is_dtensor(x):
        _check_dtensor(x, path, spec, mesh)
        plan = _plan(spec, mesh, x.shape, split=False)
        return lambda t: _Split.apply(t.to_local(), plan)
    if mesh.is_local:
        return None
    plan = _plan(spec, mesh, x.shape)
    return lambda t: _Split.apply(t, plan)


def _check_dtensor(x: Any, path: str, spec: P, mesh: Mesh) -> None:
    dm = x.device_mesh
    names = tuple(dm.mesh_dim_names or ())
    fix = (
        f"Build it with fs.from_local(block, mesh, {spec!r}) or redistribute it, or pass the "
        f"spec of its layout."
    )
    if (
        mesh.is_local
        or not names
        or any(a not in mesh.axis_names or mesh.shape[a] != dm.size(i) for i, a in enumerate(names))
    ):
        raise ValueError(
            f"{_API}: the DTensor {path} lives on {dm}, which is not {mesh!r} or one of its "
            f"sub-meshes. {fix}"
        )
    missing = [a for a in spec.axes if a not in names]
    sub = Mesh.from_device_mesh(dm)
    want = None if missing else placements(P(*_restrict(spec, names)), sub, _API, path)
    if want is None or tuple(x.placements) != tuple(want):
        raise ValueError(
            f"{_API}: the DTensor {path} has placements {tuple(x.placements)} on axes {names}, "
            f"which is not the layout of its spec {spec!r} (placements {want}). {fix}"
        )


def _restrict(spec: P, names: tuple[str, ...]) -> list[Any]:
    return [tuple(a for a in entry_axes(e) if a in names) for e in spec]


def _check_output(y: Any, path: str, spec: P, mesh: Mesh) -> None:
    if not isinstance(y, torch.Tensor):
        if spec.axes:
            raise TypeError(
                f"{_API}: {path} is a {type(y).__name__}, which cannot be assembled "
                f"by {spec!r}; give non-tensor outputs the spec fs.P()."
            )
        return
    if _tree.is_dtensor(y):
        raise TypeError(
            f"{_API}: {path} is a DTensor; fn works on local blocks, so return "
            f"local tensors (DTensor.to_local()) and describe them with out_specs."
        )
    if len(spec) > y.dim():
        raise ValueError(
            f"{_API}: the out_specs entry {spec!r} for {path} has {len(spec)} entries but the "
            f"block has {y.dim()} dims (shape {tuple(y.shape)}). Drop trailing entries."
        )


# --------------------------------------------------------------------------------------
# check=True: replication of outputs over the axes their spec leaves out
# --------------------------------------------------------------------------------------

_TOL = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}
_META = 10  # ndim, numel, first 8 sizes


def _all_axes_max(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Elementwise max over the whole mesh (one all-reduce per axis of size > 1)."""
    for a in mesh.axis_names:
        if mesh.shape[a] > 1:
            t = _raw_all_reduce(t, "max", mesh.group(a))
    return t


def _check_replicated(mesh: Mesh, outs: list[tuple[str, P, Any]]) -> None:
    outs = [(p, s, y.detach()) for p, s, y in outs if isinstance(y, torch.Tensor)]
    if not outs:
        return
    dev = outs[0][2].device
    meta = torch.full((len(outs), _META), -1, dtype=torch.int64)
    for i, (_, _, y) in enumerate(outs):
        sizes = list(y.shape)[:8]
        meta[i, : 2 + len(sizes)] = torch.tensor([y.dim(), y.numel(), *sizes])
    both = _all_axes_max(torch.cat([meta, -meta]).to(dev), mesh).cpu()
    for i, (path, _, y) in enumerate(outs):
        if not torch.equal(both[i], -both[len(outs) + i]):
            raise ValueError(
                f"{_API}(check=True): {path} has different shapes on different ranks "
                f"(this rank: {tuple(y.shape)}); fn must return the same shapes everywhere."
            )
    names = mesh.axis_names
    stats = torch.full((len(outs), len(names)), -1.0, dtype=torch.float64)
    for i, (_, spec, y) in enumerate(outs):
        for j, a in enumerate(names):
            if a in spec.axes or mesh.shape[a] == 1:
                continue
            everyone = _raw_all_gather(y.unsqueeze(0), 0, mesh.group(a))
            ref = everyone[0].expand_as(everyone)
            rtol, atol = _TOL.get(y.dtype, (0.0, 0.0))
            close = torch.isclose(everyone, ref, rtol=rtol, atol=atol, equal_nan=True)
            if not bool(close.all()):
                diff = (everyone.double() - ref.double()).abs().nan_to_num(float("inf"))
                stats[i, j] = float(diff.max())
    stats = _all_axes_max(stats.to(dev), mesh).cpu()
    bad = (stats >= 0).nonzero().tolist()
    if bad:
        i, j = bad[0]
        path, spec = outs[i][0], outs[i][1]
        raise ValueError(
            f"{_API}(check=True): {path} has spec {spec!r}, which leaves out axis "
            f"{names[j]!r}, but its value differs across that axis (max abs difference "
            f"{stats[i, j].item():.3g}). Reduce it over {names[j]!r} inside fn (fs.psum / "
            f"fs.pmean / fs.all_gather), or name {names[j]!r} in its out_specs entry."
        )
