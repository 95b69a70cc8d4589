"""Training steps: ``Step(init, step, gather)`` for one process (``train_step``).

A ``Step`` is an immutable triple of pure functions. ``fs.zero`` returns the same triple for
data-parallel training, so swapping ``train_step`` for ``zero`` changes no other line of a
training loop.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import base as _optim

__all__ = ["Step", "TrainState", "train_step", "stack_microbatches"]

PyTree = Any


class TrainState(NamedTuple):
    """Optimizer state plus the loss scale, when a step trains with loss scaling.

    Attributes:
        opt: the optimizer's state.
        loss_scale: the current ``fs.LossScale`` (part of the training state: save it).
    """

    opt: Any
    loss_scale: Any


class Step(NamedTuple):
    """``init(params) -> (params, opt_state)``;
    ``step(params, opt_state, batch, *, donate=False) -> (params, opt_state, metrics)``;
    ``gather(params) -> params`` (full, plain tensors)."""

    init: Callable[[PyTree], tuple[PyTree, Any]]
    step: Callable[..., tuple[PyTree, Any, dict[str, Any]]]
    gather: Callable[[PyTree], PyTree]


def _check_params(params: PyTree, api: str) -> None:
    for path, leaf in _tree.leaves_with_path(params):
        if not _tree.is_floating(leaf):
            what = f"a {leaf.dtype} tensor" if isinstance(leaf, torch.Tensor) else repr(leaf)
            raise TypeError(
                f"{api}: params leaf {path} is {what}; params must be floating-point tensors. "
                "Keep integer or constant values out of params (in the batch or a closure)."
            )


def _is_finite(grads: PyTree) -> bool:
    return bool(_tree.all_finite(grads))


def check_params_arg(params: Any, api: str) -> None:
    """Raises when ``params`` is a module or an iterator of its parameters, not a pytree."""
    what = None
    if isinstance(params, torch.nn.Module):
        what = f"an nn.Module ({type(params).__name__})"
    elif isinstance(params, Iterator) or inspect.isgenerator(params):
        what = f"an iterator ({type(params).__name__}, e.g. model.parameters())"
    if what is not None:
        raise TypeError(
            f"{api}: params is {what}; pass the params pytree of fs.functional: "
            "`apply, params = fs.functional(model)` then `step.init(params)` (grad_fn "
            "differentiates `apply(params, ...)`)."
        ) from None


def as_loss_scale(loss_scale: Any, api: str) -> Any:
    """``loss_scale`` as a ``fs.LossScale``: None stays None, a number is a static scale."""
    if loss_scale is None:
        return None
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        from fsharding.precision import StaticLossScale

        return StaticLossScale(loss_scale)
    if not all(hasattr(loss_scale, a) for a in ("scale", "unscale", "adjust", "loss_scale")):
        raise TypeError(
            f"{api}: loss_scale must be None, a number (a static scale, e.g. 1024.0) or an "
            f"fs.LossScale (fs.StaticLossScale(1024.0), fs.DynamicLossScale()), got "
            f"{loss_scale!r} of type {type(loss_scale).__name__}."
        )
    return loss_scale


def split_value(value: Any, api: str) -> tuple[torch.Tensor, Any, bool]:
    """``(loss, aux, has_aux)`` from a grad function's value: ``loss`` (a tensor or a
    number) or ``(loss, aux)``.

    An aux that ``fs.accumulate`` returned (one per microbatch) is stacked along a new
    dim 0 (see :func:`stack_microbatches`).
    """
    if isinstance(value, torch.Tensor):
        return value, None, False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value)), None, False
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        return value[0], stack_microbatches(value[1]), True
    got = type(value).__name__
    if isinstance(value, tuple):
        got = "a tuple of (" + ", ".join(type(x).__name__ for x in value) + ")"
    raise TypeError(
        f"{api}: grad_fn must return (loss, grads) or ((loss, aux), grads) with a tensor "
        f"loss, as fs.value_and_grad(f) or fs.value_and_grad(f, has_aux=True) does; its "
        f"value was {got}."
    )


def stack_microbatches(aux: Any) -> Any:
    """``fs.accumulate``'s per-microbatch aux list stacked leaf by leaf along a new dim 0.

    Tensor leaves are ``torch.stack``-ed, numbers become a 1-d tensor; a microbatch that
    ``accumulate`` skipped (weight 0, aux ``None``) gives a row of NaN (0 for integer and
    bool leaves). Auxes whose structures or leaf shapes differ between microbatches stay
    the list. Any other aux is returned unchanged.
    """
    from fsharding.transforms.accumulate import PerMicrobatch

    if not isinstance(aux, PerMicrobatch):
        return aux
    entries = [stack_microbatches(a) for a in aux]
    present = [a for a in entries if a is not None]
    if not present:
        return aux
    treedef = optree.tree_structure(present[0], none_is_leaf=True)
    if any(optree.tree_structure(a, none_is_leaf=True) != treedef for a in present):
        return aux
    template = optree.tree_leaves(present[0], none_is_leaf=True)
    rows = [
        optree.tree_leaves(a, none_is_leaf=True) if a is not None else [_blank(x) for x in template]
        for a in entries
    ]
    out = []
    for column in zip(*rows):
        if all(isinstance(x, torch.Tensor) for x in column):
            if len({(x.shape, x.dtype, x.device) for x in column}) != 1:
                return aux
            out.append(torch.stack(column))
        elif all(isinstance(x, (int, float)) for x in column):
            out.append(torch.tensor(column))
        else:
            return aux
    return optree.tree_unflatten(treedef, out)


def _blank(x: Any) -> Any:
    """A skipped microbatch's aux leaf: NaN (0 for integers and bools) like ``x``."""
    if isinstance(x, torch.Tensor):
        return torch.full_like(x, math.nan) if _tree.is_floating(x) else torch.zeros_like(x)
    if isinstance(x, float):
        return math.nan
    if isinstance(x, int):
        return type(x)(0)
    return None


def train_step(
    grad_fn: Callable[..., tuple[torch.Tensor, PyTree]],
    optimizer: _optim.GradientTransformation,
    *,
    loss_scale: Any = None,
) -> Step:
    """A one-process training step from a gradient function and an optimizer.

    Args:
        grad_fn: ``grad_fn(params, batch) -> (loss, grads)`` or ``((loss, aux), grads)``,
            e.g. ``fs.value_and_grad(loss_fn)`` (``has_aux=True`` for the second form),
            possibly wrapped in ``fs.accumulate``. With ``loss_scale`` it is called as
            ``grad_fn(params, batch, loss_scale=scale)``.
        optimizer: an ``optim.GradientTransformation``.
        loss_scale: an initial ``fs.LossScale`` (e.g. ``fs.DynamicLossScale()``) for fp16,
            or a number ``s``, meaning ``fs.StaticLossScale(s)``.
            The opt_state is then ``fs.TrainState(opt=..., loss_scale=...)``; a step whose
            grads are not all finite is skipped: params and ``opt`` come back bit-identical
            (same tensors; the schedule count does not advance) and the scale is adjusted.

    Returns:
        ``Step(init, step, gather)``. ``init(params)`` takes the params pytree (from
        ``fs.functional(model)``, not the module or ``model.parameters()``).
        ``step(params, opt_state, batch, *, donate=False)`` returns
        ``(params, opt_state, metrics)`` with metrics ``loss`` (a 0-dim tensor), ``grad_norm``
        (global, before clipping), ``lr`` (when the optimizer has a learning rate), ``aux``
        (with a ``has_aux`` grad function: its aux; under ``fs.accumulate``, whose aux is a
        list with one per microbatch, the microbatches' auxes stacked leaf by leaf along a
        new dim 0, see :func:`stack_microbatches`) and, with a loss scale, ``loss_scale``
        and ``skipped``.

        ``donate=True`` gives the old params and opt_state up for reuse: they are updated
        in place (no second copy in memory). Note that the params of
        ``apply, params = fs.functional(model)`` (and ``init``'s, which are their detached
        aliases) share storage with the module's own tensors: a donated step therefore also
        updates ``model``'s weights in place. Pass ``{k: v.clone() for k, v in
        params.items()}`` to ``init`` to keep the module untouched.

    Raises:
        TypeError: ``init`` got an ``nn.Module`` or ``model.parameters()``, a non-floating
            params leaf; ``loss_scale`` is neither a number nor a loss scale; ``grad_fn``
            returned no tensor loss.

    Example:
        >>> import torch, fsharding as fs
        >>> from fsharding import optim
        >>> loss_fn = lambda p, b: ((p["w"] * b["x"]).sum() - b["y"]) ** 2
        >>> step = fs.train_step(fs.value_and_grad(loss_fn), optim.sgd(0.1))
        >>> params, opt_state = step.init({"w": torch.zeros(2)})
        >>> batch = {"x": torch.ones(2), "y": torch.tensor(1.0)}
        >>> params, opt_state, metrics = step.step(params, opt_state, batch)
        >>> params["w"].tolist(), float(metrics["loss"])
        ([0.20000000298023224, 0.20000000298023224], 1.0)
    """
    if not isinstance(optimizer, _optim.GradientTransformation):
        raise TypeError(
            f"fs.train_step: optimizer must be an optim.GradientTransformation, got "
            f"{type(optimizer).__name__}; build one with fsharding.optim (e.g. optim.adamw)."
        )
    if not callable(grad_fn):
        raise TypeError(f"fs.train_step: grad_fn must be callable, got {grad_fn!r}.")
    loss_scale = as_loss_scale(loss_scale, "fs.train_step")

    def init(params: PyTree) -> tuple[PyTree, Any]:
        check_params_arg(params, "fs.train_step.init")
        _check_params(params, "fs.train_step.init")
        params = optree.tree_map(lambda p: p.detach(), params)
        opt = optimizer.init(params)
        if loss_scale is None:
            return params, opt
        return params, TrainState(opt=opt, loss_scale=loss_scale)

    def step(
        params: PyTree, opt_state: Any, batch: Any, *, donate: bool = False
    ) -> tuple[PyTree, Any, dict[str, Any]]:
        if loss_scale is not None:
            if not isinstance(opt_state, TrainState):
                raise TypeError(
                    "fs.train_step.step: with loss_scale=, opt_state must be the "
                    f"fs.TrainState returned by init, got {type(opt_state).__name__}."
                )
            opt, scale = opt_state.opt, opt_state.loss_scale
            value, grads = grad_fn(params, batch, loss_scale=scale)
        else:
            opt, scale = opt_state, None
            value, grads = grad_fn(params, batch)
        loss, aux, has_aux = split_value(value, "fs.train_step.step")
        _tree.check_same_structure(
            params, grads, names=("params", "grads"), api="fs.train_step.step"
        )
        metrics: dict[str, Any] = {"loss": loss, "grad_norm": _optim.global_norm(grads)}
        if has_aux:
            metrics["aux"] = aux
        lr = _optim.learning_rate(optimizer, opt)
        if lr is not None:
            metrics["lr"] = lr
        if scale is not None:
            finite = _is_finite(grads)
            new_scale = scale.adjust(finite)
            metrics["loss_scale"] = scale.loss_scale
            metrics["skipped"] = not finite
            if not finite:
                return params, TrainState(opt=opt, loss_scale=new_scale), metrics
        donating = _optim.donation() if donate else contextlib.nullcontext()
        with donating:
            updates, opt = optimizer.update(grads, opt, params)
        del grads
        if donate:
            params = _optim.apply_updates_(params, updates)
        else:
            params = _optim.apply_updates(params, updates)
        if scale is not None:
            return params, TrainState(opt=opt, loss_scale=new_scale), metrics
        return params, opt, metrics

    def gather(params: PyTree) -> PyTree:
        return params

    return Step(init=init, step=step, gather=gather)
