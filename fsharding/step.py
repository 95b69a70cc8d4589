"""Training steps: ``Step``, ``TrainState``, ``fs.train_step`` and the one update tail.

This module owns what every training step shares, whatever produces its grads:

* the :class:`Step` triple ``(init, step, gather)`` and :class:`TrainState` (optimizer
  state plus a loss scale);
* :func:`train_step`, the one-process step;
* the update tail every step ends with, written once in :func:`update_tail`: the metrics
  (``loss``, ``grad_norm``, ``lr``, ``aux``, ``loss_scale``, ``skipped``), the loss-scale
  skip (a step whose grads are not all finite returns params and optimizer state
  bit-identical and an adjusted scale) and the optimizer update with donation
  (:func:`apply_update`). ``fs.train_step`` and ``fs.zero`` call it with their own grads;
  an SPMD step supplies how every rank agrees on the finite check (``reduce_all``), what
  the optimizer's global decisions reduce over (``within``) and, where its state is stored
  otherwise, how the update runs (``update``);
* the one protocol by which a grad function says that its grads are only a *part* of the
  model's, the other parts held by other ranks (``fs.pipeline``: each rank of the pipeline
  axis holds its own stage's grads): :func:`partition` and :class:`Partition`. A step over
  such a grad function makes the grad norm, ``optim.clip_by_global_norm`` (any
  ``optim.base.sharded_norm`` decision) and the loss-scale finite check global over those
  ranks: ``fs.train_step`` here, ``fs.zero`` over a ``dp x pp`` mesh by composing its own
  data-parallel reductions with the partition's;
* the checks and conversions of a step's arguments (:func:`check_params_arg`,
  :func:`as_loss_scale`, :func:`split_state`, :func:`split_value`,
  :func:`stack_microbatches`).

``fs.zero`` returns the same ``Step`` triple for data-parallel training, so swapping
``fs.train_step`` for ``fs.zero`` changes no other line of a training loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import optree
import torch
import torch.distributed as dist

from fsharding import tree as _tree
from fsharding._compat import settle, use_counts
from fsharding.optim import base as _optim
from fsharding.precision import as_loss_scale as _as_loss_scale
from fsharding.transforms.accumulate import PerMicrobatch

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
    """``loss_scale`` for a training step (``precision.as_loss_scale`` with the methods a
    step calls: ``scale``, ``unscale``, ``adjust``, ``loss_scale``)."""
    return _as_loss_scale(loss_scale, api, ("scale", "unscale", "adjust", "loss_scale"))


def split_state(opt_state: Any, loss_scale: Any, api: str) -> tuple[Any, Any]:
    """``(optimizer state, current loss scale)`` from a step's ``opt_state``: with a loss
    scale (``loss_scale`` not None) it is the ``TrainState`` that ``init`` returned, else
    the optimizer state itself (scale None)."""
    if loss_scale is None:
        return opt_state, None
    if not isinstance(opt_state, TrainState):
        raise TypeError(
            f"{api}: with loss_scale=, opt_state must be the fs.TrainState returned by init, "
            f"got {type(opt_state).__name__}."
        )
    return opt_state.opt, opt_state.loss_scale


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
            ``grad_fn(params, batch, loss_scale=scale)``. Or ``fs.pipeline``'s
            ``f(stage_params, inputs, targets)``: ``batch`` is then ``(inputs, targets)``,
            each rank steps its own stage, and the grad norm, ``optim.clip_by_global_norm``
            (every global decision of the optimizer) and the loss-scale skip are over all
            the stages together, as in the unpipelined step (see :class:`Partition`).
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
    part = partition(grad_fn, "fs.train_step.step")

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
        api = "fs.train_step.step"
        opt, scale = split_state(opt_state, loss_scale, api)
        kw = {"loss_scale": scale} if scale is not None else {}
        if part is None:
            with hidden_pipeline_check(api):
                value, grads = grad_fn(params, batch, **kw)
        else:
            value, grads = part.call(grad_fn, params, batch, **kw)
        loss, aux, has_aux = split_value(value, api)
        _tree.check_same_structure(params, grads, names=("params", "grads"), api=api)
        grad_norm = _optim.global_norm(grads) if part is None else part.global_norm(grads)
        owned = [grads]  # the tail's alone: freed once the optimizer has read them
        del grads
        return update_tail(
            optimizer,
            params,
            opt,
            owned,
            loss=loss,
            grad_norm=grad_norm,
            has_aux=has_aux,
            aux=aux,
            loss_scale=scale,
            donate=donate,
            reduce_all=None if part is None else part.all_min,
            within=None if part is None else part.norms(),
        )

    def gather(params: PyTree) -> PyTree:
        return params

    return Step(init=init, step=step, gather=gather)


# --------------------------------------------------------------------------------------
# the update tail (train_step, zero; a pipeline through either)
# --------------------------------------------------------------------------------------


def update_tail(
    optimizer: _optim.GradientTransformation,
    params: PyTree,
    opt: Any,
    grads: list[Any],
    *,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    has_aux: bool = False,
    aux: Any = None,
    loss_scale: Any = None,
    donate: bool = False,
    reduce_all: Callable[[torch.Tensor], torch.Tensor] | None = None,
    update: Callable[[Any, bool], tuple[PyTree, Any]] | None = None,
    within: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[PyTree, Any, dict[str, Any]]:
    """The end of every training step: metrics, the loss-scale skip, the update.

    Args:
        optimizer: the step's ``optim.GradientTransformation`` (its learning rate is read
            from ``opt``).
        params: the params the step was given (returned as they are by a skipped step).
        opt: the optimizer state the step was given (without the loss scale).
        grads: a one-element list holding the (reduced) grads. The tail takes them out of
            it, so that, when the caller keeps no other reference, the grads are freed as
            soon as the optimizer has read them (before new params are allocated).
        loss: the step's loss metric.
        grad_norm: the global grad norm (before clipping).
        has_aux: whether ``aux`` is a metric (a ``has_aux`` grad function).
        aux: the aux metric.
        loss_scale: the current ``fs.LossScale``, or None (no loss scaling: no skip).
        donate: whether the step may update params and optimizer state in place.
        reduce_all: for a step over several ranks, ``reduce_all(flag) -> flag`` takes a
            0-dim int32 tensor (1: the grads this rank holds are finite) and returns the
            MIN over every rank that holds other grads, so all ranks skip together (as
            ``optim.sharded_norm``'s ``reduce_all``).
        update: ``update(grads, donate) -> (params, opt)`` for a step that stores its
            state otherwise (``fs.zero``: DTensor shards); default :func:`apply_update`.
        within: with the default ``update``, entered around ``optimizer.update`` (see
            :func:`apply_update`): e.g. :meth:`Partition.norms`, so that the optimizer's
            global norm and decisions span every rank holding a part of the grads.

    Returns:
        ``(params, opt_state, metrics)`` as ``Step.step`` returns them: ``opt_state`` is a
        ``TrainState`` with the adjusted scale when ``loss_scale`` is given. Metrics, in
        order: ``loss``, ``grad_norm``, ``aux`` (with ``has_aux``), ``lr`` (when the
        optimizer has one), ``loss_scale`` and ``skipped`` (with a loss scale).
    """
    metrics: dict[str, Any] = {"loss": loss, "grad_norm": grad_norm}
    if has_aux:
        metrics["aux"] = aux
    lr = _optim.learning_rate(optimizer, opt)
    if lr is not None:
        metrics["lr"] = lr
    if loss_scale is not None:
        finite = _tree.all_finite(grads[0])
        if reduce_all is not None:
            finite = reduce_all(finite.to(torch.int32))
        finite = bool(finite)
        new_scale = loss_scale.adjust(finite)
        metrics["loss_scale"] = loss_scale.loss_scale
        metrics["skipped"] = not finite
        if not finite:  # the same tensors back: nothing updated, no schedule count
            return params, TrainState(opt=opt, loss_scale=new_scale), metrics
    if update is None:
        params, opt = apply_update(
            optimizer, grads.pop(), opt, params, donate=donate, within=within
        )
    else:
        params, opt = update(grads.pop(), donate)
    if loss_scale is not None:
        return params, TrainState(opt=opt, loss_scale=new_scale), metrics
    return params, opt, metrics


def apply_update(
    optimizer: _optim.GradientTransformation,
    grads: PyTree,
    opt: Any,
    params: PyTree,
    *,
    donate: bool = False,
    within: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[PyTree, Any]:
    """``(new params, new optimizer state)``: ``optimizer.update`` then the updates added.

    ``donate=True`` is the one in-place path (``optim.donation`` and
    ``optim.apply_updates_``): the old state and params are updated in place, the updates
    may live in the grads' buffers. ``within`` is entered around ``optimizer.update``
    (``fs.zero``: ``optim.sharded_norm``, so decisions over all the grads are global). The
    grads are dropped before the updates are applied: when the caller holds no other
    reference, their memory is free again before new params are allocated.
    """
    donating = _optim.donation() if donate else contextlib.nullcontext()
    with within or contextlib.nullcontext(), donating:
        updates, opt = optimizer.update(grads, opt, params)
    del grads
    if donate:
        return _optim.apply_updates_(params, updates), opt
    return _optim.apply_updates(params, updates), opt


# --------------------------------------------------------------------------------------
# partitioned grad functions (fs.pipeline): grads held in parts by several ranks
# --------------------------------------------------------------------------------------


class Partition:
    """The ranks holding the other parts of a partitioned grad function's grads.

    The protocol: a grad function whose grads are one part of the model's, the others
    held by the ranks along one axis of a mesh, carries the attributes ``mesh`` (an
    ``fs.Mesh``) and ``axis`` (the name of that axis). ``fs.pipeline``'s function does
    (each rank of the pipeline axis holds its own stage's grads; it is called as
    ``grad_fn(params, inputs, targets)``). A step over it then

    * calls it with ``batch = (inputs, targets)`` (:meth:`call`);
    * reports the norm of *all* the parts as ``grad_norm`` (:meth:`global_norm`);
    * runs the optimizer inside :meth:`norms`, so ``optim.clip_by_global_norm`` clips by
      that norm and ``optim.apply_if_finite`` skips on every part together;
    * agrees on the loss-scale finite check over the parts (:meth:`all_min`), so every
      stage skips the same steps.

    A part may hold a *copy* of a leaf that another part holds too (tied weights: every
    owner of ``fs.pipeline(tied=...)``'s weight keeps a copy and gets the summed grad). Such
    a grad function also carries ``copies(grads) -> list[bool]``: for each leaf of its
    grads (``optree.tree_leaves`` order), True where another part counts that leaf; the
    norm then counts it once, as the unpipelined model's one weight.

    Sums over the parts are deterministic: each rank's value is all-gathered and added in
    rank order (the same bits on every rank, whatever the backend's reduction order).

    Attributes:
        group: the process group of the axis (the ranks holding the other parts).
        size: the number of parts (ranks along the axis).
    """

    def __init__(
        self,
        group: Any,
        size: int,
        api: str = "a partitioned grad function",
        copies: Callable[[PyTree], list[bool]] | None = None,
    ):
        self.group, self.size, self.api, self.copies = group, size, api, copies
        self.mask: list[bool] | None = None  # the last grads' copies (see counted)

    def call(self, grad_fn: Callable[..., Any], params: PyTree, batch: Any, **kw: Any) -> Any:
        """``grad_fn(params, inputs, targets, **kw)`` for ``batch = (inputs, targets)``."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            got = f"a {type(batch).__name__}"
            if isinstance(batch, (tuple, list)):
                got += f" of length {len(batch)}"
            raise TypeError(
                f"{self.api}: batch must be (inputs, targets) for a pipeline grad function "
                f"(fs.pipeline's f(params, inputs, targets)), got {got}. Pass e.g. "
                "step.step(params, opt_state, (x, y)); ranks that do not run the first "
                "(last) stage may pass None as inputs (targets)."
            )
        value, grads = grad_fn(params, batch[0], batch[1], **kw)
        if self.copies is not None:
            self.mask = [bool(c) for c in self.copies(grads)]
            if len(self.mask) != len(optree.tree_leaves(grads)):
                raise ValueError(
                    f"{self.api}: the grad function's copies(grads) gave {len(self.mask)} "
                    f"flags for {len(optree.tree_leaves(grads))} grads leaves; it must give "
                    "one per leaf."
                )
        return value, grads

    def counted(self, sq_per_leaf: list[torch.Tensor]) -> list[torch.Tensor]:
        """The per-leaf squared norms this part counts: a copy another part counts is 0."""
        if not self.mask or not any(self.mask):
            return sq_per_leaf
        if len(sq_per_leaf) != len(self.mask):
            raise RuntimeError(
                f"{self.api}: a global norm over {len(sq_per_leaf)} leaves, but the grads "
                f"had {len(self.mask)}; with tied copies the optimizer's global norm must "
                "see grads-shaped trees (put optim.clip_by_global_norm first in the chain)."
            )
        return [torch.zeros_like(s) if c else s for s, c in zip(sq_per_leaf, self.mask)]

    @torch.no_grad()
    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (a 0-dim tensor) summed over the parts in float64, in rank order."""
        mine = x.detach().to(torch.float64).reshape(1)
        if self.size == 1:
            return mine.reshape(())
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        before = use_counts([mine, *parts])
        dist.all_gather(parts, mine, group=self.group)
        settle(before)  # gloo's worker has let go of the tensors (no SIGABRT at exit)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total.reshape(())

    @torch.no_grad()
    def all_min(self, flag: torch.Tensor) -> torch.Tensor:
        """A yes/no flag (0-dim int32, 1: true here) agreed by every part: the MIN."""
        out = flag.detach().to(torch.int32).clone()
        if self.size == 1:
            return out
        before = use_counts([out])
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=self.group)
        settle(before)
        return out

    def sq_reduce(self, sq_per_leaf: list[torch.Tensor]) -> torch.Tensor:
        """The global sum of squares from this part's per-leaf squared norms (the
        ``reduce`` of ``optim.base.sharded_norm``)."""
        if not sq_per_leaf:  # a part without floating grads still takes part in the sum
            return self.sum(torch.zeros((), dtype=torch.float64))
        sq = self.counted(sq_per_leaf)
        return self.sum(torch.stack([s.to(torch.float64) for s in sq]).sum())

    @staticmethod
    def leaf_sq_reduce(positions: list[int], sq: torch.Tensor) -> torch.Tensor:
        """Per-leaf squared norms: a leaf lives whole in one part, so they are local."""
        return sq

    def norms(self) -> contextlib.AbstractContextManager[None]:
        """The ``optim.base.sharded_norm`` block the optimizer runs in: its global norm
        and decisions over all the grads are over every part."""
        return _optim.sharded_norm(self.sq_reduce, self.leaf_sq_reduce, reduce_all=self.all_min)

    @torch.no_grad()
    def global_norm(self, grads: PyTree) -> torch.Tensor:
        """The L2 norm of every part's grads together (float32, or float64 when this
        part has a float64 leaf), the same on every rank."""
        leaves = [x for x in optree.tree_leaves(grads) if _tree.is_floating(x)]
        local = [_tree.local_tensor(x) for x in leaves]
        sq = [n.to(torch.float64).square() for n in torch._foreach_norm(local, 2)] if local else []
        total = self.sq_reduce(sq)
        return total.sqrt().to(self.widest(leaves, total.device))

    def widest(self, leaves: list[torch.Tensor], device: Any = None) -> torch.dtype:
        """float64 when any part has a float64 leaf, else float32: the metric's dtype,
        agreed by every part (a stage without float64 params reports like the others)."""
        has64 = any(x.dtype == torch.float64 for x in leaves)
        if self.size > 1:
            flag = torch.tensor(0 if has64 else 1, dtype=torch.int32, device=device)
            has64 = bool(self.all_min(flag) == 0)
        return torch.float64 if has64 else torch.float32


# The channel from fs.pipeline to the steps (defined here, not in _context: the steps own
# it): inside hidden_pipeline_check a list that every pipeline call over p > 1 ranks
# appends its axis to (pipeline.note_pipeline_ran), elsewhere None.
_PIPELINE_RAN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "fs_pipeline_ran", default=None
)


def note_pipeline_ran(axis: str) -> None:
    """Called by a pipeline over several ranks: a step watching its grad_fn learns of it."""
    seen = _PIPELINE_RAN.get()
    if seen is not None:
        seen.append(axis)


@contextlib.contextmanager
def hidden_pipeline_check(api: str) -> Iterator[None]:
    """Around a grad function without the partition attributes: raises TypeError when a
    pipeline over several ranks ran inside it. Its grads are one stage's, so the step would
    clip and skip per stage (silently wrong); every rank of the pipeline raises."""
    token = _PIPELINE_RAN.set([])
    try:
        yield
        seen = _PIPELINE_RAN.get()
    finally:
        _PIPELINE_RAN.reset(token)
    if seen:
        raise TypeError(
            f"{api}: grad_fn ran an fs.pipeline over the {seen[0]!r} axis but does not carry "
            "its attributes (mesh, axis, copies), e.g. a lambda around it; its grads are this "
            "stage's only, so the grad norm, clipping and skipped steps would be per stage. "
            "Pass the pipeline's function itself (it takes batch = (inputs, targets)), wrap "
            "it with fs.accumulate, or keep its attributes with functools.wraps(pipeline_fn)."
        )


def partition(grad_fn: Any, api: str = "fs.train_step") -> Partition | None:
    """The :class:`Partition` of a partitioned grad function (``fs.pipeline``'s, with its
    ``mesh`` and ``axis`` attributes), or None for any other grad function. On an axis of
    size 1 (every stage in this process) its reductions are the identity."""
    mesh, axis = getattr(grad_fn, "mesh", None), getattr(grad_fn, "axis", None)
    if mesh is None or axis is None or not hasattr(mesh, "group"):
        return None
    size = mesh.shape[axis]
    copies = getattr(grad_fn, "copies", None)
    return Partition(mesh.group(axis) if size > 1 else None, size, api, copies)
