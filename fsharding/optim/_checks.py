"""Private: the argument checks of ``fsharding.optim``'s constructors, in the house style.

This module owns what a valid hyperparameter is: finite numbers in a range, ints, betas, a
floating dtype, a learning rate (a number >= 0 or a schedule ``step -> number``) and a mask
(a pytree of bools like params, or a callable giving one). Each check runs when the
transform or schedule is built, so a mistake fails there, naming the API, the argument, the
value received and the fix, not mid-training. (The checks of the trees passed to ``init``
and ``update`` live in ``optim._leaves``.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

import optree
import torch

from fsharding import tree as _tree

PyTree = Any
F = TypeVar("F", bound=Callable[..., Any])


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


def schedule_factory(fn: F) -> F:
    """Marks ``fn`` as one of optim's schedule factories (``optim.linear_schedule``, ...):
    :func:`schedule` then names it when it is passed uncalled where a schedule belongs."""
    fn._schedule_factory = True  # type: ignore[attr-defined]
    return fn


def schedule(api: str, name: str, fn: Any) -> Callable[[int], Any]:
    """Checks at construction that ``fn`` is a schedule (``step -> number``): not an
    uncalled factory such as ``optim.cosine_decay_schedule``, and ``fn(0)`` is a real
    number or a 0-dim tensor (so a mistake fails here, not mid-training)."""
    if getattr(fn, "_schedule_factory", False) is True:
        qual = fn.__qualname__
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


def as_bool(b: Any) -> bool | None:
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
        if as_bool(b) is None:
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
        v = as_bool(b)
        if v is None:
            path = _tree.leaves_with_path(params)[i][0]
            raise TypeError(
                f"{api}: mask leaf for params {path} is {b!r} ({type(b).__name__}); mask "
                "leaves must be bools (True: apply the transform to that leaf)."
            )
        out.append(v)
    return out
