"""Loss scaling for float16 training: jmp's three loss scales on torch tensors.

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by a
large scale before backward lifts them into range; dividing the gradients by the same scale
afterwards restores their values. A dynamic scale searches for the largest scale that keeps
the gradients finite (jmp's rule, torch ``GradScaler``'s defaults)::

    if all_finite(grads):                      # adjust(True)
        counter += 1
        if counter == period:                  # `period` finite steps in a row
            loss_scale *= factor               # (kept if the product is not finite)
            counter = 0
    else:                                      # adjust(False): the step is skipped
        loss_scale = max(min_loss_scale, loss_scale / factor)
        counter = 0

Loss scales are immutable values: ``adjust`` returns a new one. They are NamedTuples, so
they are pytrees (their numbers are the leaves: save them with the training state) and pass
through ``fs.tree`` operations. ``fs.train_step(..., loss_scale=fs.DynamicLossScale())``
does the bookkeeping: it passes the scale to the gradient function, skips a non-finite
step (params and optimizer state come back bit-identical, so a learning-rate schedule's
count does not advance) and adjusts the scale.

Example:
    >>> import torch
    >>> from fsharding.precision import DynamicLossScale
    >>> s = DynamicLossScale(loss_scale=8.0, period=2)
    >>> s.scale(torch.tensor(1.0)).item(), s.unscale(torch.tensor(8.0)).item()
    (8.0, 1.0)
    >>> s.adjust(True).adjust(True).loss_scale, s.adjust(False).loss_scale
    (16.0, 4.0)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar, Union

import optree
import torch

from fsharding import tree as _tree

__all__ = ["LossScale", "NoOpLossScale", "StaticLossScale", "DynamicLossScale"]

T = TypeVar("T")


def _scale(tree: T, factor: float) -> T:
    """Multiplies every floating tensor leaf by ``factor`` (in the leaf's dtype)."""
    return optree.tree_map(lambda x: x * factor if _tree.is_floating(x) else x, tree)


def _unscale(tree: T, divisor: float) -> T:
    """Divides every floating tensor leaf by ``divisor``, in float32 (float64 for float64
    leaves), and casts back to the leaf's dtype."""

    def div(x: Any) -> Any:
        if not _tree.is_floating(x):
            return x
        if x.dtype in (torch.float16, torch.bfloat16):
            return (x.float() / divisor).to(x.dtype)
        return x / divisor

    return optree.tree_map(div, tree)


def _as_bool(grads_finite: Any, api: str) -> bool:
    if isinstance(grads_finite, bool):
        return grads_finite
    if isinstance(grads_finite, torch.Tensor):
        t = _tree.local_tensor(grads_finite)
        if t.dtype == torch.bool and t.numel() == 1:
            return bool(t.item())
    if type(grads_finite).__name__ == "bool_":  # numpy.bool_
        return bool(grads_finite)
    got = (
        f"a {grads_finite.dtype} tensor of shape {tuple(grads_finite.shape)}"
        if isinstance(grads_finite, torch.Tensor)
        else f"{grads_finite!r} ({type(grads_finite).__name__})"
    )
    raise TypeError(
        f"{api}: grads_finite must be a bool or a 0-dim bool tensor, got {got}. Pass "
        "fs.all_finite(grads)."
    )


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(api: str, name: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{api}: {name} must be {want}, got {value!r}.")


class NoOpLossScale(NamedTuple):
    """The loss scale that does nothing (``loss_scale`` is 1): for bfloat16 and float32.

    Example:
        >>> import torch
        >>> from fsharding.precision import NoOpLossScale
        >>> NoOpLossScale().scale(torch.tensor(3.0)).item()
        3.0
    """

    @property
    def loss_scale(self) -> float:
        return 1.0

    def scale(self, tree: T) -> T:
        """Returns ``tree`` unchanged."""
        return tree

    def unscale(self, tree: T) -> T:
        """Returns ``tree`` unchanged."""
        return tree

    def adjust(self, grads_finite: Any) -> NoOpLossScale:
        """Returns ``self`` (``grads_finite`` is checked to be a bool)."""
        _as_bool(grads_finite, "fs.NoOpLossScale.adjust")
        return self


class _StaticFields(NamedTuple):
    loss_scale: float


class StaticLossScale(_StaticFields):
    """Scales the loss by a fixed ``loss_scale`` and the gradients by its inverse.

    Args:
        loss_scale: a positive finite number.

    Example:
        >>> import torch
        >>> from fsharding.precision import StaticLossScale
        >>> s = StaticLossScale(128.0)
        >>> s.scale(torch.tensor(2.0)).item(), s.adjust(False).loss_scale
        (256.0, 128.0)
    """

    __slots__ = ()

    def __new__(cls, loss_scale: float) -> StaticLossScale:
        if _is_number(loss_scale):
            _check(
                "fs.StaticLossScale",
                "loss_scale",
                loss_scale,
                0 < loss_scale < math.inf,
                "a positive finite number",
            )
            loss_scale = float(loss_scale)
        return super().__new__(cls, loss_scale)

    def scale(self, tree: T) -> T:
        """Multiplies every floating tensor leaf of ``tree`` by ``loss_scale``."""
        return _scale(tree, self.loss_scale)

    def unscale(self, tree: T) -> T:
        """Divides every floating tensor leaf of ``tree`` by ``loss_scale`` (float32 math)."""
        return _unscale(tree, self.loss_scale)

    def adjust(self, grads_finite: Any) -> StaticLossScale:
        """Returns ``self``: a static scale never changes."""
        _as_bool(grads_finite, "fs.StaticLossScale.adjust")
        return self


class _DynamicFields(NamedTuple):
    loss_scale: float
    counter: int
    period: int
    factor: float
    min_loss_scale: float


class DynamicLossScale(_DynamicFields):
    """A loss scale that grows while gradients stay finite and shrinks when they do not.

    jmp's rule with torch ``GradScaler``'s initial value and period (see the module
    docstring): ``adjust(False)`` gives ``max(min_loss_scale, loss_scale / factor)`` and
    resets ``counter``; ``adjust(True)`` counts, and the ``period``-th finite step in a row
    multiplies the scale by ``factor`` (unless that overflows) and resets ``counter``.

    The numbers are Python scalars (the scale is host-side control state: the skip decision
    syncs once per step anyway), so ``loss_scale`` goes into metrics and checkpoints as is.

    Args:
        loss_scale: the initial scale, positive and finite (default ``2**16``).
        counter: finite steps in a row so far, ``0 <= counter < period``.
        period: finite steps in a row before the scale grows.
        factor: growth factor; the scale shrinks by ``1 / factor``. Must be > 1.
        min_loss_scale: the scale never shrinks below this (positive, <= ``loss_scale``).

    Raises:
        ValueError: a number is out of range (the message names it).

    Example:
        >>> import torch
        >>> from fsharding.precision import DynamicLossScale
        >>> s = DynamicLossScale()
        >>> s.loss_scale, s.adjust(torch.tensor(False)).loss_scale
        (65536.0, 32768.0)
    """

    __slots__ = ()

    def __new__(
        cls,
        loss_scale: float = 2.0**16,
        counter: int = 0,
        period: int = 2000,
        factor: float = 2,
        min_loss_scale: float = 1.0,
    ) -> DynamicLossScale:
        # Only numbers are checked: a pytree map may rebuild the node with other leaves
        # (specs, tensors); such a value is a container, not a usable scale.
        api = "fs.DynamicLossScale"
        if _is_number(period):
            _check(api, "period", period, isinstance(period, int) and period >= 1, "an int >= 1")
        if _is_number(factor):
            _check(api, "factor", factor, 1 < factor < math.inf, "a finite number > 1")
        if _is_number(min_loss_scale):
            _check(
                api,
                "min_loss_scale",
                min_loss_scale,
                0 < min_loss_scale < math.inf,
                "a positive finite number",
            )
            min_loss_scale = float(min_loss_scale)
        if _is_number(loss_scale):
            _check(
                api,
                "loss_scale",
                loss_scale,
                0 < loss_scale < math.inf,
                "a positive finite number",
            )
            if _is_number(min_loss_scale) and loss_scale < min_loss_scale:
                raise ValueError(
                    f"{api}: loss_scale={loss_scale!r} is below min_loss_scale="
                    f"{min_loss_scale!r}; lower min_loss_scale or raise loss_scale."
                )
            loss_scale = float(loss_scale)
        if _is_number(counter) and _is_number(period):
            _check(
                api,
                "counter",
                counter,
                isinstance(counter, int) and 0 <= counter < period,
                f"an int in [0, period={period})",
            )
        return super().__new__(cls, loss_scale, counter, period, factor, min_loss_scale)

    def scale(self, tree: T) -> T:
        """Multiplies every floating tensor leaf of ``tree`` by ``loss_scale``."""
        return _scale(tree, self.loss_scale)

    def unscale(self, tree: T) -> T:
        """Divides every floating tensor leaf of ``tree`` by ``loss_scale`` (float32 math)."""
        return _unscale(tree, self.loss_scale)

    def adjust(self, grads_finite: Any) -> DynamicLossScale:
        """The next loss scale, given whether this step's gradients were all finite.

        Args:
            grads_finite: a bool or a 0-dim bool tensor (``fs.all_finite(grads)``; a tensor
                costs one device sync).

        Returns:
            A new ``DynamicLossScale``; ``self`` is unchanged.
        """
        if not _as_bool(grads_finite, "fs.DynamicLossScale.adjust"):
            shrunk = max(self.min_loss_scale, self.loss_scale / self.factor)
            return self._replace(loss_scale=float(shrunk), counter=0)
        counter = self.counter + 1
        if counter < self.period:
            return self._replace(counter=counter)
        grown = self.loss_scale * self.factor
        return self._replace(
            loss_scale=float(grown) if math.isfinite(grown) else self.loss_scale, counter=0
        )


LossScale = Union[NoOpLossScale, StaticLossScale, DynamicLossScale]  # noqa: UP007
"""Any of the three loss scales: ``scale``, ``unscale``, ``adjust`` and ``loss_scale``."""
