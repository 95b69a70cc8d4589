"""Gradient accumulation: one step's batch as ``steps`` microbatches, run in sequence.

``fs.accumulate(grad_fn, steps=k)`` is DeepSpeed's ``gradient_accumulation_steps`` as a
function transform. It is a plain sequential loop over microbatches with one float32
gradient buffer, and it is *exact*: the result equals one call on the whole batch, also
when microbatches hold different numbers of valid tokens (token weights, below). Averaging
per-microbatch means instead is the 2024 gradient-accumulation bug: the mean of means is
not the batch mean once the token counts differ.

This module owns ``fs.accumulate`` (the split, the weights and the accumulation loop),
:class:`PerMicrobatch` (the aux list it returns, which ``fs.train_step`` and ``fs.zero``
stack into ``metrics["aux"]``) and :func:`reporting_weights`, through which ``fs.zero``
learns every rank's weights before any microbatch runs.

It also owns the canonical reduction order of the deterministic mode
(``deterministic=True``): :class:`CanonicalSum` (pairwise sums, level by level, of a
sequence of nodes: a binary counter holding at most ``log2(n) + 1`` partial sums) and
:func:`divide_`, the one division by the total weight, both used by ``fs.zero``'s
deterministic reduction too, and :func:`deterministic_sums`, through which
``fs.zero(deterministic=True)`` gets each rank's un-normalised tree sums.

Why a binary counter: for ``n`` leaves it builds one fixed tree in which every aligned
block of ``2**j`` leaves is a complete subtree, combined above by the same rule. So when
``K`` microbatches are split into ``dp`` ranks of ``K/dp`` each (``K/dp`` a power of two),
each rank's own tree is exactly a node of the one-process tree, and combining the ``dp``
nodes with the same rule gives the one-process sum bit for bit. Dividing once at the end
by the total weight (``math.fsum`` of every weight: correctly rounded, so order-free) is
then the same operation in every split.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, overload

import einops
import optree
import torch

from fsharding import _context
from fsharding import tree as _tree

__all__ = [
    "accumulate",
    "PerMicrobatch",
    "reporting_weights",
    "deterministic_sums",
    "Sums",
    "CanonicalSum",
    "divide_",
]

# fs.zero's hook: the outermost accumulate with weights reports them before any microbatch
# runs (so the ranks can weight each other's contributions: the global token mean).
_REPORT = _context.ACCUMULATE_REPORT


@contextlib.contextmanager
def reporting_weights(report: Callable[[list[float]], None]) -> Iterator[None]:
    """Within this block, the outermost ``fs.accumulate`` with ``weights=`` calls
    ``report(weights)`` (one float per microbatch) before it runs any microbatch (used by
    ``fs.zero``; ``report`` may raise). When every weight is 0 it then returns a zero loss
    (on the params' device; ``fs.zero`` gives it the other ranks' dtype and aux) and zero
    grads (params-shaped; ``grad_fn`` is not called) instead of raising: another rank may
    hold the tokens. When the split or the weights fail (a NaN, negative or non-number
    weight, a raising ``weights``), ``report`` gets NaN weights first, so that the other
    ranks raise too, and the error is raised."""
    token = _REPORT.set(report)
    try:
        yield
    finally:
        _REPORT.reset(token)


@dataclasses.dataclass
class Sums:
    """What the outermost ``fs.accumulate(deterministic=True)`` under
    :func:`deterministic_sums` tells ``fs.zero`` about the sums it returned.

    Attributes:
        raw: set by the caller: ``True`` makes ``accumulate`` return its un-normalised tree
            sums ``Σ wᵢ·lossᵢ`` and ``Σ wᵢ·gradsᵢ`` (in the accumulation dtype, float32 or
            wider) instead of dividing; ``False`` only checks that it is deterministic.
        steps: the microbatches it ran (0: no ``accumulate`` ran under the record).
        total: ``math.fsum`` of its weights.
        empty: every weight was 0 (``grad_fn`` never ran; the sums are zeros).
        grad_dtypes: the dtypes of the grads ``grad_fn`` returned, one per leaf (``None``
            when ``empty``): the dtypes to cast the divided sums back to.
        loss_dtype: the dtype of ``grad_fn``'s loss (``None`` when ``empty``).
    """

    raw: bool = True
    steps: int = 0
    total: float = 0.0
    empty: bool = False
    grad_dtypes: list[torch.dtype] | None = None
    loss_dtype: torch.dtype | None = None


_SUMS: contextvars.ContextVar[Sums | None] = contextvars.ContextVar(
    "fsharding_accumulate_sums", default=None
)


@contextlib.contextmanager
def deterministic_sums(*, raw: bool = True) -> Iterator[Sums]:
    """Within this block the outermost ``fs.accumulate`` must be deterministic (else it
    raises a ValueError) and fills the yielded :class:`Sums`; with ``raw=True`` it returns
    its un-normalised canonical tree sums (``fs.zero(deterministic=True)`` combines every
    rank's in the same tree and divides once)."""
    record = Sums(raw=raw)
    token = _SUMS.set(record)
    try:
        yield record
    finally:
        _SUMS.reset(token)


def _add_(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    """``left[j] += right[j]`` (one rounding per element: the same bits as ``a + b``)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, (a, b) in enumerate(zip(left, right, strict=True)):
        groups.setdefault((a.device, a.dtype, b.dtype), []).append(j)
    for idx in groups.values():
        torch._foreach_add_([left[j] for j in idx], [right[j] for j in idx])


def divide_(tensors: list[torch.Tensor], total: float) -> None:
    """``x /= total`` in place for each tensor, one kernel per tensor (the same elementwise
    operation for a whole tensor and for any shard of it, on every device)."""
    for x in tensors:
        x.div_(total)


class CanonicalSum:
    """The sum of a sequence of nodes in one fixed tree: pairwise, level by level.

    ``push`` the nodes in order (each a list of tensors, owned by the sum: they are added
    into in place, or ``None`` for an empty node, which counts for the tree's shape but adds
    nothing); :meth:`result` returns the sum (``None`` if every node was empty). Adjacent
    nodes of equal level are summed as soon as both exist (a binary counter, so at most
    ``log2(n) + 1`` partial sums are held); at the end the partial sums left are folded from
    the right. For ``n = m·2**j`` leaves, the leaves' aligned blocks of ``2**j`` are complete
    subtrees and the ``m`` block sums are combined exactly as ``m`` pushed nodes would be:
    the sum does not depend on how the leaves are grouped into blocks.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, list[torch.Tensor] | None]] = []

    @staticmethod
    def _combine(left: Any, right: Any) -> Any:
        if left is None:
            return right
        if right is not None:
            _add_(left, right)
        return left

    def push(self, node: list[torch.Tensor] | None) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            node = self._combine(left, node)
            level += 1
        self._stack.append((level, node))

    def result(self) -> list[torch.Tensor] | None:
        node = None
        while self._stack:
            _, left = self._stack.pop()
            node = self._combine(left, node)
        return node


class PerMicrobatch(list):
    """The aux list ``fs.accumulate`` returns: one aux per microbatch (``None`` for a
    skipped one). A plain ``list`` subclass, so that ``fs.train_step`` / ``fs.zero`` can tell
    it from an aux that is itself a list and stack it into ``metrics["aux"]``."""


_PyTree = Any
_GradFn = Callable[..., Any]
_Weights = Callable[..., Any]

_API = "fs.accumulate"


@overload
def accumulate(
    grad_fn: _GradFn,
    /,
    *,
    steps: int,
    weights: _Weights | None = None,
    deterministic: bool = False,
) -> _GradFn: ...


@overload
def accumulate(
    grad_fn: None = None,
    /,
    *,
    steps: int,
    weights: _Weights | None = None,
    deterministic: bool = False,
) -> Callable[[_GradFn], _GradFn]: ...


def accumulate(
    grad_fn: _GradFn | None = None,
    /,
    *,
    steps: int,
    weights: _Weights | None = None,
    deterministic: bool = False,
) -> _GradFn | Callable[[_GradFn], _GradFn]:
    """Runs a gradient function over ``steps`` microbatches and combines them exactly.

    Every tensor leaf of every positional argument after the first (params) and of every
    keyword argument is split along dim 0 into ``steps`` equal microbatches
    (``einops.rearrange(x, "(k b) ... -> k b ...")``; microbatch ``i`` holds rows
    ``i*b .. (i+1)*b - 1``); non-tensor leaves go to every microbatch unchanged. The
    microbatches run one after another, so only one microbatch's autograd graph is alive
    at a time (peak saved activations about ``1/steps`` of the full batch). Each one's grads
    are added, scaled by its weight, into one gradient-sized buffer (float32, or the grads'
    dtype if wider: bf16 contributions ``+256, +1, -256`` sum to exactly 1) and freed right
    away. The result is

        ``loss = Σ wᵢ·lossᵢ / Σ wᵢ``,  ``grads = Σ wᵢ·gradsᵢ / Σ wᵢ``

    cast back to the dtypes ``grad_fn`` returned. With equal weights (the default) and a
    ``grad_fn`` that averages over the batch, this equals one call on the whole batch (to
    float32 rounding). **Token-weighted mode:** when each call's loss is
    ``sum(token losses) / count(valid tokens)``, pass ``weights`` returning the microbatch's
    count of valid tokens; the result then equals the whole batch's token mean even when the
    counts differ between microbatches.

    All weights are read (one host sync) before any microbatch runs. A microbatch of weight
    0 is skipped: ``grad_fn`` is not called for it, so an all-padding microbatch (whose own
    token mean would be 0/0) contributes no NaN. If every weight is 0 there is nothing to
    average and a ValueError is raised (drop such batches, e.g. in the data loader). When
    exactly one microbatch has a non-zero weight (always for ``steps=1``), ``grad_fn``'s loss
    and grads are returned unchanged: ``steps=1`` calls ``grad_fn`` once on the unsplit
    arguments and is bitwise ``grad_fn``.

    **Deterministic mode** (``deterministic=True``): the weighted grads and losses
    ``wᵢ·gradsᵢ`` of the microbatches are summed pairwise, level by level, in one fixed tree
    (adjacent pairs, then adjacent pairs of pairs, ...; :class:`CanonicalSum`) and the sum
    is divided once by ``Σ wᵢ`` (``math.fsum``). The result does not depend on how the
    microbatches are grouped: ``fs.accumulate(steps=K, deterministic=True)`` in one process
    and the same ``K`` microbatches split over ``dp`` ranks of ``K/dp`` each under
    ``fs.zero(..., deterministic=True)`` give **bitwise** the same loss and grads (so the
    same params after any number of steps, for an optimizer whose update of an element
    does not depend on where it sits in its tensor: see ``fs.zero``), when
    ``K/dp`` is a power of two (``dp`` need not be); ``fs.zero`` raises otherwise. Within
    one process it also holds for nesting: ``accumulate(accumulate(g, steps=K/dp,
    deterministic=True), steps=dp, deterministic=True)`` equals ``steps=K`` with equal
    weights. The per-microbatch computation must itself not depend on the split, which
    holds for a fixed microbatch size. Cost: up to ``log2(steps) + 1`` partial sums held
    at once instead of one buffer (memory: that many gradient-sized float32 buffers), one
    copy of each microbatch's grads into the accumulation dtype, the same number of
    additions otherwise (GPT tiny, 16 x 64 tokens, steps 2 and 8: no difference in time
    beyond the noise of a shared CPU); ``steps=1`` is still bitwise ``grad_fn``. Unlike
    the default mode, a call with one non-zero weight ``w ≠ 1`` returns ``(w·grads)/w``
    (rounded twice), like every other case.

    Randomness: microbatches run in order on the global RNG stream, so dropout draws differ
    from a whole-batch call (deterministic given the seed); the equivalence above is for
    functions that draw no random numbers.

    Composition: ``accumulate`` only calls ``grad_fn`` in a loop, so it nests inside the
    training step: ``fs.train_step(fs.accumulate(fs.value_and_grad(f), steps=k), opt)``.
    ``fs.zero`` composes with the same loop (``accumulate`` inside ``zero``): at stages 0-2,
    and at stage 3 with ``gather="boundary"``, the full-size accumulated grads are reduced
    once per step; at stage 3 with ``gather="blocks"`` each microbatch's backward
    reduce-scatters its grads block by block, so the buffer holds this rank's shards and no
    full-size gradient exists (params are gathered per microbatch). With ``weights`` under
    ``fs.zero`` the ranks weight each other by their total weights (the global token mean;
    see :func:`reporting_weights`), and a rank whose weights are invalid (or whose
    ``weights`` or split raises) makes every rank raise together, itself with its own
    error. Under fp16 loss scaling each microbatch's grads come back unscaled from
    ``grad_fn``; an overflow in any microbatch makes the accumulated grads non-finite, and
    the step's finite check skips it.

    Args:
        grad_fn: ``grad_fn(params, *args, **kwargs) -> (loss, grads)``, or
            ``((loss, aux), grads)`` (e.g. ``fs.value_and_grad(f, has_aux=True)``; detected
            from the output). ``grads`` must be gradients w.r.t. ``params``, which are not
            split. Omit it to use ``accumulate(steps=k)`` as a decorator.
        steps: number of microbatches, an int >= 1. Every split leaf's dim 0 must be
            divisible by it.
        weights: ``weights(*argsᵢ, **kwargsᵢ) -> number | 0-dim tensor``, called with
            microbatch ``i``'s arguments exactly as ``grad_fn`` gets them after params; a
            finite value >= 0. ``None``: equal weights.
        deterministic: sum the microbatches in the canonical pairwise tree (above), so
            that the result is bitwise the same however the microbatches are split over
            ranks and accumulation steps. Needed inside ``fs.zero(deterministic=True)``.

    Returns:
        ``g(params, *args, loss_scale=None, **kwargs) -> (loss, grads)`` or
        ``((loss, auxes), grads)`` where ``auxes`` is a list (a :class:`PerMicrobatch`) with
        one aux per microbatch (``None`` for a skipped one); ``fs.train_step`` and
        ``fs.zero`` stack it along a new dim 0 into ``metrics["aux"]``. ``loss_scale``, when
        given, is forwarded to every ``grad_fn`` call (which must return unscaled grads, as
        ``fs.value_and_grad`` does).

    Raises:
        TypeError: ``steps`` is not an int, ``weights`` not callable or ``deterministic``
            not a bool (at build time);
            ``grad_fn``'s output or a weight has the wrong type (at call time).
        ValueError: ``steps < 1``; a leaf's dim 0 is not divisible by ``steps`` or it is
            0-dim (the message names the leaf, e.g. ``args[1]['x']`` where ``args[0]`` is
            params, or ``kwargs['mask']``, and its shape); a weight is negative or not
            finite; every weight is 0; ``deterministic=False`` inside
            ``fs.zero(deterministic=True)``.

    Example:
        >>> import torch, fsharding as fs
        >>> loss_fn = lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean()
        >>> params = {"w": torch.ones(3)}
        >>> batch = {"x": torch.arange(24.0).reshape(8, 3), "y": torch.ones(8)}
        >>> loss, grads = fs.accumulate(fs.value_and_grad(loss_fn), steps=4)(params, batch)
        >>> full_loss, full_grads = fs.value_and_grad(loss_fn)(params, batch)
        >>> torch.allclose(loss, full_loss), torch.allclose(grads["w"], full_grads["w"])
        (True, True)
        >>> vg = fs.value_and_grad(loss_fn)
        >>> one = fs.accumulate(vg, steps=4, deterministic=True)(params, batch)
        >>> inner = fs.accumulate(vg, steps=2, deterministic=True)
        >>> two = fs.accumulate(inner, steps=2, deterministic=True)(params, batch)
        >>> torch.equal(one[1]["w"], two[1]["w"])  # bitwise, however the 4 are grouped
        True
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(
            f"{_API}: steps must be an int >= 1 (the number of microbatches), got "
            f"{steps!r} of type {type(steps).__name__}."
        )
    if steps < 1:
        raise ValueError(
            f"{_API}: steps must be >= 1 (the number of microbatches), got {steps}. "
            "Use steps=1 for no accumulation."
        )
    if weights is not None and not callable(weights):
        raise TypeError(
            f"{_API}: weights must be None (equal weights) or a callable "
            f"weights(*args, **kwargs) -> number, got {type(weights).__name__}. For token "
            "weighting pass e.g. weights=lambda batch: batch['mask'].sum()."
        )
    if not isinstance(deterministic, bool):
        raise TypeError(
            f"{_API}: deterministic must be True or False, got {deterministic!r} of type "
            f"{type(deterministic).__name__}."
        )
    if grad_fn is None:
        return functools.partial(
            accumulate, steps=steps, weights=weights, deterministic=deterministic
        )
    if not callable(grad_fn):
        raise TypeError(
            f"{_API}: grad_fn must be callable, e.g. fs.value_and_grad(loss_fn), got "
            f"{type(grad_fn).__name__}."
        )

    @functools.wraps(grad_fn)
    def accumulated(params: _PyTree, *args: Any, loss_scale: Any = None, **kwargs: Any) -> Any:
        report, sums = _REPORT.get(), _SUMS.get()
        if report is None and sums is None:
            return _accumulated(params, args, kwargs, loss_scale, None, None)
        if sums is not None and not deterministic:
            raise ValueError(
                f"{_API}: fs.zero(deterministic=True) got a grad_fn built with "
                f"fs.accumulate(..., steps={steps}, deterministic=False), whose sum order "
                "is sequential and so depends on how the microbatches are split over ranks. "
                "Pass deterministic=True to fs.accumulate too."
            )
        tokens = (_REPORT.set(None), _SUMS.set(None))  # accumulates nested inside: plain
        try:
            return _accumulated(params, args, kwargs, loss_scale, report, sums)
        finally:
            _SUMS.reset(tokens[1])
            _REPORT.reset(tokens[0])

    def _accumulated(
        params: _PyTree, args: tuple, kwargs: dict, loss_scale: Any, report, sums
    ) -> Any:
        extra = {} if loss_scale is None else {"loss_scale": loss_scale}
        if deterministic:
            return _deterministic(params, args, kwargs, extra, report, sums)
        if steps == 1 and weights is None:
            return _unsplit(grad_fn(params, *args, **extra, **kwargs))
        reporting = report is not None and weights is not None
        try:
            micro = _split(args, kwargs, steps)
            ws = _weights(weights, micro, steps, allow_zero=report is not None)
        except Exception:
            if reporting:  # the other ranks wait in fs.zero's report: make them raise too
                with contextlib.suppress(Exception):
                    report([math.nan] * steps)
            raise  # this rank's own error, naming the bad weight or leaf
        if reporting:
            report(list(ws))
        if not any(ws):  # (only with a report: another rank holds the tokens)
            zeros = optree.tree_map(
                lambda x: torch.zeros_like(x) if _tree.is_floating(x) else x, params
            )
            floats = [x for x in optree.tree_leaves(params) if _tree.is_floating(x)]
            dtype = _acc_dtype(floats[0].dtype) if floats else torch.float32
            device = floats[0].device if floats else None
            return torch.zeros((), dtype=dtype, device=device), zeros
        live = [i for i, w in enumerate(ws) if w != 0.0]
        if len(live) == 1:  # Σ wᵢ·xᵢ / Σ wᵢ = x exactly: no rounding through the buffer
            (i,) = live
            out = _unsplit(grad_fn(params, *micro[i][0], **extra, **micro[i][1]))
            if isinstance(out[0], tuple):
                (loss, (aux,)), grads = out
                return (loss, PerMicrobatch(aux if j == i else None for j in range(steps))), grads
            return out
        return _run(grad_fn, params, micro, ws, extra)

    def _deterministic(
        params: _PyTree, args: tuple, kwargs: dict, extra: dict, report, sums: Sums | None
    ) -> Any:
        reporting = report is not None and weights is not None
        try:
            micro = (
                [(args, kwargs)] if steps == 1 and weights is None else _split(args, kwargs, steps)
            )
            ws = _weights(weights, micro, steps, allow_zero=report is not None)
        except Exception:
            if reporting:  # the other ranks wait in fs.zero's report: make them raise too
                with contextlib.suppress(Exception):
                    report([math.nan] * steps)
            raise
        if reporting:
            report(list(ws))
        total = math.fsum(ws)
        if sums is not None:
            sums.steps, sums.total = steps, total
        if not any(ws):  # (only with a report: another rank holds the tokens)
            floats = [x for x in optree.tree_leaves(params) if _tree.is_floating(x)]
            dtype = _acc_dtype(floats[0].dtype) if floats else torch.float32
            device = floats[0].device if floats else None
            acc = sums is not None and sums.raw  # the sums' dtype: what the others send
            zeros = optree.tree_map(
                lambda x: (
                    torch.zeros_like(x, dtype=_acc_dtype(x.dtype) if acc else x.dtype)
                    if _tree.is_floating(x)
                    else x
                ),
                params,
            )
            if sums is not None:
                sums.empty = True
            return torch.zeros((), dtype=dtype, device=device), zeros
        return _run_tree(grad_fn, params, micro, ws, extra, weights is not None, total, sums)

    return accumulated


def _split(
    args: tuple[Any, ...], kwargs: dict[str, Any], steps: int
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """``steps`` (args, kwargs) pairs: each tensor leaf cut along dim 0, others shared."""
    accessors, leaves, treedef = optree.tree_flatten_with_accessor((args, kwargs))
    per_leaf: list[Any] = []
    for accessor, leaf in zip(accessors, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            per_leaf.append(None)
            continue
        if leaf.dim() == 0 or leaf.shape[0] % steps != 0:
            path = _path(accessor)
            why = (
                "it is 0-dim (no dim 0 to split); pass constants through a closure instead"
                if leaf.dim() == 0
                else f"dim 0 (size {leaf.shape[0]}) is not divisible by steps={steps}; use a "
                f"batch size that is a multiple of {steps} (e.g. DataLoader(drop_last=True))"
            )
            raise ValueError(
                f"{_API}: cannot split {path} of shape {tuple(leaf.shape)} into {steps} "
                f"microbatches: {why}."
            )
        per_leaf.append(einops.rearrange(leaf, "(k b) ... -> k b ...", k=steps))
    out = []
    for i in range(steps):
        mb = [leaf if s is None else s[i] for leaf, s in zip(leaves, per_leaf, strict=True)]
        out.append(optree.tree_unflatten(treedef, mb))
    return out


def _path(accessor: optree.PyTreeAccessor) -> str:
    """``args[i]...`` (numbered as in the call, ``args[0]`` is params) or ``kwargs[...]``."""
    first, *rest = list(accessor)
    second, *rest = rest
    tail = optree.PyTreeAccessor(tuple(rest)).codify("")
    if first.entry == 0:
        return f"args[{second.entry + 1}]{tail}"
    return f"kwargs[{second.entry!r}]{tail}"


def _weights(
    weights: _Weights | None,
    micro: list[tuple[tuple[Any, ...], dict[str, Any]]],
    steps: int,
    allow_zero: bool = False,
) -> list[float]:
    """Every microbatch's weight as a float, with at most one host sync per device."""
    if weights is None:
        return [1.0] * steps
    raw = [weights(*a, **kw) for a, kw in micro]
    values: list[Any] = list(raw)
    by_device: dict[torch.device, list[int]] = {}
    for i, w in enumerate(raw):
        if isinstance(w, torch.Tensor):
            if w.dim() != 0 or w.dtype == torch.bool or w.is_complex():
                raise TypeError(
                    f"{_API}: weights returned a {w.dtype} tensor of shape {tuple(w.shape)} "
                    f"for microbatch {i}; return a number or a 0-dim numeric tensor (e.g. "
                    "mask.sum())."
                )
            by_device.setdefault(w.device, []).append(i)
        elif isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(
                f"{_API}: weights returned {w!r} of type {type(w).__name__} for microbatch "
                f"{i}; return a number or a 0-dim tensor (e.g. mask.sum())."
            )
    for idx in by_device.values():
        stacked = torch.stack([raw[i].detach().to(torch.float64) for i in idx])
        for i, v in zip(idx, stacked.tolist(), strict=True):
            values[i] = v
    values = [float(v) for v in values]
    for i, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(
                f"{_API}: weights returned {v} for microbatch {i}; weights must be finite and "
                ">= 0 (e.g. the number of valid tokens; 0 skips the microbatch)."
            )
    if not any(values) and not allow_zero:
        raise ValueError(
            f"{_API}: every microbatch has weight 0 (weights {values}), so there is nothing "
            "to average (Σ wᵢ = 0). Drop batches without valid tokens before the step, or "
            "return a positive weight for at least one microbatch."
        )
    return values


def _unsplit(out: Any) -> tuple[Any, _PyTree]:
    """Validates ``grad_fn``'s output; returns it with any aux wrapped in a 1-element list."""
    if isinstance(out, tuple) and len(out) == 2:
        value, grads = out
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor):
            return (value[0], PerMicrobatch([value[1]])), grads
        if isinstance(value, torch.Tensor):
            return value, grads
    raise TypeError(
        f"{_API}: grad_fn must return (loss, grads) or ((loss, aux), grads) like "
        f"fs.value_and_grad, got {_describe(out)}. Wrap the loss with fs.value_and_grad."
    )


def _describe(out: Any) -> str:
    if isinstance(out, tuple):
        return "a tuple of (" + ", ".join(type(x).__name__ for x in out) + ")"
    return f"a {type(out).__name__}"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _run(
    grad_fn: _GradFn,
    params: _PyTree,
    micro: list[tuple[tuple[Any, ...], dict[str, Any]]],
    ws: list[float],
    extra: dict[str, Any],
) -> Any:
    """The accumulation loop: one buffer, each microbatch's grads freed once added."""
    buf: list[torch.Tensor] | None = None
    grad_dtypes: list[torch.dtype] = []
    treedef = None
    loss_acc: torch.Tensor | None = None
    loss_dtype = None
    auxes = PerMicrobatch([None] * len(micro))
    has_aux = False
    for i, ((args, kwargs), w) in enumerate(zip(micro, ws, strict=True)):
        if w == 0.0:
            continue
        value, grads = _unsplit(grad_fn(params, *args, **extra, **kwargs))
        if isinstance(value, tuple):
            has_aux = True
            value, (auxes[i],) = value
        leaves, tdef = optree.tree_flatten(grads)
        if buf is None:
            treedef = tdef
            _check_tensor_leaves(grads)
            grad_dtypes = [g.dtype for g in leaves]
            buf = [g.detach().to(_acc_dtype(g.dtype), copy=True) for g in leaves]
            if w != 1.0:
                _foreach(torch._foreach_mul_, buf, None, w)
            loss_dtype = value.dtype
            loss_acc = value.detach().to(_acc_dtype(value.dtype)) * w
        else:
            _check_same_treedef(treedef, tdef, grads, i)
            _foreach(torch._foreach_add_, buf, [g.detach() for g in leaves], w)
            loss_acc = loss_acc + value.detach().to(loss_acc.dtype) * w
        del value, grads, leaves  # free this microbatch's grads before the next one runs
    total = math.fsum(ws)
    _foreach(torch._foreach_div_, buf, None, total)
    out = [b if b.dtype == d else b.to(d) for b, d in zip(buf, grad_dtypes, strict=True)]
    loss = (loss_acc / total).to(loss_dtype)
    grads = optree.tree_unflatten(treedef, out)
    return ((loss, auxes), grads) if has_aux else (loss, grads)


def _run_tree(
    grad_fn: _GradFn,
    params: _PyTree,
    micro: list[tuple[tuple[Any, ...], dict[str, Any]]],
    ws: list[float],
    extra: dict[str, Any],
    weighted: bool,
    total: float,
    sums: Sums | None,
) -> Any:
    """The deterministic loop: microbatch ``i``'s ``wᵢ·gradsᵢ`` and ``wᵢ·lossᵢ`` (a product
    rounded once, in the accumulation dtype) are leaf ``i`` of a :class:`CanonicalSum`
    (a skipped microbatch an empty leaf); the tree sum is divided once by ``Σ wᵢ``."""
    tree = CanonicalSum()
    grad_dtypes: list[torch.dtype] = []
    treedef = None
    loss_dtype = None
    auxes = PerMicrobatch([None] * len(micro))
    has_aux = False
    for i, ((args, kwargs), w) in enumerate(zip(micro, ws, strict=True)):
        if w == 0.0:
            tree.push(None)
            continue
        value, grads = _unsplit(grad_fn(params, *args, **extra, **kwargs))
        if isinstance(value, tuple):
            has_aux = True
            value, (auxes[i],) = value
        leaves, tdef = optree.tree_flatten(grads)
        if treedef is None:
            treedef = tdef
            _check_tensor_leaves(grads)
            grad_dtypes = [g.dtype for g in leaves]
            loss_dtype = value.dtype
        else:
            _check_same_treedef(treedef, tdef, grads, i)
        node = [*leaves, value]
        del value, grads, leaves
        if weighted and w != 1.0:
            node = [x.detach().to(_acc_dtype(x.dtype)) * w for x in node]
        else:
            node = [x.detach().to(_acc_dtype(x.dtype), copy=True) for x in node]
        tree.push(node)  # this microbatch's grads are freed here (only the sums remain)
        del node
    out = tree.result()
    assert out is not None and treedef is not None  # (some weight is non-zero)
    *buf, loss = out
    if sums is not None:
        sums.grad_dtypes, sums.loss_dtype = grad_dtypes, loss_dtype
    if sums is None or not sums.raw:
        divide_(out, total)
        buf = [b if b.dtype == d else b.to(d) for b, d in zip(buf, grad_dtypes, strict=True)]
        loss = loss.to(loss_dtype)
    grads = optree.tree_unflatten(treedef, buf)
    return ((loss, auxes), grads) if has_aux else (loss, grads)


def _check_tensor_leaves(grads: _PyTree) -> None:
    """Every leaf of the first microbatch's grads is a tensor (else a TypeError naming it)."""
    bad = [(p, g) for p, g in _tree.leaves_with_path(grads) if not torch.is_tensor(g)]
    if bad:
        raise TypeError(
            f"{_API}: grad_fn returned grads leaf {bad[0][0]} of type "
            f"{type(bad[0][1]).__name__}; every grads leaf must be a tensor."
        )


def _check_same_treedef(treedef: Any, tdef: Any, grads: _PyTree, i: int) -> None:
    """Microbatch ``i``'s grads (``tdef``) have the first microbatch's structure."""
    if tdef != treedef:
        first = optree.tree_unflatten(treedef, [0] * treedef.num_leaves)
        _tree.check_same_structure(
            first,
            grads,
            names=("the first microbatch's grads", f"microbatch {i}'s"),
            api=_API,
        )


def _foreach(op: Callable[..., Any], bufs: list[torch.Tensor], others: Any, scalar: float) -> None:
    """``op`` over ``bufs`` (and ``others``), one fused call per (device, dtype) group."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, b in enumerate(bufs):
        key = (b.device, b.dtype, None if others is None else others[j].dtype)
        groups.setdefault(key, []).append(j)
    for idx in groups.values():
        bs = [bufs[j] for j in idx]
        if others is None:
            op(bs, scalar)
        else:
            op(bs, [others[j] for j in idx], alpha=scalar)
