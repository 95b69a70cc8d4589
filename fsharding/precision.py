"""Precision: jmp's two halves, a mixed-precision ``Policy`` and the loss scales.

This module owns the dtype vocabulary of fsharding: :class:`Policy` (which dtype params are
stored in, which dtype computation runs in, which dtype outputs come back in), its short
string form and its parsing (jmp's ``"p=f32,c=bf16,o=f32"`` grammar plus shorthands), the
casts a policy applies, and the three loss scales for float16 training
(:class:`NoOpLossScale`, :class:`StaticLossScale`, :class:`DynamicLossScale`). Applying a
policy to a function is ``fs.amp`` (``transforms/amp``); float32 master weights for an
optimizer are ``fs.amp(optimizer)`` (``optim/master_weights``). Both read the policy from
here; this module imports only ``fsharding.tree``.

Loss scaling: float16 has 5 exponent bits, so gradients below ~6e-8 flush to zero.
Multiplying the loss by a large scale before backward lifts them into range; dividing the
gradients by the same scale afterwards restores their values. A dynamic scale searches for
the largest scale that keeps the gradients finite (jmp's rule, torch ``GradScaler``'s
defaults)::

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
    >>> import torch, fsharding as fs
    >>> str(fs.Policy.parse("bf16"))
    'p=f32,c=bf16,o=f32'
    >>> s = fs.DynamicLossScale(loss_scale=8.0, period=2)
    >>> s.scale(torch.tensor(1.0)).item(), s.unscale(torch.tensor(8.0)).item()
    (8.0, 1.0)
    >>> s.adjust(True).adjust(True).loss_scale, s.adjust(False).loss_scale
    (16.0, 4.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, TypeVar, Union

import optree
import torch

from fsharding import tree as _tree

__all__ = [
    "Policy",
    "LossScale",
    "NoOpLossScale",
    "StaticLossScale",
    "DynamicLossScale",
]

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------

# The half-precision dtypes: what the op rule upcasts and master weights shadow.
HALF = (torch.float16, torch.bfloat16)

# dtype -> spellings; the first is the one __str__ writes.
_DTYPE_NAMES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: ("f32", "float32", "full"),
    torch.bfloat16: ("bf16", "bfloat16"),
    torch.float16: ("f16", "float16", "half"),
    torch.float64: ("f64", "float64", "double"),
}
_NAME_TO_DTYPE = {n: dt for dt, names in _DTYPE_NAMES.items() for n in names}
_KEYS = {
    "p": "param_dtype",
    "params": "param_dtype",
    "c": "compute_dtype",
    "compute": "compute_dtype",
    "o": "output_dtype",
    "output": "output_dtype",
}
_SHORTHANDS = {
    "fp32": "p=f32,c=f32,o=f32",
    "bf16": "p=f32,c=bf16,o=f32",
    "fp16": "p=f32,c=f16,o=f32",
    "pure_bf16": "p=bf16,c=bf16,o=bf16",
}


def _parse_dtype(value: Any, where: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return value
    if isinstance(value, str) and value.strip() in _NAME_TO_DTYPE:
        return _NAME_TO_DTYPE[value.strip()]
    raise ValueError(
        f"{where}: unknown dtype {value!r}; use a floating torch.dtype or one of "
        f"{', '.join(sorted(_NAME_TO_DTYPE))}."
    )


def _cast_floating(tree: _T, dtype: torch.dtype) -> _T:
    """Casts floating-point tensor leaves to ``dtype`` (differentiably; others unchanged)."""
    return optree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
        tree,
    )


@dataclasses.dataclass(frozen=True)
class Policy:
    """A mixed-precision policy (jmp's): the dtypes of params, computation and outputs.

    Args:
        param_dtype: the dtype params are stored in.
        compute_dtype: the dtype ``fs.amp`` computes in.
        output_dtype: the dtype ``fs.amp`` returns outputs in.
        Each is a floating ``torch.dtype`` or a name (``"f32"``, ``"bf16"``, ...).

    Raises:
        ValueError: a dtype is not float16, bfloat16, float32 or float64.

    Example:
        >>> import torch, fsharding as fs
        >>> p = fs.Policy.parse("params=float32,compute=bfloat16")
        >>> str(p), fs.Policy.parse("bf16") == fs.Policy(torch.float32, "bf16", "f32")
        ('p=f32,c=bf16,o=bf16', True)
        >>> p.cast_to_compute({"w": torch.ones(2), "i": torch.arange(2)})["w"].dtype
        torch.bfloat16
    """

    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    output_dtype: torch.dtype

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            dt = _parse_dtype(getattr(self, field), f"fs.Policy: {field}")
            object.__setattr__(self, field, dt)

    @classmethod
    def parse(cls, policy: str) -> Policy:
        """Parses jmp's policy grammar (``jmp.get_policy``) or a shorthand.

        ``"params=float32,compute=bfloat16,output=float32"``; keys ``p``/``params``,
        ``c``/``compute``, ``o``/``output``; dtype names ``f32``/``float32``/``full``,
        ``bf16``/``bfloat16``, ``f16``/``float16``/``half``, ``f64``/``float64``/``double``.
        Omitted params are float32, omitted compute follows params, omitted output follows
        compute. A bare dtype name is that dtype for params, compute and output, as in jmp:
        ``"float16"``, ``"half"``, ``"float32"``, ``"full"``, ``"bfloat16"``, ``"f16"``,
        ``"f32"``, ``"float64"``. Shorthands: ``"fp32"`` (all f32), ``"bf16"``
        (p=f32,c=bf16,o=f32), ``"fp16"`` (p=f32,c=f16,o=f32), ``"pure_bf16"`` (all bf16).

        The one difference from jmp: a bare ``"bf16"`` is the shorthand above (float32
        params and outputs, bfloat16 compute: what PyTorch autocast and DeepSpeed users
        mean by bf16), where ``jmp.get_policy("bf16")`` is bfloat16 everywhere; spell that
        ``"bfloat16"`` or ``"pure_bf16"``. (``"half"`` is always float16, torch's ``half``;
        jmp picks bfloat16 on TPU, which torch does not target. ``str`` writes ``f32`` where
        jmp writes ``full``; both parse.)

        Raises:
            ValueError: an unknown key, dtype name or shorthand, or a repeated key; the
                message lists the valid ones.

        Example:
            >>> import fsharding as fs
            >>> str(fs.Policy.parse("c=f16")), str(fs.Policy.parse("float16"))
            ('p=f32,c=f16,o=f16', 'p=f16,c=f16,o=f16')
            >>> str(fs.Policy.parse("bf16")), str(fs.Policy.parse("bfloat16"))
            ('p=f32,c=bf16,o=f32', 'p=bf16,c=bf16,o=bf16')
        """
        if not isinstance(policy, str):
            raise TypeError(f"fs.Policy.parse: policy must be a str, got {policy!r}.")
        text = _SHORTHANDS.get(policy.strip(), policy)
        if "=" not in text:
            if text.strip() in _NAME_TO_DTYPE:  # jmp: a bare dtype name is all three
                dt = _NAME_TO_DTYPE[text.strip()]
                return cls(dt, dt, dt)
            raise ValueError(
                f"fs.Policy.parse: unknown policy {policy!r}; use a shorthand "
                f"({', '.join(repr(s) for s in _SHORTHANDS)}), a dtype name for all three "
                f"({', '.join(repr(n) for n in _NAME_TO_DTYPE if n not in _SHORTHANDS)}) or "
                f"'key=dtype,...' with keys p/params, c/compute, o/output (e.g. "
                f"'p=f32,c=bf16,o=f32')."
            )
        found: dict[str, torch.dtype] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            field = _KEYS.get(key)
            if not sep or field is None:
                raise ValueError(
                    f"fs.Policy.parse: unknown key {key!r} in {policy!r}; valid keys are "
                    f"{', '.join(_KEYS)} (as key=dtype, comma-separated)."
                )
            if field in found:
                raise ValueError(f"fs.Policy.parse: {field} given twice in {policy!r}.")
            found[field] = _parse_dtype(value, f"fs.Policy.parse: {key}= in {policy!r}")
        p = found.get("param_dtype", torch.float32)
        c = found.get("compute_dtype", p)
        return cls(p, c, found.get("output_dtype", c))

    def __str__(self) -> str:
        n = lambda dt: _DTYPE_NAMES[dt][0]  # noqa: E731
        return f"p={n(self.param_dtype)},c={n(self.compute_dtype)},o={n(self.output_dtype)}"

    def cast_to_param(self, tree: _T) -> _T:
        """Casts floating tensor leaves to ``param_dtype``."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: _T) -> _T:
        """Casts floating tensor leaves to ``compute_dtype``."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: _T) -> _T:
        """Casts floating tensor leaves to ``output_dtype``."""
        return _cast_floating(tree, self.output_dtype)

    def with_output_dtype(self, output_dtype: torch.dtype | str) -> Policy:
        """The same policy with another output dtype."""
        return dataclasses.replace(self, output_dtype=output_dtype)


# --------------------------------------------------------------------------------------
# the loss scales
# --------------------------------------------------------------------------------------


def _scale(tree: _T, factor: float) -> _T:
    """Multiplies every floating tensor leaf by ``factor`` (in the leaf's dtype)."""
    return optree.tree_map(lambda x: x * factor if _tree.is_floating(x) else x, tree)


def _unscale(tree: _T, divisor: float) -> _T:
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
        >>> import torch, fsharding as fs
        >>> fs.NoOpLossScale().scale(torch.tensor(3.0)).item()
        3.0
    """

    @property
    def loss_scale(self) -> float:
        return 1.0

    def scale(self, tree: _T) -> _T:
        """Returns ``tree`` unchanged."""
        return tree

    def unscale(self, tree: _T) -> _T:
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
        >>> import torch, fsharding as fs
        >>> s = fs.StaticLossScale(128.0)
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

    def scale(self, tree: _T) -> _T:
        """Multiplies every floating tensor leaf of ``tree`` by ``loss_scale``."""
        return _scale(tree, self.loss_scale)

    def unscale(self, tree: _T) -> _T:
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
        >>> import torch, fsharding as fs
        >>> s = fs.DynamicLossScale()
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

    def scale(self, tree: _T) -> _T:
        """Multiplies every floating tensor leaf of ``tree`` by ``loss_scale``."""
        return _scale(tree, self.loss_scale)

    def unscale(self, tree: _T) -> _T:
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


def as_loss_scale(loss_scale: Any, api: str, needs: tuple[str, ...] = ("scale", "unscale")) -> Any:
    """``loss_scale`` as a ``fs.LossScale``: None stays None, a number is a static scale;
    anything else must have the methods ``needs`` (a gradient function needs ``scale`` and
    ``unscale``; a training step also ``adjust`` and ``loss_scale``), else a TypeError
    naming ``api``."""
    if loss_scale is None:
        return None
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        return StaticLossScale(loss_scale)
    if not all(hasattr(loss_scale, a) for a in needs):
        raise TypeError(
            f"{api}: loss_scale must be None, a number (a static scale, e.g. 1024.0) or an "
            f"fs.LossScale (fs.StaticLossScale(1024.0), fs.DynamicLossScale()), got "
            f"{loss_scale!r} of type {type(loss_scale).__name__}."
        )
    return loss_scale
