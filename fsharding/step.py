"""Training steps: ``Step(init, step, gather)`` for one process (``train_step``).

A ``Step`` is an immutable triple of pure functions. ``fs.zero`` returns the same triple for
data-parallel training, so swapping ``train_step`` for ``zero`` changes no other line of a
training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import base as _optim

__all__ = ["Step", "TrainState", "train_step"]

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


def train_step(
    grad_fn: Callable[..., tuple[torch.Tensor, PyTree]],
    optimizer: _optim.GradientTransformation,
    *,
    loss_scale: Any = None,
) -> Step:
    """A one-process training step from a gradient function and an optimizer.

    Args:
        grad_fn: ``grad_fn(params, batch) -> (loss, grads)``, e.g.
            ``fs.value_and_grad(loss_fn)`` possibly wrapped in ``fs.accumulate``. With
            ``loss_scale`` it is called as ``grad_fn(params, batch, loss_scale=scale)``.
        optimizer: an ``optim.GradientTransformation``.
        loss_scale: an initial ``fs.LossScale`` (e.g. ``fs.DynamicLossScale()``) for fp16.
            The opt_state is then ``fs.TrainState(opt=..., loss_scale=...)``; a step whose
            grads are not all finite is skipped: params and ``opt`` come back bit-identical
            (same tensors; the schedule count does not advance) and the scale is adjusted.

    Returns:
        ``Step(init, step, gather)``. ``step(params, opt_state, batch, *, donate=False)``
        returns ``(params, opt_state, metrics)`` with metrics ``loss``, ``grad_norm``
        (global, before clipping), ``lr`` (when the optimizer has a learning rate) and, with
        a loss scale, ``loss_scale`` and ``skipped``. ``donate=True`` gives the old params
        and opt_state up for reuse: they are updated in place (no second copy in memory).

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

    def init(params: PyTree) -> tuple[PyTree, Any]:
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
            loss, grads = grad_fn(params, batch, loss_scale=scale)
        else:
            opt, scale = opt_state, None
            loss, grads = grad_fn(params, batch)
        _tree.check_same_structure(
            params, grads, names=("params", "grads"), api="fs.train_step.step"
        )
        metrics: dict[str, Any] = {"loss": loss, "grad_norm": _optim.global_norm(grads)}
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
