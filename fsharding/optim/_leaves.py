"""Private: how every ``fsharding.optim`` transform runs over the leaves of its trees.

This module owns the one pattern every transform follows at ``init``/``update`` time:
flatten each tree once and check the structures and leaf shapes against each other (naming
the first differing path on failure); compute on the local shards of DTensor leaves and
rewrap the results with each input's layout; group leaf positions by device and dtype and
run one ``torch._foreach_*`` op per group. The first op that produces a new value either
writes into the donated input (inside ``optim.donation()``) or allocates (never mutating an
input); the ops after it are the same in-place ops in both modes, so both modes give bitwise
the same results. (Construction-time argument checks live in ``optim._checks``.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

from fsharding import _context
from fsharding import tree as _tree

PyTree = Any
Leaves = list[torch.Tensor]


# --------------------------------------------------------------------------------------
# leaves and structures
# --------------------------------------------------------------------------------------


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def flatten(tree: PyTree, api: str, what: str) -> tuple[Leaves, optree.PyTreeSpec]:
    """Leaves and treedef of ``tree``; every leaf must be a floating-point tensor."""
    leaves, treedef = optree.tree_flatten(tree)
    for x in leaves:
        if not _is_float_tensor(x):
            raise_bad_leaf(tree, api, what)
    return leaves, treedef


def raise_bad_leaf(tree: PyTree, api: str, what: str) -> None:
    for path, x in _tree.leaves_with_path(tree):
        if _is_float_tensor(x):
            continue
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"{x!r}"
        raise TypeError(
            f"{api}: {what} leaf {path} is {got}, of type {type(x).__name__}; optimizer "
            f"{what} must be floating-point tensors. Keep integer and constant values out of "
            "params (e.g. in the batch or a closure), or cast the leaf to a float dtype."
        )


def leaves_like(
    tree: PyTree,
    ref_def: optree.PyTreeSpec,
    ref: PyTree,
    names: tuple[str, str],
    api: str,
    like: Leaves | None = None,
) -> Leaves:
    """Leaves of ``tree``, which must have the structure ``ref_def`` of ``ref`` and, when
    ``like`` (``ref``'s leaves) is given, each leaf its shape."""
    leaves, treedef = optree.tree_flatten(tree)
    if treedef != ref_def:
        _tree.check_same_structure(ref, tree, names=names, api=api)
        raise ValueError(f"{api}: {names[0]} and {names[1]} differ in pytree structure.")
    if like is not None:
        check_leaves(api, like, leaves, ref, names)
    return leaves


def check_leaves(
    api: str, leaves: Leaves, refs: Leaves, tree: PyTree, names: tuple[str, str]
) -> None:
    """Each of ``leaves`` has the shape of the matching ``refs`` leaf (one Python pass
    comparing ``.shape``), checked before any kernel runs: a foreach or fused kernel given
    other shapes broadcasts silently or reads out of bounds. (Devices are not compared here:
    a device mismatch is not silent, torch's ops raise.)
    ``tree`` (with ``leaves``' structure) names the path; ``names`` the two trees."""
    for i, (x, r) in enumerate(zip(leaves, refs)):
        if x.shape != r.shape:
            raise_leaf_mismatch(api, i, x, r, tree, names)


def check_local(
    api: str, leaves: Leaves, others: tuple[Leaves, ...], tree: PyTree, names: tuple[str, ...]
) -> None:
    """With DTensor leaves, the local shards the kernels see match too (two DTensors of one
    global shape but other placements have other local shapes)."""
    for other, name in zip(others, names):
        check_leaves(api, leaves, other, tree, ("updates (local shard)", f"{name} (local shard)"))


def raise_leaf_mismatch(
    api: str, i: int, x: Any, r: Any, tree: PyTree, names: tuple[str, str]
) -> None:
    path = _tree.leaves_with_path(tree)[i][0]
    if x.shape != r.shape:
        got = f"shape {tuple(x.shape)} but {names[1]} leaf {path} has shape {tuple(r.shape)}"
    else:
        got = f"device {x.device} but {names[1]} leaf {path} is on {r.device}"
    if "state" in names[1]:
        fix = (
            f"Pass the state that init(params) returned for params of these shapes (re-run "
            f"init after changing the model), and {names[0]} with each param's exact shape."
        )
    else:
        fix = (
            f"Pass {names[0]} with each param's exact shape (e.g. the grads of these "
            "params from fs.value_and_grad(f)(params)); shapes are never broadcast."
        )
    raise ValueError(f"{api}: {names[0]} leaf {path} has {got}. {fix}") from None


def no_params_error(api: str) -> ValueError:
    return ValueError(
        f"{api}: this transform needs params, got params=None. Call "
        "update(updates, state, params) with the current params."
    )


def detach_all(leaves: Leaves) -> Leaves:
    """Pass-through leaves never carry autograd history out of ``update``."""
    return [x.detach() if x.requires_grad else x for x in leaves]


def zeros_like_tree(params: PyTree, api: str, dtype: torch.dtype | None = None) -> PyTree:
    """Zeros with each param's shape, device and layout, and its dtype or ``dtype`` (params
    checked as floats)."""
    leaves, treedef = flatten(params, api, "params")
    with torch.no_grad():
        return optree.tree_unflatten(treedef, [torch.zeros_like(p, dtype=dtype) for p in leaves])


# --------------------------------------------------------------------------------------
# grouping for foreach ops
# --------------------------------------------------------------------------------------


def groups(*lists: Sequence[torch.Tensor]) -> list[list[int]]:
    """Leaf positions grouped so that every list has one device and dtype per group."""
    out: dict[tuple, list[int]] = {}
    for i, ts in enumerate(zip(*lists)):
        key = tuple((t.device, t.dtype) for t in ts)
        out.setdefault(key, []).append(i)
    return list(out.values())


def pick(lst: Sequence[Any], idx: list[int]) -> list[Any]:
    return [lst[i] for i in idx]


def put(dst: list[Any], idx: list[int], values: Sequence[Any]) -> None:
    for i, v in zip(idx, values):
        dst[i] = v


def map_updates(updates: PyTree, api: str, fn: Callable[[Leaves, bool], Leaves]) -> PyTree:
    """Applies ``fn(group_leaves, donate)`` to each (device, dtype) group of ``updates``."""
    gl, gdef = flatten(updates, api, "updates")
    loc, dt = local(gl)
    donate = _context.DONATING.get()  # inside optim.donation()
    out = list(loc)
    for idx in groups(loc):
        put(out, idx, fn(pick(loc, idx), donate))
    if dt:
        out = rewrap(out, gl, loc)
    return optree.tree_unflatten(gdef, out)


def first(name: str, donate: bool, tensors: Leaves, *args: Any, **kwargs: Any) -> Leaves:
    """``torch._foreach_<name>_`` on ``tensors`` (donated) or ``_foreach_<name>`` (new)."""
    if donate:
        if tensors and tensors[0].dtype in (torch.bfloat16, torch.float16):
            # The in-place foreach rounds a Python scalar to the tensors' dtype first (the
            # out-of-place one does not): pass it as a 0-dim tensor to round once, as the
            # non-donated path does.
            args = tuple(
                torch.tensor(a, device=tensors[0].device) if isinstance(a, float) else a
                for a in args
            )
        getattr(torch, f"_foreach_{name}_")(tensors, *args, **kwargs)
        return tensors
    return list(getattr(torch, f"_foreach_{name}")(tensors, *args, **kwargs))


# --------------------------------------------------------------------------------------
# DTensor leaves: compute on local shards, rewrap outputs with the input's layout
# --------------------------------------------------------------------------------------


def _dtensor_type() -> type | None:
    """DTensor's class if torch has loaded its module, else None: then no DTensor can exist.

    The one place optim needs the class itself (to build a DTensor, and for :func:`local`'s
    per-type test on the hot path); elsewhere a per-leaf test is ``fs.tree.is_dtensor``.
    Importing the module here instead would cost a second on a plain-tensor run's first
    update.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(leaves: Leaves) -> tuple[Leaves, bool]:
    """Local shards of ``leaves`` (views: in-place ops reach the DTensor) and whether any
    leaf was a DTensor."""
    dt = _dtensor_type()
    # One test per distinct leaf type, not per leaf (tree.is_dtensor): this runs several
    # times per update, and a 150-leaf tree costs 4 us this way, 19 us leaf by leaf.
    if dt is None or not any(issubclass(t, dt) for t in set(map(type, leaves))):
        return leaves, False
    return [x.to_local() if isinstance(x, dt) else x for x in leaves], True


def rewrap(outs: Leaves, likes: Leaves, locals_: Leaves) -> Leaves:
    """Outputs as leaves laid out like ``likes``: an output that *is* the local view of its
    input (updated in place) gives back the input itself; a new local tensor is wrapped as a
    DTensor with the input's mesh, placements and global shape."""
    dt = _dtensor_type()
    res = []
    for o, like, loc in zip(outs, likes, locals_):
        if o is loc:
            o = like
        elif dt is not None and isinstance(like, dt) and not isinstance(o, dt):
            o = dt.from_local(
                o,
                like.device_mesh,
                like.placements,
                run_check=False,
                shape=like.shape,
                stride=like.stride(),
            )
        res.append(o)
    return res
