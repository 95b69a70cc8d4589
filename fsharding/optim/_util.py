"""Private helpers for ``fsharding.optim``: leaf checks, hyperparameter checks, (device,
dtype) grouping for ``torch._foreach_*`` ops, and DTensor local/rewrap.

Every transform follows one pattern: flatten each tree once, check the structures against
each other (naming the first differing path on failure), group leaf positions by device and
dtype, and run one foreach op per group. The first op that produces a new value either writes
into the donated input (``donating()``) or allocates (never mutating an input); the ops after
it are the same in-place ops in both modes, so both modes give bitwise the same results.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

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


def dtype_arg(api: str, name: str, value: Any) -> torch.dtype | None:
    """None, or a floating ``torch.dtype`` (optax's names as strings are accepted too:
    ``"bfloat16"``, ``"float32"``, ...)."""
    if value is None:
        return None
    d = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise TypeError(
            f"{api}: {name} must be a floating torch.dtype (or its name, e.g. 'bfloat16') or "
            f"None (the params' dtype), got {value!r}. Pass e.g. {name}=torch.bfloat16."
        )
    return d


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
    from fsharding.optim.base import donating  # base imports this module

    donate = donating()
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
    """DTensor's class if its module is loaded (no DTensor can exist otherwise: importing
    it here would cost a second on the first update of a plain-tensor run)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(leaves: Leaves) -> tuple[Leaves, bool]:
    """Local shards of ``leaves`` (views: in-place ops reach the DTensor) and whether any
    leaf was a DTensor."""
    dt = _dtensor_type()
    if dt is None:
        return leaves, False
    if not any(issubclass(t, dt) for t in set(map(type, leaves))):
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


# --------------------------------------------------------------------------------------
# hyperparameter checks (house style: API, argument, value received, fix)
# --------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def number(
    api: str,
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    hi_open: bool = False,
    hint: str = "",
) -> float:
    """Checks that ``value`` is a finite real number in ``[lo, hi]`` (or ``[lo, hi)``)."""
    tail = f" {hint}" if hint else ""
    if not _is_number(value) or not math.isfinite(float(value)):
        raise TypeError(
            f"{api}: {name} must be a finite real number, got {value!r} "
            f"({type(value).__name__}).{tail}"
        )
    v = float(value)
    if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        close = ")" if hi_open or hi is None else "]"
        open_ = "(" if lo is None else "["
        raise ValueError(
            f"{api}: {name} must be in {open_}{left}, {right}{close}, got {value!r}.{tail}"
        )
    return v


def integer(api: str, name: str, value: Any, *, lo: int = 0, hint: str = "") -> int:
    """Checks that ``value`` is an int >= ``lo``."""
    tail = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{api}: {name} must be an int, got {value!r} ({type(value).__name__}).{tail}"
        )
    if value < lo:
        raise ValueError(f"{api}: {name} must be >= {lo}, got {value!r}.{tail}")
    return int(value)


def schedule(api: str, name: str, fn: Any) -> Callable[[int], Any]:
    """Checks at construction that ``fn`` is a schedule (``step -> number``): not an
    uncalled factory such as ``optim.cosine_decay_schedule``, and ``fn(0)`` is a real
    number or a 0-dim tensor (so a mistake fails here, not mid-training)."""
    from fsharding.optim import schedules as _s  # (a cycle at import time)

    qual = getattr(fn, "__qualname__", "")
    if getattr(fn, "__module__", None) == _s.__name__ and qual in _s.__all__:
        raise TypeError(
            f"{api}: {name} is the schedule factory optim.{qual} itself, not a schedule; "
            f"call it to make one, e.g. {name}=optim.{qual}(...) with its arguments "
            "(such as optim.cosine_decay_schedule(3e-4, decay_steps=10_000))."
        )
    try:
        v = fn(0)
    except Exception as e:  # noqa: BLE001 - reported with the fix
        raise TypeError(
            f"{api}: {name} is a callable, so it must be a schedule step -> float, but "
            f"{name}(0) raised {type(e).__name__}: {e}. Pass a number or a schedule such as "
            "optim.cosine_decay_schedule(3e-4, 10_000) (a factory must be called first)."
        ) from None
    ok = _is_number(v) or (isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() == 0)
    if not ok:
        raise TypeError(
            f"{api}: {name} is a callable, so it must be a schedule step -> float, but "
            f"schedule(0) returned {v!r} ({type(v).__name__}). Return a number (or a 0-dim "
            "tensor) from the schedule; a factory such as optim.linear_schedule must be "
            "called first."
        )
    return fn


def learning_rate(api: str, value: Any) -> float | Callable[[int], float]:
    """A learning rate is a number >= 0 or a schedule (a callable ``step -> float``)."""
    if callable(value):
        return schedule(api, "learning_rate", value)
    if not _is_number(value):
        raise TypeError(
            f"{api}: learning_rate must be a float or a schedule (a callable step -> float), "
            f"got {value!r} ({type(value).__name__}). Pass e.g. 3e-4 or "
            "optim.cosine_decay_schedule(3e-4, 10_000)."
        )
    return number(
        api,
        "learning_rate",
        value,
        lo=0.0,
        hint="The optimizer applies the sign (descent); pass a non-negative rate.",
    )


def betas(api: str, **values: Any) -> None:
    for name, v in values.items():
        number(api, name, v, lo=0.0, hi=1.0, hi_open=True, hint=f"Pass e.g. {name}=0.9.")


def non_negative(api: str, **values: Any) -> None:
    for name, v in values.items():
        number(api, name, v, lo=0.0)


def _as_bool(b: Any) -> bool | None:
    if b is True or b is False:
        return b
    if isinstance(b, torch.Tensor) and b.numel() == 1 and b.dtype == torch.bool:
        return bool(b)
    if type(b).__name__ == "bool_":  # numpy.bool_
        return bool(b)
    return None


def check_mask(api: str, mask: Any) -> None:
    """A mask is None, a callable, or a pytree of bools (checked now, naming the path)."""
    if mask is None or callable(mask):
        return
    for path, b in _tree.leaves_with_path(mask):
        if _as_bool(b) is None:
            raise TypeError(
                f"{api}: mask leaf {path} is {b!r} ({type(b).__name__}); a mask is a pytree of "
                "bools like params (True: apply to that leaf) or a callable params -> such a "
                "tree."
            )


def mask_leaves(
    api: str, mask: Any, params: PyTree, params_def: optree.PyTreeSpec | None = None
) -> list[bool]:
    """The mask as one bool per params leaf (``mask`` may be a callable or a prefix tree)."""
    m = mask(params) if callable(mask) else mask
    flat, mdef = optree.tree_flatten(m)
    try:
        if mdef != (params_def or optree.tree_structure(params)):
            flat = optree.broadcast_prefix(m, params)
    except (ValueError, TypeError):
        where = _tree.first_difference(m, params, names=("mask", "params")) or "<root>"
        raise ValueError(
            f"{api}: mask must be a pytree of bools with the structure of params (or a "
            f"prefix of it), or a callable params -> such a tree; mask and params differ at "
            f"{where}."
        ) from None
    out = []
    for i, b in enumerate(flat):
        v = _as_bool(b)
        if v is None:
            path = _tree.leaves_with_path(params)[i][0]
            raise TypeError(
                f"{api}: mask leaf for params {path} is {b!r} ({type(b).__name__}); mask "
                "leaves must be bools (True: apply the transform to that leaf)."
            )
        out.append(v)
    return out
