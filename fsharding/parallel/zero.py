"""``fs.zero``: data-parallel training steps with ZeRO stages 0-3.

This module owns the data-parallel step: validating ``fs.zero``'s arguments, ``init``
(materialising meta params, agreeing on rank 0's values, sharding), the step's schedule of
reductions and gathers, token-weighted means over ranks, and ``gather``. The dim-0 layout
and bucketed collectives it runs are ``parallel/_buckets``; the reduction overlapped with
backward is ``parallel/_overlap``; the metrics, loss-scale skip and update it ends with are
``fs.train_step``'s (``step.update_tail``).

The same ``Step(init, step, gather)`` as ``fs.train_step``, data parallel over one mesh
axis (or several: HSDP). Compute runs on plain local tensors with explicit bucketed
collectives; DTensor is used only for what is *stored* sharded (params at stage 3,
optimizer state at stages 1-3), so checkpoints and placements are standard.

Schedule of one step (N ranks on the shard axis; Ψ = parameter bytes; logical bytes per
rank, each figure times (N-1)/N, as ``fs.memory_report`` counts them):

=============  ============================================  ================================
stage          communication                                 held per rank
=============  ============================================  ================================
0 (DDP)        all-reduce grads (2Ψ)                         params, grads, opt state
1              reduce-scatter grads after ``grad_fn``,       params, (grads, opt state) / N;
               all-gather params after the update (2Ψ)       full grads out of ``grad_fn``
2, boundary    reduce-scatter grads after ``grad_fn``,       params, (grads, opt state) / N;
               all-gather params after the update (2Ψ)       full grads out of ``grad_fn``
2, blocks      per ``fs.gather`` block: reduce-scatter in    params, (grads, opt state) / N
               backward; all-gather params after the
               update (2Ψ)
3, boundary    all-gather params before ``grad_fn``,         (params, grads, opt state) / N;
               reduce-scatter grads after it (2Ψ)            full params and grads around
                                                             ``grad_fn``
3, blocks      per ``fs.gather`` block: all-gather in        (params, grads, opt state) / N;
               forward, again in backward under ``remat``    full params of one block at a
               or ``reshard_after_forward``, reduce-scatter  time (two with the backward
               in backward (3Ψ)                              prefetch)
=============  ============================================  ================================

"After ``grad_fn``" is where the reduction ends. On NCCL (not gloo, where it bought no
time) each bucket's collective starts inside backward as soon as its grads exist
(``parallel/_overlap``), whenever the grads ``grad_fn`` returns are exactly those backward
produced (not under ``fs.accumulate`` or a loss scale).

``gather="blocks"``: ``grad_fn`` receives rank-local shards and every use of params goes
through ``fs.gather`` (at stage 2 its forward reads the locally held full params, without
communication). The params that no ``fs.gather`` block owns (embeddings, head) are gathered
once by ``fs.functional``'s apply and kept until backward (not re-gathered).

Hybrid sharding (HSDP): ``axis=("replicate", "shard")`` makes the step data parallel over
both axes and shards over the last one; grads are reduced over the shard axis first (all-
reduce or reduce-scatter) and then all-reduced over the others (their shards: 2Ψ/N more).
The loss, token counts and the fp16 finite check are reduced over every data-parallel axis;
the grad norm sums squares over the shard axis (replicas hold the same shards).

Gradient accumulation nests inside: ``fs.zero(fs.accumulate(fs.value_and_grad(f),
steps=k), ...)``. With ``gather="boundary"`` (and at stages 0/1) ``accumulate`` sums the
k microbatches into a full-size buffer and ``zero`` reduces once per step. Token weights
(``fs.accumulate(..., weights=)``) are global: each rank's grads and loss are scaled by its
share of every rank's total weight before the reduction (a Python float, in place on the
grads ``grad_fn`` returned: no copy, the factor never rounded to bf16), so the result is
the global batch's token mean. A rank whose microbatches all have weight 0 contributes
zeros instead of raising alone, and returns the same metrics as the others (the loss in
their dtype, ``aux`` with NaN rows as for skipped microbatches). A rank whose weights are
invalid (NaN, inf, negative, not numbers, or ``weights`` raised) raises its own error and
every other rank a ValueError, in the same collective (no rank hangs). With
``gather="blocks"`` the weights must be the same on every rank (checked, a ValueError on
every rank). With ``gather="blocks"`` (stages 2/3) each microbatch's backward
reduce-scatters its grads per block into ``accumulate``'s shard-sized buffer (at stage 3
the params are gathered per microbatch too): no full-size gradient ever exists.

Deterministic mode (``deterministic=True``, ``_canonical``): the grads and losses are not
reduced by the backend but summed here in ``fs.accumulate``'s canonical pairwise tree
(``transforms.accumulate.CanonicalSum``) over every rank's un-normalised tree sum (an
all-to-all per bucket gives each rank every rank's rows of its shard) and divided once by
the total weight, so that the params do not depend on the split of the microbatches over
ranks and accumulation steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist

from fsharding import _context
from fsharding import tree as _tree
from fsharding.optim import base as _optim
from fsharding.parallel import _buckets as _lay
from fsharding.parallel import _overlap
from fsharding.parallel import gather as _gather
from fsharding.parallel.collectives import settle, use_counts
from fsharding.step import (
    Step,
    TrainState,
    apply_update,
    as_loss_scale,
    check_params_arg,
    hidden_pipeline_check,
    partition,
    split_state,
    split_value,
    train_step,
    update_tail,
)
from fsharding.transforms import accumulate as _acc

__all__ = ["zero"]

PyTree = Any


def zero(
    grad_fn: Callable[..., tuple[torch.Tensor, PyTree]],
    optimizer: _optim.GradientTransformation,
    *,
    mesh: Any,
    stage: int,
    axis: str | tuple[str, ...] = "dp",
    loss_scale: Any = None,
    gather: str = "boundary",
    deterministic: bool = False,
) -> Step:
    """A data-parallel training step with ZeRO sharding of model state over ``axis``.

    Args:
        grad_fn: ``grad_fn(params, batch) -> (loss, grads)`` or ``((loss, aux), grads)``
            on the rank-local batch (e.g. ``fs.value_and_grad(loss_fn)``, ``has_aux=True``
            for the second form, possibly inside ``fs.accumulate``); every
            rank's batch has the same size. It gets full params, except with
            ``gather="blocks"``.
        optimizer: an ``optim.GradientTransformation``. At stages 1-3 it runs on each rank's
            shards; every decision over all the grads is global: ``optim.clip_by_global_norm``
            sees the global norm, LAMB the norms of whole leaves, and
            ``optim.apply_if_finite`` skips on every rank when any rank's shard is not
            finite (a MIN all-reduce; at stage 0 the all-reduced grads are the same on
            every rank, so every rank already decides the same). A ``mask`` callable
            (``optim.adamw(mask=...)``, ``optim.masked``) sees this rank's shards (plain
            tensors, dim 0 local): decide on paths or ``ndim``, never on sizes, which
            differ between ranks.
        mesh: an ``fs.Mesh``; a local mesh (no process group) gives ``fs.train_step``.
        stage: 0 (grads all-reduced, DDP), 1 (+ optimizer state sharded: grads
            reduce-scattered after ``grad_fn``, each rank updates its rows), 2 (+ grads
            sharded: with ``gather="blocks"`` reduce-scattered during backward, no full-size
            gradient ever), 3 (+ params stored sharded).
        axis: the mesh axis to shard over; a tuple ``("replicate", "shard")`` is hybrid
            sharding: data parallel over all of them (grads, loss and counts reduced over
            each), state sharded over the last. Axes not named (e.g. ``"pp"``, ``"tp"``)
            are not data parallel: nothing is reduced over them.
        loss_scale: an initial ``fs.LossScale`` (fp16), or a number ``s`` meaning
            ``fs.StaticLossScale(s)``; the finite check is all-reduced, so every rank skips
            the same steps.
        gather: ``"boundary"``: ``grad_fn`` gets full params (at stage 3 all-gathered
            before it) and returns full grads, reduced after it. ``"blocks"`` (stages 2
            and 3): ``grad_fn`` gets the rank-local shards (plain tensors) and every use of
            params must go through ``fs.gather`` — ``fs.functional(model, wrap={Block:
            lambda f: fs.remat(fs.gather(f))})`` gathers each block inside its remat region
            and the other params on entry of ``apply``; grads come back as shards,
            reduce-scattered block by block during backward, so at stage 3 full params exist
            for one block at a time and at stages 2/3 no full-size gradient exists.
            ``fs.gather(reshard_after_forward=True)`` gives the same memory without
            recomputing the block (FSDP2's default: backward all-gathers it again).
        deterministic: reduce in a canonical order, so that the params do not depend on
            how a step's microbatches are split over ranks and accumulation steps (see
            *Deterministic mode* below). Needs ``gather="boundary"``, and an
            ``fs.accumulate`` inside ``grad_fn`` must have ``deterministic=True`` too.

    **Deterministic mode** (``deterministic=True``, stages 0-3 and hybrid sharding): with a
    fixed microbatch size and ``K`` microbatches per step, every split ``dp × K/dp`` (one
    process with ``fs.accumulate(steps=K, deterministic=True)``, 2 ranks with ``steps=K/2``,
    ..., ``K`` ranks each one microbatch with no ``accumulate``) gives **bitwise** the same
    loss, grads and so params after any number of steps — DeepSpeed, FSDP2 and JAX have no
    such mode. Microbatch ``i`` of data-parallel rank ``r`` is global microbatch
    ``r·K/dp + i`` (``r`` row-major over ``axis``, the shard axis fastest: the rank for a
    1-D mesh). The grads and losses are summed in one canonical pairwise tree over the
    ``K`` global microbatches (``fs.accumulate``'s, in which each rank's ``K/dp`` form a
    subtree) and divided once by the total weight, so token weights (``fs.accumulate(...,
    weights=)``: ``Σ wᵢ·gᵢ / Σ wᵢ``, ``Σ wᵢ`` an exactly rounded sum of every weight) are
    split-invariant too. Each rank's tree sum is combined with the others' after grad_fn:
    per bucket an all-to-all over the shard axis (each rank receives every rank's rows of
    its own shard: a reduce-scatter's traffic, (N-1)/N·Ψ) summed here in the canonical
    order rather than in the backend's; at stage 0 an all-gather of the summed shards
    follows (an all-reduce's traffic, 2(N-1)/N·Ψ); under HSDP the summed shards are then
    all-gathered over each replicate axis and summed the same way. ``K/dp`` must be a power
    of two (``dp`` need not be; under HSDP also ``K/dp`` times the shard axis size when a
    replicate axis has more than one rank): a ValueError on every rank names ``steps``
    otherwise. The loss-scale finite check, ``clip_by_global_norm`` and the metrics work as
    in the default mode; the overlap with backward is off.

    What stays outside the bitwise claim: at stages 1-3 the optimizer runs on shards, so
    its update must give an element the same bits wherever it sits in a tensor. Elementwise
    ``torch._foreach_*`` transforms do (``optim.chain(optim.scale_by_adam(),
    optim.add_decayed_weights(wd), optim.scale_by_learning_rate(lr))`` is AdamW so);
    ``optim.adam``/``optim.adamw`` on CPU run torch's fused Adam kernel, whose vectorised
    body uses FMA and whose scalar tail does not, so at stages 1-3 their params can differ
    in the last bit between world sizes (stage 0, full tensors, is unaffected). A global
    norm (``clip_by_global_norm``, the ``grad_norm`` metric) at stages 1-3 is summed over
    shards: it matches the one-process value to rounding, so an active clip is exact only
    at stage 0. ``gather="blocks"`` (a ValueError) reduce-scatters inside backward.

    Cost: the grads move as much as in the default mode (plus a 3-number header
    all-gather per step), but in more collectives (stage 0: an all-to-all and an
    all-gather instead of one all-reduce) and without overlap with backward. Measured on
    GPT tiny (470k params), 2 gloo ranks x 1 thread, ``fs.accumulate(steps=2)`` per rank,
    8 x 64 tokens per rank, medians of 16 interleaved steps on a shared CPU: the reduction
    29 vs 11 ms at stage 0, 24 vs 17 ms at stage 3; the step 148 vs 128 ms (stage 0) and
    175 vs 166 ms (stage 3). Memory: the all-to-all receive buffers hold every rank's rows
    of this rank's shard, all buckets' at once (one full float32 gradient, where a
    reduce-scatter receives one shard: ``(N-1)/N`` of a gradient more; at stage 0 the
    shards are then all-gathered into full float32 grads, about two gradients more than an
    in-place all-reduce, transiently), and ``fs.accumulate`` holds up to
    ``log2(K/dp) + 1`` partial sums instead of one buffer (peak RSS per rank 349 vs
    340 MiB at stage 0, 347 vs 346 MiB at stage 3 in the run above).

    Returns:
        ``Step(init, step, gather)``. ``init(params, *, init_fn=None)`` takes full params
        (identical on every rank) or meta-device params with ``init_fn(path, meta) -> full
        leaf`` (called one leaf at a time, so stage 3 never holds a full replica; with
        params from ``fs.functional(model)``, ``model.to("meta")`` after ``init`` frees the
        module's own copy, which ``apply`` never reads); it
        returns params and opt_state with exactly ``fs.train_step(...).init``'s pytree
        structure, sharded leaves being ``DTensor``s on ``mesh[shard axis]`` with placement
        ``Shard(0)`` and the leaf's global shape.

        Replicas agree at ``init`` as under DDP: the params are **broadcast from the first
        data-parallel rank** (rank 0 of the shard axis and of every replicate axis), in
        buckets of at most 24 MiB (a bigger leaf alone, broadcast without a packing copy:
        peak about one bucket or the largest leaf), so ranks that start from other values
        (an unseeded init, or an ``init_fn`` that draws other numbers on every rank) all
        train rank 0's. At stages 0-2 rank 0's values are written into the given params in
        place, non-contiguous ones too (the module's own tensors when they come from
        ``fs.functional``, as DDP writes into the module); at stage 3 (also with
        ``init_fn``, leaf by leaf) each rank keeps its rows of rank 0's full leaf, one
        bucket at a time. Cost: one broadcast of the params.

        ``step`` returns metrics as ``fs.train_step``'s: ``loss`` is the global-batch mean
        loss (a 0-dim tensor, the same on every rank); with a ``has_aux`` grad function
        ``aux`` is **rank-local** — the aux of this rank's batch, not reduced over ranks
        (stacked along a new dim 0 under ``fs.accumulate``); ``all_gather`` it yourself
        where you need every rank's. ``gather(params)`` returns full plain tensors,
        identical on every rank.

    Raises:
        ValueError: bad ``stage``, ``axis`` or ``gather``; at ``init``, an ``init_fn`` leaf of
            the wrong shape; at ``step``, params not in ``init``'s layout, or (with
            ``gather="blocks"``) a ``grad_fn`` that gathers nothing or an ``fs.gather`` with
            another axis. RuntimeError: with ``gather="blocks"``, ``grad_fn`` failed on the
            shards before gathering anything (the message says how to gather). All are
            raised on every rank, before any collective that could hang.

    Example:
        >>> import torch, fsharding as fs
        >>> from fsharding import optim
        >>> mesh = fs.Mesh(dp=1)  # local mesh: one process, no process group
        >>> f = fs.value_and_grad(lambda p, b: (p["w"] * b).sum())
        >>> step = fs.zero(f, optim.sgd(0.1), mesh=mesh, stage=3)
        >>> params, opt_state = step.init({"w": torch.ones(2)})
        >>> params, opt_state, m = step.step(params, opt_state, torch.ones(2))
        >>> params["w"].tolist()
        [0.8999999761581421, 0.8999999761581421]
    """
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"fs.zero: stage must be 0, 1, 2 or 3, got {stage!r}.")
    if gather not in ("boundary", "blocks"):
        raise ValueError(
            f"fs.zero: gather must be 'boundary' or 'blocks', got {gather!r}. 'blocks' "
            "gathers params per fs.gather block (stages 2 and 3)."
        )
    if gather == "blocks" and stage < 2:  # grads are sharded in backward from stage 2
        raise ValueError(
            f"fs.zero: gather='blocks' needs stage 2 or 3 (grads reduce-scattered), got "
            f"stage={stage}; at stages 0/1 grads are all-reduced once per step."
        )
    if not isinstance(deterministic, bool):
        raise TypeError(
            f"fs.zero: deterministic must be True or False, got {deterministic!r} of type "
            f"{type(deterministic).__name__}."
        )
    if deterministic and gather == "blocks":
        raise ValueError(
            "fs.zero: deterministic=True needs gather='boundary': with gather='blocks' each "
            "block's grads are reduce-scattered inside backward, in the backend's order. "
            "Use gather='boundary' (stages 2 and 3 shard the grads and state all the same)."
        )
    loss_scale = as_loss_scale(loss_scale, "fs.zero")
    axes = _dp_axes(mesh, axis)
    dp = math.prod(mesh.shape[a] for a in axes)
    if mesh.device_mesh is None or dp == 1:
        if deterministic:  # the same canonical tree, all of it in this process
            grad_fn = _checked_deterministic(grad_fn)
        local = train_step(grad_fn, optimizer, loss_scale=loss_scale)

        def init_local(params: PyTree, *, init_fn: Callable | None = None) -> tuple:
            check_params_arg(params, "fs.zero.init")
            return local.init(_materialize(params, init_fn))

        return Step(init=init_local, step=local.step, gather=local.gather)
    return _ZeRO(
        grad_fn, optimizer, mesh, axes, stage, loss_scale, gather == "blocks", deterministic
    ).as_step()


def _checked_deterministic(grad_fn: Callable) -> Callable:
    """``grad_fn`` on one process under ``deterministic=True``: an ``fs.accumulate`` in it
    must be deterministic too (as on several ranks), and then returns its result."""

    def checked(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        with _acc.deterministic_sums(raw=False):
            return grad_fn(params, *args, **kwargs)

    return checked


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _dp_axes(mesh: Any, axis: Any) -> tuple[str, ...]:
    """The data-parallel axes (shard axis last), validated against the mesh."""
    names = tuple(getattr(mesh, "axis_names", ()))
    axes = (axis,) if isinstance(axis, str) else axis
    if not isinstance(axes, tuple) or not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(
            f"fs.zero: axis must be a mesh axis name or a tuple of them (replicate axes first, "
            f"the shard axis last), got {axis!r}."
        )
    for a in axes:
        if a not in names:
            raise ValueError(
                f"fs.zero: axis={a!r} is not an axis of the mesh; its axes are {list(names)}. "
                "Pass axis= one of them (e.g. fs.Mesh(dp=2) and axis='dp')."
            )
    if len(set(axes)) != len(axes):
        raise ValueError(f"fs.zero: axis={axis!r} repeats an axis.")
    return axes


def _materialize(params: Any, init_fn: Callable | None) -> Any:
    """``params`` with every meta-device leaf replaced by ``init_fn(path, meta)``."""
    pairs = _tree.leaves_with_path(params)
    return _tree.unflatten(_tree.structure(params), [_init_leaf(p, x, init_fn) for p, x in pairs])


def _init_leaf(path: str, x: Any, init_fn: Callable | None) -> Any:
    """``x``, or for a meta-device leaf ``init_fn(path, x)`` (checked against ``x``)."""
    if not (isinstance(x, torch.Tensor) and x.device.type == "meta"):
        return x
    if init_fn is None:
        raise ValueError(
            f"fs.zero.init: params leaf {path} is on the meta device; pass "
            "init_fn=lambda path, meta: <full tensor> to initialise it leaf by leaf."
        )
    t = init_fn(path, x)
    if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != x.dtype:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
        raise ValueError(
            f"fs.zero.init: init_fn returned {got} for params leaf {path}, whose meta tensor "
            f"is {x.dtype} {tuple(x.shape)}; return a full tensor of that shape and dtype."
        )
    return t


def _observe_grads(grads: list, *, reduced: bool = False) -> None:
    """Tells a ``fs.memory_report`` measuring this step (if any) about the grads."""
    measure = _context.MEMORY_MEASURE.get()
    if measure is not None:
        measure.observe_grads(grads, reduced=reduced)


def _blank_cpu(x: Any) -> Any:
    """An aux leaf of a skipped microbatch (NaN, 0 for integers) like ``x``, on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if _tree.is_floating(x):
            return torch.full(x.shape, math.nan, dtype=x.dtype)
        return torch.zeros(x.shape, dtype=x.dtype)
    if isinstance(x, float):
        return math.nan
    if isinstance(x, int) and not isinstance(x, bool):
        return 0
    return x


def _scale_(g: list, f: float, keep: list) -> list:
    """``g`` times the Python float ``f`` (the product rounded once, the factor never to
    the grads' dtype). In place where a grad is dense memory of its own, as the grads
    ``grad_fn`` returned are (autograd's fresh results, often views of a fresh buffer;
    ``fs.accumulate``'s buffer): no copy. Out of place for expanded or overlapping ones,
    ones sharing memory with another grad or with ``keep`` (the params), or that require
    grad."""
    seen = {_tree.storage_key(x) for x in keep}
    out, groups = list(g), {}
    for i, x in enumerate(g):
        if not _tree.is_floating(x):
            continue
        key = _tree.storage_key(x)
        base = x._base if x._is_view() else None
        if (
            x.is_contiguous()
            and not x.requires_grad
            and not (base is not None and base.requires_grad)
            and not x.is_inference()
            and key is not None
            and key not in seen
        ):
            seen.add(key)
            groups.setdefault((x.device, x.dtype), []).append(x)
        else:
            out[i] = x * f
    for (device, dtype), ts in groups.items():
        # a 0-dim factor tensor: _foreach_mul_ with a Python float rounds it to bf16 on CPU
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        torch._foreach_mul_(ts, torch.tensor(f, dtype=wide, device=device))
    return out


class _ZeRO:
    """The distributed implementation behind :func:`zero` (one instance per Step).

    What the stage shards, named once (stage 2 differs from stage 1 only in allowing
    ``gather="blocks"``, whose grads are sharded during backward too):

    * ``state_sharded`` (stages 1-3): the optimizer state is stored as shards and each rank
      updates only its rows of the params;
    * ``grads_sharded`` (stages 1-3): so the grads are reduce-scattered (each rank keeps the
      rows it updates), not all-reduced, and their norm is summed over the shards;
    * ``params_sharded`` (stage 3): the params are stored as shards (DTensors), gathered
      around ``grad_fn`` or per ``fs.gather`` block; at stages 0-2 they are stored full.
    """

    def __init__(
        self,
        grad_fn: Callable,
        optimizer: _optim.GradientTransformation,
        mesh: Any,
        axes: tuple[str, ...],
        stage: int,
        loss_scale: Any,
        blocks: bool,
        deterministic: bool = False,
    ) -> None:
        # a pipeline's grad fn (fs.pipeline over another axis of the mesh): each rank holds
        # its stage's grads, so the norm and the finite check also span the stages
        self.part = partition(grad_fn, "fs.zero.step")
        weighted = bool(getattr(grad_fn, "weighted", False))  # fs.pipeline(weights=...)
        if self.part is not None:  # called with batch = (inputs, targets)
            grad_fn = functools.partial(self.part.call, grad_fn)
        self.grad_fn, self.opt, self.mesh = grad_fn, optimizer, mesh
        self.deterministic = deterministic
        self.loss_scale, self.blocks = loss_scale, blocks
        self.state_sharded = stage >= 1
        self.grads_sharded = stage >= 1
        self.params_sharded = stage == 3
        self.axes, self.axis = axes, axes[-1]
        self.group = mesh.group(self.axis)
        self.dmesh = mesh[self.axis].device_mesh
        self.rep_groups = [mesh.group(a) for a in axes[:-1] if mesh.shape[a] > 1]
        self.rep_sizes = [mesh.shape[a] for a in axes[:-1] if mesh.shape[a] > 1]
        # every data-parallel group that communicates, shard axis first
        self.dp_groups = ([self.group] if mesh.shape[self.axis] > 1 else []) + self.rep_groups
        self.dp = math.prod(mesh.shape[a] for a in axes)
        if self.part is not None and weighted and deterministic and self.dp > 1:
            # (every rank builds its step alike: raised on every rank, before any collective)
            raise ValueError(
                "fs.zero: deterministic=True with a pipeline grad function built with "
                "fs.pipeline(weights=...) is not supported: the pipeline returns its "
                "replica's weighted mean, not the canonical sums deterministic mode combines. "
                "Use deterministic=False (the global token mean, to rounding) or equal "
                "microbatch weights."
            )
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.treedef = None
        # overlap of the reduction with backward: None to be probed, True on, False off
        self.overlap = None  # decided by _plan (it knows the params' device)
        self.tapped = None
        self.factor = None  # token weights: this step's scale of this rank's grads and loss
        self.det_total: float | None = None  # deterministic: every microbatch's Σ w (fsum)
        self.empty = (False, False)  # token weights: (this rank has none, some rank has none)

    # -- layout -----------------------------------------------------------------------

    def _plan(self, params: PyTree) -> None:
        leaves, treedef = optree.tree_flatten(params)
        self.treedef = treedef
        self.paths = [p for p, _ in _tree.leaves_with_path(params)]
        self.layouts: list[_lay.LeafLayout | None] = []
        k = 0
        for x in leaves:
            if isinstance(x, torch.Tensor) and x.dim() >= 1:
                self.layouts.append(_lay.LeafLayout(k, tuple(x.shape), x.dtype, self.world))
                k += 1
            else:
                self.layouts.append(None)
        self.buckets = _lay.make_buckets([lay for lay in self.layouts if lay is not None])
        self.device = leaves[0].device if leaves else torch.device("cpu")
        self.overlap = None if _overlap.enabled(self.group, self.device) else False
        if self.deterministic:  # the reduction runs after grad_fn, in the canonical order
            self.overlap = False
        self.det_buckets: dict[tuple, list[_lay.Bucket]] = {}

    def _to_dtensor(self, local: torch.Tensor, lay: _lay.LeafLayout) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard  # (seconds to import: on first use)

        full = torch.empty(lay.shape, device="meta")
        return DTensor.from_local(
            local, self.dmesh, [Shard(0)], run_check=False, shape=lay.shape, stride=full.stride()
        )

    def _local(self, x: Any) -> Any:
        # the DTensor's own local tensor (not to_local()'s autograd view): a donated step
        # updates it in place and _dtensors then returns the same DTensor
        return x._local_tensor if _tree.is_dtensor(x) else x

    def _shard_leaves(self, leaves: list) -> list:
        return [
            _lay.shard_rows(x, lay, self.rank) if lay is not None else x
            for x, lay in zip(leaves, self.layouts)
        ]

    def _dtensors(self, local: list, reuse: dict[int, Any] | None = None) -> list:
        """DTensors of rank-local shards; ``reuse`` (id of a local tensor -> the DTensor
        that wraps it) returns the same DTensor where a donated step updated the shard in
        place (``DTensor.from_local`` costs ~0.2 ms a leaf)."""
        out = []
        for x, lay in zip(local, self.layouts):
            old = reuse.get(id(x)) if reuse and lay else None
            if old is not None and old._local_tensor is x:
                out.append(old)
            else:
                out.append(self._to_dtensor(x, lay) if lay else x)
        return out

    @staticmethod
    def _wrappers(tree: Any) -> dict[int, Any]:
        """id of each DTensor leaf's local tensor -> the DTensor (see ``_dtensors``)."""
        return {id(x._local_tensor): x for x in optree.tree_leaves(tree) if _tree.is_dtensor(x)}

    def _wrap_state(self, state: Any, local_params: list, reuse: dict | None = None) -> Any:
        """DTensor-wrap the param-shaped subtrees of an optimizer state built on shards."""

        def is_param_tree(node: Any) -> bool:
            if optree.tree_structure(node) != self.treedef:
                return False
            return all(
                isinstance(a, torch.Tensor) and a.shape == b.shape
                for a, b in zip(optree.tree_leaves(node), local_params)
            )

        def wrap(node: Any) -> Any:
            return self._tree(self._dtensors(optree.tree_leaves(node), reuse))

        return optree.tree_map(
            lambda n: wrap(n) if is_param_tree(n) else n, state, is_leaf=is_param_tree
        )

    def _unwrap_state(self, state: Any) -> Any:
        return optree.tree_map(self._local, state)

    # -- init / gather ----------------------------------------------------------------

    def init(self, params: PyTree, *, init_fn: Callable | None = None) -> tuple[PyTree, Any]:
        check_params_arg(params, "fs.zero.init")
        pairs = _tree.leaves_with_path(params)
        for path, x in pairs:
            if not _tree.is_floating(x):
                raise TypeError(
                    f"fs.zero.init: params leaf {path} is not a floating tensor ({x!r}); keep "
                    "integer or constant values out of params."
                )
        meta = [x.device.type == "meta" for _, x in pairs]
        if any(meta) and init_fn is None:
            _init_leaf(*pairs[meta.index(True)], None)  # raises
        self._plan(params)
        if any(meta):
            self.device = next(
                (x.device for _, x in pairs if x.device.type != "meta"), torch.device("cpu")
            )
        n = len(pairs)
        local: list[Any] = [None] * n
        full: list[Any] = [None] * n
        pending: list[tuple[int, torch.Tensor]] = []  # materialised, not yet broadcast
        size = 0
        for i, (path, x) in enumerate(pairs):
            t = _init_leaf(path, x, init_fn).detach()
            nbytes = t.numel() * t.element_size()
            if pending and size + nbytes > _lay.BUCKET_BYTES:  # flush before it overflows
                self._agree_init(pending, local, full)
                pending, size = [], 0
            pending.append((i, t))
            size += nbytes
            del t
            if size >= _lay.BUCKET_BYTES or i == n - 1:  # (a big leaf goes alone, uncopied)
                self._agree_init(pending, local, full)
                pending, size = [], 0
        if not self.state_sharded:
            params_out = self._tree(full)
            opt = self.opt.init(params_out)
        else:
            opt = self._wrap_state(self.opt.init(self._tree(local)), local)
            params_out = self._tree(self._dtensors(local) if self.params_sharded else full)
        if self.loss_scale is not None:
            return params_out, TrainState(opt=opt, loss_scale=self.loss_scale)
        return params_out, opt

    def _agree_init(self, pending: list, local: list, full: list) -> None:
        """Broadcasts the materialised leaves ``pending`` (``(position, tensor)``) from the
        first data-parallel rank (DDP's init; bucketed by dtype and device, at most
        ``BUCKET_BYTES`` of leaves at a time) and files them into ``local`` / ``full``.

        Stages 0-2 write rank 0's values into the given tensors in place (as DDP writes
        into the module); stage 3 keeps this rank's rows of the broadcast buffer."""
        groups: dict[tuple, list[int]] = {}
        for j, (_, t) in enumerate(pending):
            groups.setdefault((t.dtype, t.device), []).append(j)
        synced: list[Any] = [None] * len(pending)
        src = all(dist.get_rank(g) == 0 for g in self.dp_groups)
        for idx in groups.values():
            ts = [pending[j][1] for j in idx]
            if len(ts) == 1:  # one leaf (a big one): broadcast as is, no packing copy
                flat, direct = self._direct_buffer(ts[0], pending[idx[0]][0], src)
            else:
                flat, direct = torch.cat([t.reshape(-1) for t in ts]), False
            before = use_counts([flat])
            for g in self.dp_groups:  # shard axis, then replicas: all get rank (0, ..., 0)'s
                dist.broadcast(flat, src=dist.get_global_rank(g, 0), group=g)
                settle(before)  # gloo's worker has dropped the work (no SIGABRT at exit)
            off = 0
            for j, t in zip(idx, ts):
                view = flat[off : off + t.numel()].view(t.shape)
                off += t.numel()
                lay = self.layouts[pending[j][0]]
                if self.params_sharded and lay is not None:
                    synced[j] = view  # only its rows are kept (a copy)
                elif src:  # rank 0's own values: left as they are
                    synced[j] = t
                elif direct:  # received straight into t
                    torch.autograd.graph.increment_version(t)
                    synced[j] = t
                else:
                    try:
                        synced[j] = t.copy_(view)  # (copy_ handles any strides)
                    except RuntimeError:  # e.g. an inference-mode tensor
                        synced[j] = view.clone()
            del flat
        for (i, _), t in zip(pending, synced):
            lay = self.layouts[i]
            if self.params_sharded and lay is not None:
                local[i] = _lay.shard_rows(t, lay, self.rank)
            else:
                full[i] = t
                local[i] = _lay.shard_rows(t, lay, self.rank) if lay is not None else t

    def _direct_buffer(self, t: torch.Tensor, i: int, src: bool) -> tuple[torch.Tensor, bool]:
        """The flat buffer to broadcast one leaf ``t`` with, and whether it is ``t``'s own
        memory written in place: rank 0 sends ``t`` itself; the others receive into ``t``
        at stages 0-2 (as a copy_ would write it), into a fresh buffer at stage 3 (the given
        params are not written there) or where ``t`` cannot be written."""
        if src:
            return (t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)), False
        writable = t.is_contiguous() and not t.is_inference() and not t.requires_grad
        if writable and not (self.params_sharded and self.layouts[i] is not None):
            return t.view(-1), True
        return torch.empty(t.numel(), dtype=t.dtype, device=t.device), False

    def _tree(self, leaves: list) -> PyTree:
        return optree.tree_unflatten(self.treedef, leaves)

    def _gather_full(self, local: list) -> list:
        shards = [x for x, lay in zip(local, self.layouts) if lay is not None]
        fulls = _lay.all_gather_buckets(self.buckets, shards, self.group, self.device)
        tracker = _gather.current_tracker()
        if tracker is not None and self.params_sharded:  # (stages 1/2: the params it returns)
            tracker.add(fulls)
        return [fulls[lay.index] if lay is not None else x for x, lay in zip(local, self.layouts)]

    def gather(self, params: PyTree) -> PyTree:
        if not self.params_sharded:
            return optree.tree_map(self._local, params)
        self._check(params, "fs.zero.gather")
        local = [self._local(x) for x in optree.tree_leaves(params)]
        return self._tree(self._gather_full(local))

    # -- step -------------------------------------------------------------------------

    def _check(self, params: PyTree, api: str) -> None:
        if self.treedef is None:
            raise RuntimeError(f"{api}: call init(params) before step.")
        if optree.tree_structure(params) != self.treedef:
            _tree.check_same_structure(
                self._tree([0] * self.treedef.num_leaves),
                params,
                names=("init's params", "params"),
                api=api,
            )
        if not self.params_sharded:
            return
        for path, x, lay in zip(self.paths, optree.tree_leaves(params), self.layouts):
            if lay is not None and tuple(self._local(x).shape) != lay.local_shape(self.rank):
                raise ValueError(
                    f"{api}: params leaf {path} has local shape {tuple(self._local(x).shape)}"
                    f", but stage 3 stores this rank's rows of {lay.shape}: "
                    f"{lay.local_shape(self.rank)}. Pass the params returned by init or step."
                )

    def _weights(self, ws: list[float]) -> None:
        """``fs.accumulate``'s microbatch weights (reported before any microbatch runs).

        Boundary mode: this rank's grads and loss are scaled by ``T·dp / W`` (``T`` its
        total weight, ``W`` every rank's), so the mean over ranks is the global weighted
        mean (the token mean of the global batch), not the mean of the ranks' means.
        ``gather="blocks"`` reduce-scatters each microbatch's grads inside its backward,
        before any per-rank weighting: the weights must then be the same on every rank
        (checked here, on every rank, before any backward).

        A rank whose weights failed (``accumulate`` reports NaN) makes every rank raise
        here, in the same collective: that rank then raises its own error."""
        api = "fs.zero.step"
        bad = not all(math.isfinite(x) and x >= 0 for x in ws)

        def invalid() -> ValueError:
            return ValueError(
                f"{api}: fs.accumulate's weights failed on another rank (not finite numbers "
                ">= 0, or the weights function or the batch split raised there; that rank's "
                "error names it). Every rank stops this step here."
            )

        if self.deterministic:
            return self._det_weights(ws, bad, invalid)
        if self.blocks:
            w = torch.tensor(
                [-1.0] * len(ws) if bad else ws, dtype=torch.float64, device=self.device
            )
            lo, hi = self._psum(w, dist.ReduceOp.MIN), self._psum(w, dist.ReduceOp.MAX)
            if bool((lo < 0).any()):
                raise invalid()
            if not torch.equal(lo, hi):
                raise ValueError(
                    f"{api}: with gather='blocks', fs.accumulate's weights differ between "
                    f"ranks (per microbatch, min {lo.tolist()} and max {hi.tolist()}); each "
                    "microbatch's grads are reduce-scattered during its backward, before "
                    "they could be weighted per rank. Use gather='boundary', or weights that "
                    "are the same on every rank (e.g. equal weights)."
                )
            if not hi.any():
                raise ValueError(
                    f"{api}: every microbatch has weight 0 on every rank (fs.accumulate's "
                    "weights): nothing to average. Drop batches without valid tokens."
                )
            return
        total = math.nan if bad else math.fsum(ws)
        # one all-reduce: [every rank's total weight, how many ranks have none]
        every, empty = self._psum(
            torch.tensor([total, float(total == 0)], dtype=torch.float64, device=self.device)
        ).tolist()
        if not math.isfinite(every):
            raise invalid()
        if not every > 0:
            raise ValueError(
                f"{api}: fs.accumulate's weights are 0 for every microbatch on every rank "
                f"(total {every}): nothing to average. Drop batches without valid tokens."
            )
        self.factor = total * self.dp / every
        self.empty = (total == 0, empty > 0)

    def _agree_empty(self, loss: torch.Tensor, aux: Any, has_aux: bool) -> tuple:
        """On a rank whose microbatches all had weight 0 (``grad_fn`` never ran), the loss
        dtype and the aux of the others: aux leaves of NaN (0 for integers) shaped like
        theirs, as for a skipped microbatch. Every rank takes part (only on such steps)."""
        mine = None
        if not self.empty[0]:
            blank = optree.tree_map(_blank_cpu, aux) if has_aux else None
            mine = (loss.dtype, has_aux, blank)
        for g in self.dp_groups:  # shard axis, then replicas: every rank ends with one
            got: list[Any] = [None] * dist.get_world_size(g)
            dist.all_gather_object(got, mine, group=g)
            mine = next((x for x in got if x is not None), mine)
        if not self.empty[0] or mine is None:
            return loss, aux, has_aux
        dtype, has_aux, blank = mine
        to_dev = lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        aux = optree.tree_map(to_dev, blank) if has_aux else None
        return torch.zeros((), dtype=dtype, device=self.device), aux, has_aux

    def _psum(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """``x`` reduced over every data-parallel rank (a new tensor)."""
        y = x.detach().clone()
        before = use_counts([y])
        for g in self.dp_groups:
            dist.all_reduce(y, op=op, group=g)
            settle(before)  # gloo's worker has dropped the work (no SIGABRT at exit)
        return y

    def _grad_fn(self, local_params: list, batch: Any, kw: dict) -> tuple[Any, Any, list]:
        """``(loss, grads, shards)``; shards: the params passed as rank-local shards."""
        if not self.blocks:
            full = self._gather_full(local_params) if self.params_sharded else local_params
            # an all-reduce overlaps over one group only (no HSDP at stage 0)
            single = self.grads_sharded or self.dp_groups == [self.group]
            self.tapped = None  # (not one a failed step left behind)
            if self.overlap is not False and single and self.world > 1:
                self.tapped = _overlap.Overlap(
                    full,
                    live=bool(self.overlap),
                    group=self.group,
                    agree_groups=self.dp_groups,
                    device=self.device,
                    buckets=self.buckets if self.grads_sharded else None,
                    layouts=self.layouts,
                    divisor=self.dp,
                )
            with _context.tapping(self.tapped.taps if self.tapped else None):
                loss, grads = self.grad_fn(self._tree(full), batch, **kw)
            return loss, grads, None
        shards = local_params if self.params_sharded else self._shard_leaves(local_params)
        layouts = {x.untyped_storage()._cdata: lay for x, lay in zip(shards, self.layouts) if lay}
        s = _gather.Sharding(
            self.axis, self.axes, self.mesh.axis_names, self.group, layouts, self.rank
        )
        if not self.params_sharded:  # full params are held: "gathering" reads them, no comms
            s.fulls = {
                x.untyped_storage()._cdata: f
                for x, f, lay in zip(shards, local_params, self.layouts)
                if lay
            }
        s.tracker = _gather.current_tracker()
        loss, grads = _gather.call_sharded(s, self.grad_fn, self._tree(shards), batch, **kw)
        return loss, grads, shards

    def _reduce(self, g: list) -> list:
        """Grads -> the data-parallel mean: full (stage 0) or this rank's shards (stage 1+:
        each rank updates only its rows, so a reduce-scatter is enough — 2Ψ per step with
        the params' all-gather, as in the ZeRO paper, not an all-reduce's 3Ψ). Started in
        backward where the grad_fn allows (``_overlap``)."""
        ov, self.tapped = self.tapped, None
        pre = ov.finish(g) if ov is not None else None
        if ov is not None:
            self.overlap = ov.agreed  # every rank's verdict: on (probe held) or off for good
        if not self.grads_sharded:
            return pre if pre is not None else _lay.all_reduce_mean(g, self.dp_groups, self.dp)
        idx = [i for i, lay in enumerate(self.layouts) if lay is not None]
        if self.blocks:  # already reduce-scattered (summed) over the shard axis in backward
            for i in idx:
                if g[i].shape != self.layouts[i].local_shape(self.rank):
                    raise ValueError(
                        f"fs.zero(gather='blocks'): the grad of params leaf {self.paths[i]} "
                        f"has shape {tuple(g[i].shape)}, not this rank's shard "
                        f"{self.layouts[i].local_shape(self.rank)}."
                    )
            shards = [g[i] for i in idx]
        else:
            full = [g[i] for i in idx]
            shards = pre or _lay.reduce_scatter_buckets(self.buckets, full, self.group, self.device)
        if self.rep_groups:
            shards = _lay.all_reduce_mean(shards, self.rep_groups, self.dp)
        else:  # nothing to reduce across replicas: divide in place, no flattening copy
            for x in shards:
                x.div_(self.dp)
        rep = [i for i, lay in enumerate(self.layouts) if lay is None]
        reps = _lay.all_reduce_mean([g[i] for i in rep], self.dp_groups, self.dp) if rep else []
        out = list(g)
        for i, x in zip(idx + rep, shards + reps):
            out[i] = x
        return out

    # -- deterministic reduction ------------------------------------------------------

    def _gather_all(self, x: torch.Tensor) -> torch.Tensor:
        """``[dp, *x.shape]``: every data-parallel rank's ``x`` in the canonical order,
        row-major over ``axis`` (the shard axis fastest): for a 1-D mesh, by rank."""
        out = x.detach().unsqueeze(0)
        inner_first = ([self.group] if self.world > 1 else []) + self.rep_groups[::-1]
        for g in inner_first:
            out = _lay.gather_rows(out, g)
            out = out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])
        return out

    def _det_weights(self, ws: list[float], bad: bool, invalid: Callable) -> None:
        """Deterministic mode's weights: every rank learns every microbatch's weight, so
        that ``Σ w`` is ``math.fsum`` of all of them (correctly rounded: the same for every
        split). Two all-gathers (each rank's total and count, then the weights)."""
        api = "fs.zero.step"
        total = math.nan if bad else math.fsum(ws)
        head = torch.tensor([total, float(len(ws))], dtype=torch.float64, device=self.device)
        info = self._gather_all(head).tolist()
        totals, ks = [t for t, _ in info], [int(k) for _, k in info]
        if not all(math.isfinite(t) for t in totals):
            raise invalid()
        if len(set(ks)) > 1:
            raise ValueError(
                f"{api}: fs.accumulate's steps differ between ranks ({ks}, in rank order); "
                "deterministic=True needs the same number of microbatches on every rank."
            )
        if not math.fsum(totals) > 0:
            raise ValueError(
                f"{api}: fs.accumulate's weights are 0 for every microbatch on every rank: "
                "nothing to average. Drop batches without valid tokens."
            )
        mine = torch.tensor(ws, dtype=torch.float64, device=self.device)
        self.det_total = math.fsum(self._gather_all(mine).reshape(-1).tolist())
        self.empty = (total == 0, any(t == 0 for t in totals))

    def _det_plan(self) -> list[_lay.Bucket]:
        """The buckets of the canonical reduction: the sharded leaves in their accumulation
        dtype (float32, or the params' dtype if wider), packed like ``self.buckets``."""
        key = tuple(lay.dtype for lay in self.layouts if lay is not None)
        if key not in self.det_buckets:
            acc = [
                dataclasses.replace(lay, dtype=torch.promote_types(lay.dtype, torch.float32))
                for lay in self.layouts
                if lay is not None
            ]
            self.det_buckets[key] = _lay.make_buckets(acc)
        return self.det_buckets[key]

    def _canonical(
        self, g: list, loss: torch.Tensor, loss_dtype: torch.dtype, sums: Any, local_params: list
    ) -> tuple[list, torch.Tensor]:
        """Deterministic mode: the reduced grads (as ``_reduce``) and the global mean loss,
        summed over every rank's canonical tree sum in the same canonical tree (see
        :class:`fsharding.transforms.accumulate.CanonicalSum`) and divided once by ``Σ w``.

        One all-gather of a 3-number header per rank (its microbatch count, whether it had
        no tokens, its loss sum), then per bucket an all-to-all over the shard axis (each
        rank receives every rank's rows of its own shard: a reduce-scatter's traffic, the
        sum done here in the canonical order, not by the backend), all-gathers of the summed
        shards over the replicate axes (HSDP), and at stage 0 an all-gather of the shards
        (an all-reduce's traffic in all)."""
        api = "fs.zero.step"
        k, empty = (sums.steps or 1), sums.empty or self.empty[0]
        f64 = torch.float64
        head = torch.stack(
            [
                torch.tensor(float(k), dtype=f64, device=self.device),
                torch.tensor(float(empty), dtype=f64, device=self.device),
                loss.detach().to(device=self.device, dtype=f64).reshape(()),
            ]
        )
        heads = self._gather_all(head)
        ks = [int(x) for x in heads[:, 0].tolist()]
        skip = [bool(x) for x in heads[:, 1].tolist()]
        if len(set(ks)) > 1:
            raise ValueError(
                f"{api}: fs.accumulate's steps differ between ranks ({ks}, in rank order); "
                "deterministic=True needs the same number of microbatches on every rank."
            )
        # each block of the global tree below the top must be a complete subtree
        factors = [k] + ([self.world] if self.world > 1 else []) + self.rep_sizes[::-1]
        for j in range(1, len(factors)):
            block = math.prod(factors[:j])
            if not _is_pow2(block):
                raise ValueError(
                    f"{api}: deterministic=True with fs.accumulate(steps={k}) on each of "
                    f"{self.dp} data-parallel ranks (axis sizes, innermost first: "
                    f"{factors[1:]}): the microbatches of "
                    + ("each rank" if j == 1 else "each group of ranks")
                    + f" ({block}) are a subtree of the canonical reduction tree over all "
                    f"{k * self.dp} only when their number is a power of two. Use steps=1, "
                    "2, 4, 8, ... (and power-of-two inner axis sizes under HSDP)."
                )
        total = self.det_total if self.det_total is not None else float(k * self.dp)
        # the loss: every rank's sum (exact in float64), summed in the tree, divided once
        acc_loss = torch.promote_types(loss_dtype, torch.float32)
        tree = _acc.CanonicalSum()
        for v, s in zip(heads[:, 2], skip):
            tree.push(None if s else [v.to(acc_loss).clone()])
        (mean,) = tree.result()
        _acc.divide_([mean], total)
        mean = mean.to(loss_dtype)
        # the grads
        if sums.grad_dtypes is not None and not empty:
            dtypes = list(sums.grad_dtypes)
        elif sums.steps and empty:
            dtypes = [x.dtype for x in local_params]
        else:
            dtypes = [x.dtype for x in g]
        grid = torch.tensor(skip).view(*self.rep_sizes, *([self.world] if self.world > 1 else []))
        idx = [i for i, lay in enumerate(self.layouts) if lay is not None]
        shards = _lay.canonical_reduce_scatter(
            self._det_plan(), [g[i] for i in idx], self.group, self.rep_groups, grid, self.device
        )
        _acc.divide_(shards, total)
        if not self.grads_sharded:  # stage 0: every rank's summed shard, gathered
            shards = (
                _lay.all_gather_buckets(self._det_plan(), shards, self.group, self.device)
                if self.world > 1
                else shards
            )
        out = list(g)
        for i, x in zip(idx, shards):
            out[i] = x if x.dtype == dtypes[i] else x.to(dtypes[i])
        for i, lay in enumerate(self.layouts):
            if lay is None:  # (0-dim leaves) gathered whole, summed in the tree
                acc = torch.promote_types(local_params[i].dtype, torch.float32)
                rows = self._gather_all(g[i].detach().to(acc).reshape(1))
                x = _lay.canonical_rows_sum(rows, skip)
                _acc.divide_([x], total)
                out[i] = x.reshape(()).to(dtypes[i])
        return out, mean

    def step(
        self, params: PyTree, opt_state: Any, batch: Any, *, donate: bool = False
    ) -> tuple[PyTree, Any, dict[str, Any]]:
        api = "fs.zero.step"
        self._check(params, api)
        opt, scale = split_state(opt_state, self.loss_scale, api)
        local_params = [self._local(x) for x in optree.tree_leaves(params)]
        kw = {"loss_scale": scale} if scale is not None else {}
        self.factor, self.empty, self.det_total = None, (False, False), None
        with contextlib.ExitStack() as scope:
            scope.enter_context(_acc.reporting_weights(self._weights))
            if self.part is None:  # a pipeline hidden in grad_fn: refused on every rank
                scope.enter_context(hidden_pipeline_check(api))
            sums = scope.enter_context(_acc.deterministic_sums()) if self.deterministic else None
            value, grads, p_shards = self._grad_fn(local_params, batch, kw)
        loss, aux, has_aux = split_value(value, api)
        _tree.check_same_structure(params, grads, names=("params", "grads"), api=api)
        g = optree.tree_leaves(grads)
        del grads
        loss_dtype = loss.dtype if sums is None or sums.loss_dtype is None else sums.loss_dtype
        if self.empty[1]:  # a rank without tokens: the same loss dtype and metrics as others
            like = torch.zeros((), dtype=loss_dtype) if sums is not None else loss
            like, aux, has_aux = self._agree_empty(like, aux, has_aux)
            loss, loss_dtype = (loss, like.dtype) if sums is not None else (like, like.dtype)
        if self.factor is not None:  # token weights: this rank's share of the global mean
            f, self.factor = self.factor, None
            if f != 1.0:
                g = _scale_(g, f, local_params)
                loss = loss * f
        _observe_grads(g)
        if sums is not None:
            g, mean = self._canonical(g, loss, loss_dtype, sums, local_params)
        else:
            g = self._reduce(g)
        if self.grads_sharded:
            grad_norm = self._sharded_norm(g)
        else:
            grad_norm = _optim.global_norm(g) if self.part is None else self.part.global_norm(g)
        _observe_grads(g, reduced=True)
        if sums is None:
            mean = (self._psum(loss.to(torch.float64)) / self.dp).to(loss.dtype)

        def update(g: list, donate: bool) -> tuple[PyTree, Any]:
            return self._update(g, params, opt, local_params, p_shards, donate)

        return update_tail(
            self.opt,
            params,
            opt,
            [g],
            loss=mean,
            grad_norm=grad_norm,
            has_aux=has_aux,  # aux is rank-local: this rank's batch (not reduced over ranks)
            aux=aux,
            loss_scale=scale,
            donate=donate,
            reduce_all=self._all_min,  # every rank skips a step any rank finds not finite
            update=update,
        )

    def _update(
        self,
        g: list,
        params: PyTree,
        opt: Any,
        local_params: list,
        p_shards: list | None,
        donate: bool,
    ) -> tuple[PyTree, Any]:
        """The optimizer on what this rank updates (``g``: the reduced grads), then the
        params and state stored as ``params`` and ``opt`` are (see :func:`update_tail`).

        With sharded state every rank updates its own shards, so whatever the optimizer
        decides from all the grads (clip_by_global_norm's norm, LAMB's per-leaf norms,
        apply_if_finite's skip) is reduced over the ranks that hold other shards. Stage 0
        needs nothing: after the all-reduce every rank holds bitwise the same grads (a NaN
        anywhere is a NaN everywhere), so every rank decides the same."""
        if p_shards is not None:  # gather="blocks": the shards grad_fn got
            p = p_shards
        elif self.state_sharded and not self.params_sharded:  # rows of the full params
            p = _lay.row_views(local_params, self.layouts, self.rank)
        else:
            p = local_params
        opt_local, within = opt, None
        if self.part is not None:  # stage 0: the norm and decisions over every stage's grads
            within = self.part.norms()
        if self.state_sharded:  # the optimizer runs on the shards' local tensors
            opt_local = self._unwrap_state(opt)
            within = _optim.sharded_norm(
                self._sq_reduce, self._leaf_sq_reduce, reduce_all=self._all_min
            )
        new_p, new_opt = apply_update(
            self.opt, self._tree(g), opt_local, self._tree(p), donate=donate, within=within
        )
        new_p = optree.tree_leaves(new_p)
        if self.params_sharded:
            params_out = self._tree(self._dtensors(new_p, self._wrappers(params)))
        elif self.state_sharded:  # stages 1/2: every rank's updated rows, gathered
            params_out = self._tree(self._gather_full(new_p))
        else:
            params_out = self._tree(new_p)
        if self.state_sharded:
            new_opt = self._wrap_state(new_opt, new_p, self._wrappers(opt))
        return params_out, new_opt

    def _all_min(self, flag: torch.Tensor) -> torch.Tensor:
        """A yes/no flag (0-dim int32) agreed by every data-parallel rank (and every
        pipeline stage): the MIN."""
        flag = self._psum(flag.to(device=self.device, dtype=torch.int32), dist.ReduceOp.MIN)
        return flag if self.part is None else self.part.all_min(flag)

    def _sq_reduce(self, sq_per_leaf: list[torch.Tensor]) -> torch.Tensor:
        if not sq_per_leaf:  # no floating leaves here (a stage without params): still reduce
            sq_per_leaf = [torch.zeros((), dtype=torch.float64, device=self.device)]
        if self.part is None:
            return _lay.sq_reduce(sq_per_leaf, self.layouts, self.group)
        # pipeline stages: a tied copy counted once, then the sum over the stages
        total = _lay.sq_reduce(self.part.counted(sq_per_leaf), self.layouts, self.group)
        return self.part.sum(total)

    def _leaf_sq_reduce(self, positions: list[int], sq: torch.Tensor) -> torch.Tensor:
        return _lay.leaf_sq_reduce(positions, sq, self.layouts, self.group)

    def _sharded_norm(self, g: list) -> torch.Tensor:
        local = [_tree.local_tensor(x) for x in g]
        # one fused pass per dtype (a per-leaf .double().square().sum() cost ~35 ms/step on
        # GPT small); squared in float64 so the cross-rank sum stays exact enough
        sq = [n.double().square() for n in torch._foreach_norm(local, 2)] if local else []
        total = self._sq_reduce(sq)
        if self.part is not None:  # the metric's dtype agreed by every stage
            return total.sqrt().to(self.part.widest(g, total.device))
        return total.sqrt().to(
            torch.float64 if any(x.dtype == torch.float64 for x in g) else torch.float32
        )

    def as_step(self) -> Step:
        return Step(init=self.init, step=self.step, gather=self.gather)
