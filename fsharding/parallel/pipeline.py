"""Pipeline parallelism as a transform: ``fs.pipeline`` over functional stages.

``fs.pipeline(stage_fn, loss_fn, mesh=..., microbatches=m)`` splits a model into stages
(``stage_fn(params, x) -> y``, one stage per rank of the ``axis`` of the mesh), splits the
batch into ``m`` microbatches and runs them through the stages on a schedule (GPipe or
1F1B), sending activations forward and their gradients backward between neighbouring ranks.
Every rank gets the loss and the grads of its own stage's params: the values and gradients
of the unpipelined composition, ``fs.accumulate``-style over the microbatches.

Design decision: fsharding runs its own small schedule executor on torch's P2P
(``dist.isend`` / ``dist.irecv`` over the mesh axis's process group) instead of driving
``torch.distributed.pipelining``'s ``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B``
through an ``nn.Module`` adapter. Reasons, read from torch's source (2.13 here, 2.11 on the
GPU machines):

1. *Stage metadata.* torch must know every stage's activation shapes before its first
   step. Without static ``input_args``/``output_args`` it infers them by running the
   stage on data that is not the batch: before 2.13 (``PipelineStage._shape_inference``)
   the module runs on ``torch.zeros_like`` inputs; 2.13's DYNAMIC mode runs the stage's
   forward *and* backward and the loss function on ``torch.empty_strided`` tensors
   (uninitialised: a stage that indexes with a carried integer activation reads garbage).
   Either way every user function runs extra times. Static metadata needs the shapes
   ahead of time, i.e. a probe of our own on our own P2P anyway.
2. *Activations.* torch sends a flat tuple of tensors, and before 2.13 it calls
   ``requires_grad_(True)`` on every receive buffer (an integer activation such as an
   attention mask raises); pytree activations need our flatten, our treedef exchange and
   our checks anyway.
3. *Gradients.* torch's stages ``torch.autograd.backward`` into ``.grad`` of the module's
   ``nn.Parameter`` s (in the param dtype) and scale by ``1/m`` afterwards (``scale_grads``);
   fsharding's grads are returned values (``torch.autograd.grad`` on fresh aliases, as
   ``fs.value_and_grad``), accumulated in float32 or wider, with ``fs.accumulate``'s token
   weights ``Σ wᵢ·lossᵢ / Σ wᵢ`` and a loss scale.
4. *Versions.* The schedule and stage internals an adapter would lean on differ between
   the two torch versions fsharding runs on (2.13's warm-up vote protocol, ``InferenceMode``,
   ``loss_kwargs``/``return_outputs`` in ``_step_microbatches``).

What torch's schedules add beyond that adapter is the loop itself: for GPipe, 1F1B and
interleaved 1F1B a list of ``F``/``B`` actions per rank (:func:`_actions`), executed here
by :class:`_Runner` with asynchronous sends and receives waited where they are used, so
any dependency-valid order runs without deadlock (messages are matched by tag; NCCL
ignores tags, but between any two ranks these schedules also receive in the order they
send: the tests' ``fifo`` check; untested on NCCL so far). The zero-bubble schedule splits
the backward into input gradients (``B``) and weight gradients (``W``) with the algorithm
of torch's ``pipelining._backward.stage_backward_input`` / ``stage_backward_weight``,
written here (:func:`_backward_input`): torch's writes ``.grad`` and (2.13, checked) gives
no gradient to a weight whose path to the outputs meets no input's (e.g. an output
``params["b"] * 2``); the order is built by simulating ZB-H1's greedy rule
(:func:`_zero_bubble`).

Protocol. The first call (and any call whose local signature changed on some rank: params,
or the first stage's inputs, or the last stage's targets of other shapes) runs a *probe*:
microbatch 0 goes through the stages one after another under ``no_grad`` (RNG state
restored afterwards), each rank sending the next its activations' structure, shapes and
dtypes, or an error marker. Every rank's error (a batch not divisible into microbatches,
a bad weight, a stage function that raises, e.g. on params of the wrong structure) is then
all-gathered and raised on every rank, so bad input never hangs. Later calls exchange one
int per rank (an all-reduce) to learn that nothing changed, and use the cached shapes.

Failures after the probe. Every schedule message (activations, their gradients) starts
with a 16-byte header ``[status, rank]``. A rank whose action raises (a stage function on
microbatch 3, activations whose shape differs from the probe's, a weight-gradient action)
stops and sends, in place of every message it still owes in its action list, the header
with status 1 and zeros of the expected shapes; a rank that receives one stops as well and
does the same, so stop markers travel along the dependencies both ways and no rank waits
forever on a receive. Every call ends with one all-reduce of ``[failed, loss]`` (the loss
from the last stage, exact in float64): the sends are waited only when no rank failed;
otherwise every rank all-gathers who raised what and raises the first failure in stage
order (stage, rank, microbatch, message; the rank that raised chains its traceback), and
the group moves to a new generation of message tags, so the failed call's unreceived
messages and pending sends never match a later call's. A rank that crashes outright
surfaces as the backend's connection error on its peers (gloo: "Connection closed by
peer"), within the process group's timeout. On gloo this is tested on 2 and 4 ranks. On
NCCL (untested here): tags are ignored and messages between two ranks match in issue order;
stop markers keep that order (they replace messages in schedule order), so the error is
raised on every rank too, but after a failed call the unreceived messages would match the
next call's in order, so that pipeline refuses further calls (restart the process group).

``fs.memory_report`` of a step over a pipeline gets, per stage, its saved-activation peak,
the received activations it held and its point-to-point bytes, through the measurement in
force as ``_context.MEMORY_MEASURE`` (``enter_stage`` around each action, ``observe_stage``
after the call).
"""

from __future__ import annotations

import builtins
import collections
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import optree
import torch
import torch.distributed as dist

from fsharding import _compat, _context
from fsharding import tree as _tree
from fsharding.parallel.mesh import Mesh
from fsharding.precision import as_loss_scale
from fsharding.step import note_pipeline_ran

__all__ = ["pipeline"]

_API = "fs.pipeline"
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")

PyTree = Any
StageFn = Callable[[PyTree, PyTree], PyTree]


def pipeline(
    stage_fn: StageFn | Sequence[StageFn],
    loss_fn: Callable[[PyTree, PyTree], torch.Tensor],
    /,
    *,
    mesh: Mesh,
    axis: str = "pp",
    microbatches: int,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    weights: Callable[[PyTree, PyTree], Any] | None = None,
    tied: Mapping[str, Any] | None = None,
) -> Callable[..., tuple[torch.Tensor, PyTree]]:
    """Pipeline parallelism: stages on the ranks of a mesh axis, microbatches on a schedule.

    Stage ``s`` (of ``n = mesh.shape[axis] * virtual_stages``) runs on the rank with index
    ``s`` along ``axis``. The batch (``inputs``, read by stage 0, and ``targets``, read by
    the last stage's ``loss_fn``) is split along dim 0 into ``microbatches`` equal parts,
    like ``fs.accumulate``'s split; each microbatch flows forward through the stages
    (activations: any pytree of tensors, sent to the next rank) and its gradient flows
    back. The result equals ``fs.accumulate(fs.value_and_grad(composition),
    steps=microbatches, weights=weights)`` of the unpipelined composition
    ``loss_fn(stage_{n-1}(... stage_0(params_0, inputs)), targets)``: the loss
    ``Σ wᵢ·lossᵢ / Σ wᵢ`` (equal weights by default) on every rank, and on each rank the
    grads of its own stage's params.

    Schedules (``p`` ranks, ``m`` microbatches): ``"gpipe"`` runs every forward, then every
    backward (each stage holds the saved activations of all ``m`` microbatches; with
    ``virtual_stages > 1`` each local stage in turn, torch's LoopedBFS); ``"1f1b"``
    (default) starts the backward of microbatch ``i`` as soon as it reaches the last stage
    and alternates one forward, one backward (stage ``s`` holds at most ``p - s``
    microbatches' activations). Both have the bubble ``(p-1)/(m+p-1)``.
    ``"interleaved_1f1b"`` (Megatron-LM's) gives each rank ``v = virtual_stages`` stages
    (rank ``r`` runs stages ``r, r+p, ...``; ``m`` a multiple of ``p``): the bubble shrinks
    to ``(p-1)/(v·m+p-1)`` for ``v`` times the messages. ``"zero_bubble"`` (ZB-H1, Qi et
    al. 2024) splits each backward into ``B``, the input gradient the previous stage waits
    for, and ``W``, the weight gradient, deferred into what would be bubble: with forward,
    input-grad and weight-grad of equal time the idle time per rank is ``p-1`` of them
    instead of 1F1B's ``3 (p-1)``. It holds 1F1B's ``p - s`` microbatches up to their ``B``,
    and after it what their ``W`` needs (the weights' inputs) for up to ``2p - 1 - s``.

    The first call runs microbatch 0 once more through every stage under ``no_grad`` (a
    probe that learns the activations' shapes and raises bad input on every rank; the RNG
    state is restored after it), again whenever some rank's params, first-stage inputs or
    last-stage targets change shape. A microbatch whose weight is 0 still runs forward, but
    ``loss_fn`` is not called on it and it contributes nothing (no NaN from an all-padding
    microbatch). Randomness: each stage draws its own RNG stream in schedule order, so
    dropout differs from the unpipelined call; equivalence holds for functions that draw no
    random numbers.

    Composition: ``stage_fn`` may be any transformed function (``fs.remat``, ``fs.amp``,
    ``fs.offload``); ``fs.pipeline`` returns a gradient function of the stage params.

    Args:
        stage_fn: ``stage_fn(params, x) -> y``, one function for every stage, or a sequence
            of ``n`` functions, one per stage (e.g. embedding first, head last; param trees
            may differ between stages). ``x`` of stage 0 is a microbatch of ``inputs``;
            ``y`` of every stage but the last must be a pytree of tensors (integer leaves
            such as masks are sent but get no gradient).
        loss_fn: ``loss_fn(outputs, targets) -> loss``, a scalar floating tensor, run by the
            last stage on its outputs and a microbatch of ``targets``.
        mesh: the ``fs.Mesh``; every rank of ``axis`` must call the returned function.
        axis: the mesh axis the stages are laid out on (default ``"pp"``).
        microbatches: the number of microbatches ``m`` (an int >= 1); dim 0 of every tensor
            leaf of ``inputs`` and ``targets`` must be divisible by it.
        schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"`` or ``"zero_bubble"``.
        virtual_stages: stages per rank ``v`` (``"1f1b"`` and ``"zero_bubble"``: 1). With
            ``v > 1`` a rank passes (and gets grads for) a list of its ``v`` stages' params,
            in stage order.
        weights: ``weights(inputsᵢ, targetsᵢ) -> number | 0-dim tensor``, microbatch ``i``'s
            weight (e.g. its count of valid tokens, when ``loss_fn`` is a token mean), as in
            ``fs.accumulate``. It is called on the last stage's rank, where ``inputsᵢ`` is
            ``None`` when that rank was passed ``inputs=None``: compute it from the targets.
            ``None``: equal weights. Under ``fs.zero`` over a data-parallel axis the
            weights are shared with every stage and reported as ``fs.accumulate``'s are:
            the loss and grads are the global token mean over the replicas, and a replica
            whose microbatches all weigh 0 runs nothing (zero grads).
        tied: weights shared between stages (the embedding of stage 0 and the LM head of the
            last): ``{name: stages}``, e.g. ``{"wte": (0, -1)}`` (the leaf ``params["wte"]``
            of stages 0 and ``n-1``), or ``{name: {stage: path}}`` where the leaf's path
            differs, e.g. ``{"wte": {0: "wte", -1: ("head", "w")}}``. Each owner keeps its
            own copy; every owner gets the sum of the owners' grads (exchanged between their
            ranks after the schedule), so identical updates keep the copies identical. The
            first call checks that the copies have one shape, dtype and value.

    Returns:
        ``f(stage_params, inputs, targets, *, loss_scale=None) -> (loss, stage_grads)``.
        ``stage_params`` are this rank's stage's params; ``stage_grads`` has their structure
        and dtypes. Ranks that do not run stage 0 may pass ``inputs=None``, ranks that do not
        run the last stage ``targets=None``. ``loss`` (detached, ``loss_fn``'s dtype) is the
        same on every rank. With ``loss_scale`` (an ``fs.LossScale`` or a number) the loss is
        scaled before backward and the grads unscaled, as ``fs.value_and_grad`` does.
        The function carries ``f.mesh``, ``f.axis`` (the pipeline's mesh axis), ``f.stages``
        (the global stage indices this rank runs, in order), ``f.microbatches``,
        ``f.schedule``, ``f.virtual_stages``, ``f.tied`` (``((name, ((stage, leaf
        path), ...)), ...)``, stages non-negative) and ``f.copies(grads) -> list[bool]``
        (per grads leaf: True for a tied copy that the tie's first owner counts, so that a
        global grad norm counts the weight once), for transforms that compose with it.

    Raises:
        TypeError: a function is not callable, ``microbatches`` not an int, a params leaf is
            not a floating tensor, ``loss_fn`` returned no scalar floating tensor.
        ValueError: an unknown ``schedule`` or ``axis``, a stage count other than
            ``mesh.shape[axis] * virtual_stages``, ``"1f1b"`` or ``"zero_bubble"`` with
            ``virtual_stages > 1``,
            ``"interleaved_1f1b"`` with ``microbatches`` not a multiple of the axis size,
            a batch not divisible into
            ``microbatches`` (on every rank of the axis), a bad weight.
        RuntimeError (or the original type): a stage or loss function raised (during the
            probe, or on any microbatch later: the rank that raised sends its neighbours a
            stop marker in place of each message it still owed, so no rank waits forever),
            reported on every rank with the stage, rank, microbatch and message.

    Example:
        >>> import torch, fsharding as fs
        >>> embed = lambda p, x: {"h": x @ p["w"]}
        >>> head = lambda p, a: a["h"] @ p["v"]
        >>> mse = lambda y, t: ((y - t) ** 2).mean()
        >>> f = fs.pipeline([embed, head], mse, mesh=fs.Mesh(pp=1), virtual_stages=2,
        ...                 microbatches=2, schedule="gpipe")
        >>> # under fs.launch / torchrun with fs.Mesh(pp=2): rank r passes stage r's params
        >>> x, t = torch.ones(4, 3), torch.zeros(4, 2)
        >>> params = [{"w": torch.ones(3, 2)}, {"v": torch.eye(2)}]
        >>> loss, grads = f(params, x, t)
        >>> float(loss), grads[1]["v"].shape
        (9.0, torch.Size([2, 2]))
    """
    fns = _check_args(stage_fn, loss_fn, mesh, axis, microbatches, schedule, virtual_stages)
    if weights is not None and not callable(weights):
        raise TypeError(
            f"{_API}: weights must be None (equal weights) or a callable "
            f"weights(inputs, targets) -> number, got {type(weights).__name__}. For token "
            "weighting pass e.g. weights=lambda x, y: (y != -100).sum()."
        )
    runner = _Runner(
        fns, loss_fn, mesh, axis, microbatches, schedule, virtual_stages, weights, tied
    )

    def pipelined(
        stage_params: PyTree, inputs: PyTree, targets: PyTree, *, loss_scale: Any = None
    ) -> tuple[torch.Tensor, PyTree]:
        if runner.p > 1:  # a step around a grad_fn that hides this pipeline refuses it
            note_pipeline_ran(axis)
        return runner(stage_params, inputs, targets, loss_scale)

    # what a composing transform (fs.zero over a dp x pp mesh, fs.train_step's grad norm)
    # reads: the mesh, the pipeline's axis and the global stages this rank runs
    pipelined.mesh = mesh  # type: ignore[attr-defined]
    pipelined.axis = axis  # type: ignore[attr-defined]
    pipelined.stages = tuple(st.index for st in runner.stages)  # type: ignore[attr-defined]
    pipelined.microbatches = microbatches  # type: ignore[attr-defined]
    pipelined.schedule = schedule  # type: ignore[attr-defined]
    pipelined.virtual_stages = virtual_stages  # type: ignore[attr-defined]
    pipelined.weighted = weights is not None  # type: ignore[attr-defined]
    # ((name, ((stage, leaf path), ...)), ...): a global grad norm counts each tie once
    pipelined.tied = tuple((k, tuple(o)) for k, o in runner.tied)  # type: ignore[attr-defined]
    later_owners = {owner for _, owners in runner.tied for owner in owners[1:]}

    def copies(grads: PyTree) -> list[bool]:
        """Per leaf of this rank's grads (``optree.tree_leaves`` order): True for a tied
        copy whose first owner (the lowest stage) counts the weight (step.Partition)."""
        trees = [grads] if len(runner.stages) == 1 else list(grads)
        return [
            (st.index, path) in later_owners
            for st, tree in zip(runner.stages, trees, strict=True)
            for path, _ in _tree.leaves_with_path(tree)
        ]

    pipelined.copies = copies  # type: ignore[attr-defined]
    return pipelined


def _check_args(
    stage_fn: Any,
    loss_fn: Any,
    mesh: Any,
    axis: Any,
    microbatches: Any,
    schedule: Any,
    virtual_stages: Any,
) -> list[StageFn]:
    """The per-stage functions, after the checks every rank makes alike (no communication)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{_API}: mesh must be an fs.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{_API}: axis={axis!r} is not an axis of the mesh {mesh.shape}; pass one of "
            f"{mesh.axis_names} (e.g. fs.Mesh(pp=2) with axis='pp')."
        )
    for name, value in (("microbatches", microbatches), ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{_API}: {name} must be an int >= 1, got {value!r}.")
        if value < 1:
            raise ValueError(f"{_API}: {name} must be >= 1, got {value}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"{_API}: unknown schedule={schedule!r}; valid values: {SCHEDULES}.")
    p = mesh.shape[axis]
    if schedule in ("1f1b", "zero_bubble") and virtual_stages != 1:
        raise ValueError(
            f"{_API}: schedule={schedule!r} runs one stage per rank, got virtual_stages="
            f"{virtual_stages}; use schedule='interleaved_1f1b' (or 'gpipe') for several "
            "stages per rank."
        )
    if schedule == "interleaved_1f1b" and virtual_stages > 1 and microbatches % p != 0:
        raise ValueError(
            f"{_API}: schedule='interleaved_1f1b' runs microbatches in rounds of "
            f"mesh.shape[{axis!r}] = {p}, got microbatches={microbatches}; use a multiple of "
            f"{p}."
        )
    n = p * virtual_stages
    if callable(stage_fn) and not isinstance(stage_fn, (list, tuple)):
        fns = [stage_fn] * n
    elif isinstance(stage_fn, Sequence) and not isinstance(stage_fn, str):
        fns = list(stage_fn)
        if len(fns) != n:
            raise ValueError(
                f"{_API}: got {len(fns)} stage functions but the pipeline has "
                f"mesh.shape[{axis!r}] * virtual_stages = {p} * {virtual_stages} = {n} stages; "
                f"pass {n} functions (one per stage) or build the mesh with {axis}="
                f"{len(fns) // virtual_stages if len(fns) % virtual_stages == 0 else len(fns)}."
            )
        for i, f in enumerate(fns):
            if not callable(f):
                raise TypeError(
                    f"{_API}: stage_fn[{i}] must be callable stage_fn(params, x), got "
                    f"{type(f).__name__}."
                )
    else:
        raise TypeError(
            f"{_API}: stage_fn must be a function stage_fn(params, x) or a sequence of them "
            f"(one per stage), got {type(stage_fn).__name__}."
        )
    if not callable(loss_fn):
        raise TypeError(
            f"{_API}: loss_fn must be callable loss_fn(outputs, targets) -> loss, got "
            f"{type(loss_fn).__name__}."
        )
    return fns


# --------------------------------------------------------------------------------------
# schedules: per-rank lists of actions
# --------------------------------------------------------------------------------------

_F, _B, _W = "F", "B", "W"

_IO = (
    "received_activations",
    "held",
    "p2p_sent",
    "p2p_received",
    "messages_sent",
    "messages_received",
)

# Message tags. A call that fails mid-schedule leaves messages unreceived and sends pending;
# every rank of the axis then moves its group to the next generation of tags (one range of
# _TAG_SPAN tags each), so that no later call, of this pipeline or another on the same
# group, receives them.
_TAG_SPAN = 1 << 20
_GENERATIONS = (1 << 31) // _TAG_SPAN - 1
_GENERATION: dict[tuple[int, ...], int] = {}


def _actions(schedule: str, p: int, rank: int, m: int, v: int = 1) -> list[tuple[str, int, int]]:
    """``(kind, local stage, microbatch)`` in the order rank ``rank`` runs them; local stage
    ``k`` is global stage ``rank + k * p``. ``"zero_bubble"`` has ``B`` (input gradients
    only) and ``W`` (weight gradients) actions; the other schedules' ``B`` does both."""
    if schedule == "zero_bubble":
        return [(kind, 0, i) for kind, i in _zero_bubble(p, m)[rank]]
    if schedule == "gpipe":  # with v > 1: torch's LoopedBFS (each local stage in turn)
        fwd = [(_F, k, i) for k in range(v) for i in range(m)]
        return fwd + [(_B, k, i) for k in reversed(range(v)) for i in range(m)]
    if v == 1:
        # 1F1B (PipeDream-flush / Megatron): p - rank - 1 warm-up forwards, then one
        # forward and one backward in turn, then the remaining backwards.
        warmup = min(p - rank - 1, m)
        out = [(_F, 0, i) for i in range(warmup)]
        for i in range(m - warmup):
            out += [(_F, 0, warmup + i), (_B, 0, i)]
        return out + [(_B, 0, i) for i in range(m - warmup, m)]
    # interleaved 1F1B (Megatron-LM, arXiv 2104.04473): microbatches in rounds of p; the
    # j-th forward runs local stage (j // p) % v on microbatch (j // (p v)) p + j % p, the
    # j-th backward the local stages in reverse order.
    total = m * v

    def fwd(j: int) -> tuple[str, int, int]:
        return (_F, (j // p) % v, (j // (p * v)) * p + j % p)

    def bwd(j: int) -> tuple[str, int, int]:
        return (_B, v - 1 - (j // p) % v, (j // (p * v)) * p + j % p)

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    out = [fwd(j) for j in range(warmup)]
    for j in range(total - warmup):
        out += [fwd(warmup + j), bwd(j)]
    return out + [bwd(j) for j in range(total - warmup, total)]


@functools.lru_cache(maxsize=64)
def _zero_bubble(p: int, m: int) -> tuple[tuple[tuple[str, int], ...], ...]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241): every rank's
    ``(kind, microbatch)`` list, built by simulating the pipeline with unit-time ``F``,
    ``B`` (input grad) and ``W`` (weight grad) and a greedy choice per idle rank.

    Rank ``r`` runs a ready ``B`` first (it is on the critical path: the rank below waits
    for it), else a ready ``F`` while fewer than ``p - r`` microbatches are forwarded but
    not ``B``-ed (1F1B's bound on un-backwarded activations), else a deferred ``W`` (that
    fills what 1F1B leaves as bubble); once ``p`` ``W`` s are pending, ``W`` goes first (it
    bounds the graphs kept for them). With equal times the bubble is ``(p-1)`` units per
    rank instead of 1F1B's ``3 (p-1)`` (``F = B = W = 1``, 1F1B's backward ``= 2``)."""
    done: dict[tuple[str, int, int], int] = {}
    nxt = {kind: [0] * p for kind in (_F, _B, _W)}
    busy, lists, t = [0] * p, [[] for _ in range(p)], 0
    never = 1 << 60

    def ready(kind: str, r: int) -> bool:
        i = nxt[kind][r]
        if kind == _F:
            upstream = r == 0 or done.get((_F, r - 1, i), never) <= t
            return i < m and i - nxt[_B][r] < p - r and upstream
        if kind == _B:
            downstream = r == p - 1 or done.get((_B, r + 1, i), never) <= t
            return i < nxt[_F][r] and done[(_F, r, i)] <= t and downstream
        return i < nxt[_B][r] and done[(_B, r, i)] <= t

    while sum(map(len, lists)) < 3 * p * m:
        for r in range(p):
            if busy[r] > t:
                continue
            order = (_W, _B, _F) if nxt[_B][r] - nxt[_W][r] >= p else (_B, _F, _W)
            for kind in order:
                if ready(kind, r):
                    i = nxt[kind][r]
                    nxt[kind][r] += 1
                    done[(kind, r, i)] = busy[r] = t + 1
                    lists[r].append((kind, i))
                    break
        t += 1
    return tuple(tuple(x) for x in lists)


# --------------------------------------------------------------------------------------
# split backward (zero bubble): input gradients now, weight gradients later
# --------------------------------------------------------------------------------------


def _node(t: torch.Tensor) -> Any:
    """``t``'s autograd node: its ``grad_fn``, or for a leaf its gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    with torch.enable_grad():
        return t.view_as(t).grad_fn.next_functions[0][0]


def _backward_input(
    outs: list[torch.Tensor], cots: list[Any], inputs: list[torch.Tensor], params: list
) -> tuple[tuple[torch.Tensor | None, ...], Any]:
    """The ``B`` of zero bubble: the gradients of ``inputs`` only, and what ``W`` needs.

    torch's ``pipelining._backward.stage_backward_input`` algorithm, written here for
    fsharding's returned grads (no ``.grad``) and for outputs that depend on params only:
    the *intermediates* are the autograd nodes on the inputs' path to the outputs that also
    take something computed from params; this pass records the gradient flowing into each
    (a node pre-hook) while differentiating towards the inputs, keeping the graph below
    them. ``W`` then starts from those nodes with the recorded gradients. Outputs whose
    graph no input reaches are left to ``W`` whole."""
    roots = [_node(o) for o in outs]
    parents: dict[Any, list[Any]] = collections.defaultdict(list)
    seen, queue = set(roots), collections.deque(roots)
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents[child].append(node)
            if child not in seen:
                seen.add(child)
                queue.append(child)

    def upwards(starts: list[Any], stop: set[Any]) -> tuple[set[Any], set[Any]]:
        closure, hit, queue = set(starts), set(), collections.deque(starts)
        while queue:
            for parent in parents.get(queue.popleft(), ()):
                if parent in closure or parent in hit:
                    continue
                if parent in stop:
                    hit.add(parent)
                    continue
                closure.add(parent)
                queue.append(parent)
        return closure, hit

    on_path, _ = upwards([_node(x) for x in inputs], set())
    _, mids = upwards([_node(w) for w in params], on_path)
    now = [(o, c) for o, c, root in zip(outs, cots, roots, strict=True) if root in on_path]
    later = [(o, c) for o, c, root in zip(outs, cots, roots, strict=True) if root not in on_path]
    recorded: dict[Any, tuple] = {}
    handles = [
        n.register_prehook(functools.partial(lambda n, g: recorded.__setitem__(n, g), n))
        for n in mids
    ]
    try:
        if now and inputs:
            grads = torch.autograd.grad(
                [o for o, _ in now],
                inputs,
                [c for _, c in now],
                retain_graph=True,
                allow_unused=True,
            )
        else:
            grads = (None,) * len(inputs)
    finally:
        for h in handles:
            h.remove()
    return grads, (recorded, later)


def _backward_weight(state: Any, params: list) -> tuple[torch.Tensor | None, ...]:
    """The ``W`` of zero bubble: ``params``' gradients from what ``_backward_input`` kept."""
    recorded, later = state
    edges: list[Any] = []
    cots: list[Any] = []
    for node, grads in recorded.items():
        for j, g in enumerate(grads):
            if g is not None:
                edges.append(torch.autograd.graph.GradientEdge(node, j))
                cots.append(g)
    for o, c in later:
        edges.append(o)
        cots.append(c)
    if not edges:
        return (None,) * len(params)
    # an intermediate below another gets its recorded gradient, not the sum of that and
    # what flows down from the one above again (which it already contains)
    handles = (
        [n.register_prehook(lambda _, g=g: g) for n, g in recorded.items()]
        if len(recorded) > 1
        else []
    )
    try:
        return torch.autograd.grad(edges, params, cots, allow_unused=True)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Meta:
    """A tensor leaf's shape and dtype (a pytree leaf: not a registered node)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _Stage:
    """One stage this rank runs: its function, position and cached activation metadata."""

    def __init__(self, index: int, n: int, fn: StageFn):
        self.index = index
        self.fn = fn
        self.is_first = index == 0
        self.is_last = index == n - 1
        self.in_meta: Any = None  # pytree of _Meta (what the previous stage sends)
        self.out_meta: Any = None  # pytree of _Meta (what this stage sends)


class _Poisoned(Exception):
    """A message this rank waited for came from a rank that had stopped (it raised, or was
    poisoned itself): this rank stops too."""

    def __init__(self, rank: int):
        super().__init__(rank)
        self.rank = rank


class _Runner:
    def __init__(self, fns, loss_fn, mesh, axis, m, schedule, v, weights, tied=None):
        self.loss_fn = loss_fn
        self.m = m
        self.v = v
        self.weights = weights
        self.axis = axis
        self.p = mesh.shape[axis]
        self.rank = mesh.coordinate[axis]
        self.n = self.p * v
        self.group = mesh.group(axis) if self.p > 1 else None
        # rank r runs stages r, r + p, ... (all of them, in order, on a one-rank axis)
        self.stages = [_Stage(s, self.n, fns[s]) for s in range(self.rank, self.n, self.p)]
        self.schedule = schedule
        self.signature: Any = None
        self.loss_dtype: torch.dtype | None = None
        self.group_key = (
            tuple(dist.get_process_group_ranks(self.group)) if self.group is not None else ()
        )
        span = 3 * self.n * (m + 1) + len(tied or ()) * self.n
        if span >= _TAG_SPAN:
            raise ValueError(
                f"{_API}: {self.n} stages x {m} microbatches need {span} message tags, more "
                f"than {_TAG_SPAN}; use fewer microbatches (e.g. fs.accumulate around the "
                "pipeline)."
            )
        self.stale: list[Any] = []  # pending sends of failed calls (their buffers)
        self.nccl = self.group is not None and "nccl" in str(dist.get_backend(self.group))
        self.broken: str | None = None
        self.tied = _resolve_tied(tied, self.n)

    # -- communication --------------------------------------------------------------
    # Messages are keyed by (kind, boundary, microbatch); boundary b is the link between
    # stages b and b + 1 (activations go up it, their gradients down). Over P2P the key is
    # the tag, so a receiver never takes another stage's or microbatch's message.

    def _peer(self, stage: int) -> int:
        """The global rank that runs ``stage``."""
        return dist.get_global_rank(self.group, stage % self.p)

    def _here(self, stage: int) -> bool:
        return stage % self.p == self.rank

    def _tag(self, kind: int, boundary: int, mb: int) -> int:
        """Kinds 0 (activations), 1 (their grads), 2 (the probe), 3 (tied grads; boundary
        = the tie's index, mb = the owner stage), in the group's current generation."""
        base = 1 + _GENERATION.get(self.group_key, 0) * _TAG_SPAN
        if kind == 3:
            return base + 3 * self.n * (self.m + 1) + boundary * self.n + mb
        return base + (kind * self.n + boundary) * (self.m + 1) + mb

    def _send(
        self,
        tensors: list[torch.Tensor],
        src: int,
        dst: int,
        kind: int,
        mb: int,
        status: int = 0,
    ) -> None:
        """Sends ``tensors`` from stage ``src`` to stage ``dst`` (asynchronously). Schedule
        messages (kinds 0 and 1) start with a header: ``[status, rank]``, status 1 when the
        sender stopped (the tensors are then zeros of the expected shapes)."""
        key = (kind, min(src, dst), mb)
        self.sent.add(key)
        if self._here(dst):
            self.box[key] = [t.detach() for t in tensors]
            return
        peer, tag = self._peer(dst), self._tag(*key)
        if kind in (0, 1):
            header = torch.tensor([status, self.rank], dtype=torch.int64, device=self.device)
            tensors = [header, *tensors]
            self._count(src, "sent", tensors)
        for t in tensors:
            t = t.detach().contiguous()
            self.pending.append((dist.isend(t, peer, group=self.group, tag=tag), t))

    def _recv(
        self, metas: list[_Meta], src: int, dst: int, kind: int, mb: int
    ) -> list[torch.Tensor]:
        """Receives, on stage ``dst``, the tensors ``metas`` describe from stage ``src``;
        raises :class:`_Poisoned` when the sender had stopped."""
        key = (kind, min(src, dst), mb)
        if self._here(src):
            return self.box.pop(key)
        peer, tag = self._peer(src), self._tag(*key)
        out = [torch.empty(mt.shape, dtype=mt.dtype, device=self.device) for mt in metas]
        if kind in (0, 1):
            out = [torch.empty(2, dtype=torch.int64, device=self.device), *out]
        works = [dist.irecv(t, peer, group=self.group, tag=tag) for t in out]
        for w in works:
            w.wait()
        del works
        if kind in (0, 1):
            self._count(dst, "received", out)
            header, out = out[0].tolist(), out[1:]
            if header[0] != 0:
                raise _Poisoned(header[1])
        return out

    def _count(self, stage: int, way: str, tensors: list[torch.Tensor]) -> None:
        io = self.io[stage]
        io[f"p2p_{way}"] += sum(t.numel() * t.element_size() for t in tensors)
        io[f"messages_{way}"] += 1

    def _prune(self) -> None:
        """Drops the sends that completed (their buffers are free again)."""
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def _wait_sends(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []

    def _send_obj(self, obj: Any, dst: int) -> None:
        if self._here(dst):
            self.box[("obj", dst)] = obj
            return
        dist.send_object_list([obj], self._peer(dst), group=self.group)

    def _recv_obj(self, dst: int) -> Any:
        if self._here(dst - 1):
            return self.box.pop(("obj", dst))
        objs: list[Any] = [None]
        dist.recv_object_list(objs, self._peer(dst - 1), group=self.group)
        return objs[0]

    def _any(self, flag: bool) -> bool:
        """True on every rank of the axis when ``flag`` is True on some rank."""
        if self.group is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        before = _compat.use_counts([t])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        _compat.settle(before)
        return bool(t.item())

    # -- one call -------------------------------------------------------------------

    def __call__(self, stage_params, inputs, targets, loss_scale):
        if self.broken is not None:
            raise RuntimeError(self.broken)
        self.box: dict[Any, Any] = {}
        self.pending: list[tuple[Any, torch.Tensor]] = []
        self.sent: set[tuple[int, int, int]] = set()
        # per stage, for fs.memory_report: point-to-point traffic, received inputs held
        self.io = {st.index: dict.fromkeys(_IO, 0) for st in self.stages}
        self.held: dict[tuple[int, int], int] = {}
        self.measure = _context.MEMORY_MEASURE.get()
        if not hasattr(self.measure, "enter_stage"):
            self.measure = None
        # fs.zero's token-weight channel (as for fs.accumulate): set when this call is a
        # data-parallel replica's share of a global token mean
        report = _context.ACCUMULATE_REPORT.get() if self.weights is not None else None
        error, params, batch, signature = None, None, None, None
        try:  # errors are raised on every rank (in the probe), never here alone
            loss_scale = as_loss_scale(loss_scale, _API)
            params = self._params(stage_params)
            batch = self._split_batch(inputs, targets, allow_zero=report is not None)
            signature = (
                _signature(params),
                _signature(batch[0][0]) if batch[0] is not None else None,
                _signature(batch[1][0]) if batch[1] is not None else None,
            )
        except Exception as e:
            error = e
        self.device = _device(params or [], inputs, targets)
        if report is not None and self._report_weights(report, batch, error):
            return self._nothing_to_run(params)
        if self._any(error is not None or signature != self.signature):
            self.signature = None
            self._probe(params, batch, error)
            self.signature = signature
        try:
            loss = self._run(params, batch, loss_scale)
            self._sum_tied()
            grads = [self._grads_out(k, loss_scale) for k in range(len(self.stages))]
            if self.measure is not None:
                for st in self.stages:
                    io = {k: v for k, v in self.io[st.index].items() if k != "held"}
                    self.measure.observe_stage(st.index, io)
        finally:
            self._release()
        return loss, grads[0] if self.v == 1 else grads

    def _params(self, stage_params: PyTree) -> list[PyTree]:
        """This rank's stages' params, one pytree per local stage, checked."""
        k = len(self.stages)
        if k == 1:
            per_stage = [stage_params]
        else:
            if not isinstance(stage_params, (list, tuple)) or len(stage_params) != k:
                got = (
                    f"a {type(stage_params).__name__} of length {len(stage_params)}"
                    if isinstance(stage_params, (list, tuple))
                    else type(stage_params).__name__
                )
                raise TypeError(
                    f"{_API}: this rank runs stages {[s.index for s in self.stages]}, so "
                    f"stage_params must be a list of {k} param trees (one per stage, in that "
                    f"order), got {got}."
                )
            per_stage = list(stage_params)
        for k, name, path in self._tied_here():
            paths = [q for q, _ in _tree.leaves_with_path(per_stage[k])]
            if path not in paths:
                raise ValueError(
                    f"{_API}: tied={{{name!r}: ...}} names the params leaf {path} of stage "
                    f"{self.stages[k].index}, which its params do not have (its leaves: "
                    f"{', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}); pass the "
                    "path of the shared tensor in that stage's tree."
                )
        for st, tree in zip(self.stages, per_stage, strict=True):
            for path, leaf in _tree.leaves_with_path(tree):
                if not _tree.is_floating(leaf):
                    what = _tree.describe(leaf)
                    raise TypeError(
                        f"{_API}: stage {st.index}'s params leaf {path} is {what}; params "
                        "must be floating-point tensors. Keep integer or constant values in "
                        "the inputs or a closure."
                    )
        return per_stage

    def _split_batch(self, inputs, targets, allow_zero: bool = False):
        """``(inputs microbatches | None, targets microbatches | None, weights, total)``;
        all weights 0 raise unless ``allow_zero`` (under fs.zero another replica may hold
        the tokens)."""
        first = any(st.is_first for st in self.stages)
        last = any(st.is_last for st in self.stages)
        xs = _split(inputs, "inputs", self.m, 0) if first else None
        ys = _split(targets, "targets", self.m, self.n - 1) if last else None
        ws, total = None, None
        if last:
            if self.weights is None:
                ws = [1.0] * self.m
            else:
                xs_here = (
                    xs
                    if xs is not None
                    else (
                        _split(inputs, "inputs", self.m, 0)
                        if inputs is not None
                        else [None] * self.m
                    )
                )
                ws = [_weight(self.weights(x, y), i) for i, (x, y) in enumerate(zip(xs_here, ys))]
            total = math.fsum(ws)
            if total == 0 and not allow_zero:
                raise ValueError(
                    f"{_API}: every microbatch has weight 0 (weights {ws}), so there is "
                    "nothing to average (Σ wᵢ = 0). Drop batches without valid tokens, or "
                    "return a positive weight for at least one microbatch."
                )
        return xs, ys, ws, total

    def _report_weights(self, report: Callable[[list[float]], None], batch, error) -> bool:
        """Under ``fs.zero``: the last stage's microbatch weights go to every rank of the
        axis (one all-reduce, with a failure flag), and every rank reports them to its
        data-parallel group, as ``fs.accumulate`` does, so the replicas weight each other
        into the global token mean. A failure on any rank of the axis is reported as NaN
        weights (the other replicas then raise too) and raised by the probe. True when
        every weight here is 0: this replica runs nothing (another holds the tokens)."""
        t = torch.zeros(self.m + 1, dtype=torch.float64, device=self.device)
        if error is not None:
            t[self.m] = 1.0
        elif batch[2] is not None:  # the rank of the last stage
            t[: self.m] = torch.tensor(batch[2], dtype=torch.float64)
        if self.group is not None:
            before = _compat.use_counts([t])
            dist.all_reduce(t, group=self.group)
            _compat.settle(before)
        *ws, failed = t.tolist()
        if failed:
            try:
                report([math.nan] * self.m)
            except Exception:
                pass  # every replica raises; this one its own error, in the probe
            return False
        report(ws)
        return math.fsum(ws) == 0

    def _nothing_to_run(self, params: list[PyTree]) -> tuple[torch.Tensor, Any]:
        """A replica whose microbatches all weigh 0: a zero loss (``fs.zero`` gives it the
        other replicas' dtype) and zero grads, without running the schedule."""
        zeros = [optree.tree_map(torch.zeros_like, p) for p in params]
        floats = [x for p in params for x in optree.tree_leaves(p)]
        wide = any(x.dtype == torch.float64 for x in floats)
        loss = torch.zeros((), dtype=torch.float64 if wide else torch.float32, device=self.device)
        return loss, zeros[0] if self.v == 1 else zeros

    # -- the probe: shapes once, errors on every rank ---------------------------------

    def _probe(self, params, batch, error):
        """Microbatch 0 through every stage under no_grad: caches each stage's activation
        metadata (and the loss dtype) and raises any rank's error on every rank."""
        self._check_config()
        failure = None if error is None else (None, error)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for k, st in enumerate(self.stages):
                x, upstream_ok = None, True
                if st.is_first:
                    x = batch[0][0] if failure is None else None
                else:
                    status, meta = self._recv_obj(st.index)
                    upstream_ok = status == "ok"
                    if upstream_ok:
                        st.in_meta = meta
                        leaves, treedef = optree.tree_flatten(meta)
                        got = self._recv(leaves, st.index - 1, st.index, 2, 0)
                        x = optree.tree_unflatten(treedef, got)
                out = None
                if failure is None and upstream_ok:
                    try:
                        out = st.fn(params[k], x)
                        if st.is_last:
                            self.loss_dtype = self._loss(out, batch[1][0], 0).dtype
                        else:
                            st.out_meta = _metas(out, st.index)
                    except Exception as e:
                        failure, out = (st.index, e), None
                if not st.is_last:
                    if out is None:
                        self._send_obj(("err", None), st.index + 1)
                    else:
                        self._send_obj(("ok", st.out_meta), st.index + 1)
                        self._send(optree.tree_leaves(out), st.index, st.index + 1, 2, 0)
                        self._wait_sends()
        self._raise_any(failure)
        self._check_tied(params)

    def _check_config(self) -> None:
        """Before any P2P: every rank of the axis built the pipeline alike (else the
        message tags never match and the ranks hang); raises ValueError on every rank."""
        if self.group is None:
            return
        mine = {
            "microbatches": self.m,
            "virtual_stages": self.v,
            "schedule": self.schedule,
            "tied": tuple((k, tuple(o)) for k, o in self.tied),
            "weights": "None" if self.weights is None else "a callable",
        }
        configs: list[Any] = [None] * self.p
        dist.all_gather_object(configs, mine, group=self.group)
        for r, theirs in enumerate(configs):
            for name, value in mine.items():
                if theirs[name] != value:
                    raise ValueError(
                        f"{_API}: the ranks of axis {self.axis!r} built the pipeline with "
                        f"different {name}=: rank {r} has {theirs[name]!r}, rank {self.rank} "
                        f"{value!r}. Every rank of the axis must pass the same {name}= to "
                        "fs.pipeline (else their messages never match and the ranks hang)."
                    )

    def _raise_any(self, failure: tuple[int | None, Exception] | None) -> None:
        """Raises on every rank when some rank failed (each its own error, the others the
        first failure in stage order); learns the loss dtype from the last stage."""
        mine = None
        if failure is not None:
            stage, e = failure
            mine = (self.rank, stage, type(e).__name__, str(e))
        reports = [(mine, self.loss_dtype)]
        if self.group is not None:
            reports = [None] * self.p
            dist.all_gather_object(reports, (mine, self.loss_dtype), group=self.group)
        dtypes = [d for _, d in reports if d is not None]
        if dtypes:
            self.loss_dtype = dtypes[0]
        failed = [f for f, _ in reports if f is not None]
        if not failed:
            return
        if failure is not None and failure[0] is None:
            raise failure[1]  # this rank's own argument error (already says what to do)
        if failure is not None:
            rank, stage, name, msg = mine
        else:
            rank, stage, name, msg = min(failed, key=lambda f: (f[1] is not None, f[1] or 0))
        kind = getattr(builtins, name, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)) or kind is KeyError:
            kind = RuntimeError
        if stage is None:
            text = f"rank {rank} of axis {self.axis!r} got bad arguments ({name}: {msg})"
        else:
            text = (
                f"stage {stage} (rank {rank} of axis {self.axis!r}) raised {name}: {msg} on "
                f"microbatch 0; if it reads a missing or unexpected params entry, pass that "
                f"rank stage {stage}'s params (stage_params is one stage's tree, not the model's)"
            )
        error = kind(f"{_API}: {text}. Every rank of the axis raises; no microbatch ran.")
        if failure is not None:
            raise error from failure[1]
        raise error

    # -- the schedule ---------------------------------------------------------------

    def _run(self, params, batch, loss_scale):
        xs, ys, ws, total = batch
        self.aliases = []
        for tree in params:
            leaves, treedef = optree.tree_flatten(tree)
            fresh = [x.detach().requires_grad_(True) for x in leaves]
            self.aliases.append((fresh, treedef, optree.tree_unflatten(treedef, fresh)))
        self.bufs: list[list[torch.Tensor | None]] = [[None] * len(a[0]) for a in self.aliases]
        self.saved: dict[tuple[int, int], Any] = {}
        self.deferred: dict[tuple[int, int], Any] = {}  # zero bubble: W's state
        self.losses: list[torch.Tensor | None] = [None] * self.m
        self.ws, self.total, self.ys, self.xs = ws, total, ys, xs
        self.loss_scale = loss_scale
        if self.p == 1:
            order = [(_F, k, i) for i in range(self.m) for k in range(len(self.stages))]
            order += [(_B, k, i) for i in range(self.m) for k in reversed(range(len(self.stages)))]
        else:
            order = _actions(self.schedule, self.p, self.rank, self.m, self.v)
        self.split = any(kind == _W for kind, _, _ in order)
        failure: tuple[Any, BaseException] | None = None
        for j, (kind, k, i) in enumerate(order):
            before = self.measure.enter_stage(self.stages[k].index) if self.measure else None
            try:
                if kind == _F:
                    self._forward(k, i)
                elif kind == _B:
                    self._backward(k, i)
                else:
                    w_grads = _backward_weight(self.deferred.pop((k, i)), self.aliases[k][0])
                    self._accumulate(k, w_grads)
                    self._unhold(k, i)
                self._prune()
            except Exception as e:  # stop; unblock every rank that waits on this one
                failure = ((kind, self.stages[k].index, i), e)
                try:
                    self._poison(order[j:])
                except Exception:  # a peer's connection is gone: it cannot wait on us
                    pass
                break
            finally:
                if self.measure is not None:
                    self.measure.enter_stage(before)
        return self._finish(failure)

    def _poison(self, remaining: list[tuple[str, int, int]]) -> None:
        """Sends every message this rank still owes in ``remaining`` with the stop status
        (zeros of the expected shapes), so that no rank waits forever on this one; ranks
        that receive one stop and poison theirs in turn."""
        for kind, k, i in remaining:
            st = self.stages[k]
            if kind == _F and not st.is_last and (0, st.index, i) not in self.sent:
                if not self._here(st.index + 1):
                    metas = optree.tree_leaves(st.out_meta)
                    self._send(self._zeros(metas), st.index, st.index + 1, 0, i, status=1)
            if kind == _B and not st.is_first and (1, st.index - 1, i) not in self.sent:
                if not self._here(st.index - 1):
                    metas = [mt for mt in optree.tree_leaves(st.in_meta) if _floating(mt)]
                    self._send(self._zeros(metas), st.index, st.index - 1, 1, i, status=1)

    def _zeros(self, metas: list[_Meta]) -> list[torch.Tensor]:
        return [torch.zeros(mt.shape, dtype=mt.dtype, device=self.device) for mt in metas]

    def _finish(self, failure: tuple[Any, BaseException] | None) -> torch.Tensor:
        """One all-reduce tells every rank whether some rank stopped (and carries the
        loss from the last stage); then the sends are waited, or on failure every rank
        learns who raised what and raises it."""
        failed = failure is not None
        value = 0.0
        if not failed and any(st.is_last for st in self.stages):
            value = float(self._loss_value().to(torch.float64))
        if self.group is None:
            flags = torch.tensor([float(failed), value], dtype=torch.float64, device=self.device)
        else:
            flags = torch.tensor([float(failed), value], dtype=torch.float64, device=self.device)
            before = _compat.use_counts([flags])
            dist.all_reduce(flags, group=self.group)
            _compat.settle(before)
        if flags[0].item() == 0:
            self._wait_sends()
            return flags[1].to(self.loss_dtype)
        self._raise_failure(failure)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_failure(self, failure: tuple[Any, BaseException] | None) -> None:
        """Every rank: gathers what each raised (poisoned ranks report nothing), forgets
        this call's messages (a new generation of tags) and raises the first failure in
        stage order; the rank that raised it re-raises with its traceback as the cause."""
        self.stale = (self.stale + self.pending)[-256:]
        self.pending = []
        _GENERATION[self.group_key] = (_GENERATION.get(self.group_key, 0) + 1) % _GENERATIONS
        mine = None
        if failure is not None and not isinstance(failure[1], _Poisoned):
            (kind, stage, mb), e = failure
            mine = (self.rank, stage, kind, mb, type(e).__name__, str(e))
        reports: list[Any] = [mine]
        if self.group is not None:
            reports = [None] * self.p
            dist.all_gather_object(reports, mine, group=self.group)
        roots = sorted((r for r in reports if r is not None), key=lambda r: (r[1], r[3]))
        if self.nccl:
            self.broken = (
                f"{_API}: an earlier call failed mid-schedule; on NCCL its unreceived "
                "messages would be matched, in order, by the next call's (NCCL ignores tags): "
                "restart the process group."
            )
        if not roots:  # only a crashed peer's connection error: raise what we got
            assert failure is not None
            raise failure[1]
        rank, stage, kind, mb, name, msg = roots[0]
        what = {_F: "forward", _B: "backward", _W: "weight gradient"}[kind]
        exc = getattr(builtins, name, None)
        if not (isinstance(exc, type) and issubclass(exc, Exception)) or exc is KeyError:
            exc = RuntimeError
        error = exc(
            f"{_API}: stage {stage} (rank {rank} of axis {self.axis!r}) raised {name}: {msg} "
            f"in the {what} of microbatch {mb}. Every rank of the axis raises; this call "
            "returns no grads (the next call starts afresh)."
        )
        if mine is not None and mine[:4] == (rank, stage, kind, mb):
            raise error from failure[1]
        raise error

    # -- tied weights -----------------------------------------------------------------

    def _tied_here(self) -> list[tuple[int, str, str]]:
        """``(local stage, tie name, leaf path)`` for the tied leaves this rank owns."""
        local = {st.index: k for k, st in enumerate(self.stages)}
        return [
            (local[stage], name, path)
            for name, owners in self.tied
            for stage, path in owners
            if stage in local
        ]

    def _check_tied(self, params: list[PyTree]) -> None:
        """After the probe: every owner of a tie holds a leaf of one shape, dtype and value
        (sum and sum of squares), or every rank raises."""
        if not self.tied:
            return
        mine = {}
        for k, name, path in self._tied_here():
            leaf = dict(_tree.leaves_with_path(params[k]))[path]
            d = leaf.detach().to(torch.float64)
            mine[(name, self.stages[k].index)] = (
                tuple(leaf.shape),
                leaf.dtype,
                float(d.sum()),
                float((d * d).sum()),
            )
        reports = [mine]
        if self.group is not None:
            reports = [None] * self.p
            dist.all_gather_object(reports, mine, group=self.group)
        seen = {key: value for report in reports for key, value in report.items()}
        for name, owners in self.tied:
            got = [(stage, seen[(name, stage)]) for stage, _ in owners]
            if any(g[1][:2] != got[0][1][:2] for g in got):
                shapes = ", ".join(f"stage {s}: {v[1]} {v[0]}" for s, v in got)
                raise ValueError(
                    f"{_API}: the tied leaves {name!r} differ in shape or dtype ({shapes}); a "
                    "tie shares one tensor, so its owners must hold the same shape and dtype."
                )
            if any(g[1][2:] != got[0][1][2:] for g in got):
                raise ValueError(
                    f"{_API}: the tied leaves {name!r} of stages {[s for s, _ in got]} hold "
                    "different values; a tie shares one tensor: initialise every owner with "
                    "the same values (e.g. copy stage 0's into the last stage's params)."
                )

    def _sum_tied(self) -> None:
        """Each tie's owners get the sum of their grads (in stage order, so bitwise the
        same on every owner): identical updates keep the copies identical."""
        for t, (_, owners) in enumerate(self.tied):
            parts = {}
            local = []
            for stage, path in owners:
                if not self._here(stage):
                    continue
                k = next(k for k, st in enumerate(self.stages) if st.index == stage)
                j = [q for q, _ in _tree.leaves_with_path(self.aliases[k][2])].index(path)
                alias = self.aliases[k][0][j]
                buf = self.bufs[k][j]
                if buf is None:
                    dtype = torch.promote_types(alias.dtype, torch.float32)
                    buf = torch.zeros(alias.shape, dtype=dtype, device=alias.device)
                parts[stage] = buf
                local.append((k, j))
            if not local:
                continue
            mine = sorted(parts)
            peers: dict[int, list[int]] = {}
            for stage, _ in owners:
                if not self._here(stage):
                    peers.setdefault(stage % self.p, []).append(stage)
            works = []
            for index, stages in sorted(peers.items()):
                peer = dist.get_global_rank(self.group, index)
                for own in mine:
                    tag = self._tag(3, t, own)
                    works.append(dist.isend(parts[own], peer, group=self.group, tag=tag))
                    self._count(own, "sent", [parts[own]])
                for stage in stages:
                    parts[stage] = torch.empty_like(parts[mine[0]])
                    tag = self._tag(3, t, stage)
                    works.append(dist.irecv(parts[stage], peer, group=self.group, tag=tag))
                    self._count(mine[0], "received", [parts[stage]])
            for w in works:
                w.wait()
            total = None
            for stage in sorted(parts):
                total = parts[stage].clone() if total is None else total.add_(parts[stage])
            for k, j in local:
                self.bufs[k][j] = total.clone()

    def _forward(self, k: int, i: int) -> None:
        st = self.stages[k]
        if st.is_first:
            x, inputs = self.xs[i], []
        else:
            leaves, treedef = optree.tree_flatten(st.in_meta)
            inputs = self._recv(leaves, st.index - 1, st.index, 0, i)
            for t in inputs:
                if _tree.is_floating(t):
                    t.requires_grad_(True)
            x = optree.tree_unflatten(treedef, inputs)
            self.held[(k, i)] = sum(t.numel() * t.element_size() for t in inputs)
            io = self.io[st.index]
            io["held"] += self.held[(k, i)]
            io["received_activations"] = max(io["received_activations"], io["held"])
        with torch.enable_grad():
            out = st.fn(self.aliases[k][2], x)
            if st.is_last:
                w = self.ws[i]
                if w == 0.0:  # skipped: loss_fn not called, nothing to differentiate
                    self.saved[(k, i)] = (inputs, None)
                    return
                loss = self._loss(out, self.ys[i], i)
                self.losses[i] = loss.detach()
                obj = loss * (w / self.total)
                if self.loss_scale is not None:
                    obj = self.loss_scale.scale(obj)
                self.saved[(k, i)] = (inputs, [obj])
                return
        leaves, treedef = optree.tree_flatten(out)
        expected = st.out_meta
        got = (
            optree.tree_map(lambda t: _Meta(tuple(t.shape), t.dtype), out)
            if all(isinstance(t, torch.Tensor) for t in leaves)
            else None
        )
        if got != expected:
            raise ValueError(
                f"{_API}: stage {st.index} returned activations for microbatch {i} that "
                f"differ from microbatch 0's ({_describe(got, out)} vs {expected}); every "
                "microbatch must give the same structure, shapes and dtypes (pad "
                "variable-length batches to one shape)."
            )
        self._send(leaves, st.index, st.index + 1, 0, i)
        self.saved[(k, i)] = (inputs, [t for t in leaves if _tree.is_floating(t)])

    def _backward(self, k: int, i: int) -> None:
        st = self.stages[k]
        inputs, outs = self.saved.pop((k, i))
        float_in = [t for t in inputs if _tree.is_floating(t)]
        if st.is_last:
            pairs = [] if outs is None else [(outs[0], None)]
        else:
            metas = [mt for mt in optree.tree_leaves(st.out_meta) if _floating(mt)]
            cot = self._recv(metas, st.index + 1, st.index, 1, i)
            pairs = [(o, g) for o, g in zip(outs, cot, strict=True) if o.requires_grad]
        params = self.aliases[k][0]
        if self.split:  # zero bubble: input grads now, the weights' at this W
            grads_in, self.deferred[(k, i)] = _backward_input(
                [o for o, _ in pairs], [g for _, g in pairs], float_in, params
            )
        elif pairs:
            grads_in = self._backward_into(k, pairs, params, float_in)
        else:
            grads_in = [None] * len(float_in)
        del pairs, outs
        if not self.split:
            self._unhold(k, i)
        if not st.is_first:
            back = [
                torch.zeros_like(x) if g is None else g
                for x, g in zip(float_in, grads_in, strict=True)
            ]
            self._send(back, st.index, st.index - 1, 1, i)

    def _unhold(self, k: int, i: int) -> None:
        """Local stage ``k`` no longer needs microbatch ``i``'s received inputs."""
        self.io[self.stages[k].index]["held"] -= self.held.pop((k, i), 0)

    def _backward_into(self, k: int, pairs: list, params: list, float_in: list) -> list:
        """One microbatch's backward for local stage ``k`` (1F1B, GPipe, interleaved): the
        param grads go straight into the float32 (or wider) sums as autograd produces them,
        as torch's ``AccumulateGrad`` does into ``.grad`` (``autograd.backward(inputs=)``
        on the aliases, whose ``.grad`` *is* the sum: the first microbatch's grads are
        taken without a copy, later ones added in place), so a stage's whole grads never
        sit beside the sums. Params narrower than float32 (bf16, fp16) get this
        microbatch's grads in ``.grad`` and are added into their float32 sums after.
        Returns the grads of the received inputs (None where unused)."""
        bufs = self.bufs[k]
        wide = [p.dtype == torch.promote_types(p.dtype, torch.float32) for p in params]
        for j, p in enumerate(params):
            p.grad = bufs[j] if wide[j] else None
        try:
            torch.autograd.backward(
                [o for o, _ in pairs], [g for _, g in pairs], inputs=params + float_in
            )
            for j, p in enumerate(params):
                g, p.grad = p.grad, None
                if g is None:
                    continue
                if wide[j]:
                    bufs[j] = g.detach()
                elif bufs[j] is None:
                    bufs[j] = g.detach().to(torch.float32)
                else:
                    bufs[j].add_(g)
            grads_in = [x.grad for x in float_in]
        finally:
            for p in params:
                p.grad = None
            for x in float_in:
                x.grad = None
        return grads_in

    def _accumulate(self, k: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Adds one microbatch's param grads of local stage ``k`` to its float32 sums."""
        bufs = self.bufs[k]
        for j, g in enumerate(grads):
            if g is None:
                continue
            if bufs[j] is None:
                bufs[j] = g.detach().to(torch.promote_types(g.dtype, torch.float32), copy=True)
            else:
                bufs[j].add_(g)

    def _loss(self, out, y, i):
        loss = self.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not _tree.is_floating(loss):
            got = _tree.describe(loss, shape=True)
            raise TypeError(
                f"{_API}: loss_fn must return a scalar floating tensor, got {got} for "
                f"microbatch {i}. Reduce it (e.g. .mean())."
            )
        return loss.reshape(())

    def _grads_out(self, k: int, loss_scale: Any) -> PyTree:
        """Local stage ``k``'s grads: the float32 (or wider) sums, unscaled, in the params'
        dtypes (zeros where a param got no gradient)."""
        fresh, treedef, _ = self.aliases[k]
        bufs = self.bufs[k]
        if loss_scale is not None:
            bufs = loss_scale.unscale(bufs)
        out = [
            torch.zeros_like(p) if b is None else b.to(p.dtype)
            for p, b in zip(fresh, bufs, strict=True)
        ]
        return optree.tree_unflatten(treedef, [g.detach() for g in out])

    def _release(self) -> None:
        """Drops what the call held (batch, aliases, buffers): nothing outlives it."""
        self.xs = self.ys = self.ws = self.aliases = self.bufs = self.losses = None
        self.box, self.saved, self.deferred = {}, {}, {}

    def _loss_value(self) -> torch.Tensor:
        """``Σ wᵢ·lossᵢ / Σ wᵢ`` on the last stage, in ``loss_fn``'s dtype."""
        acc = None
        for loss, w in zip(self.losses, self.ws, strict=True):
            if w == 0.0:
                continue
            term = loss.to(torch.promote_types(loss.dtype, torch.float32)) * w
            acc = term if acc is None else acc + term
        return (acc / self.total).to(self.loss_dtype)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _metas(out: PyTree, stage: int) -> PyTree:
    """``out`` with each tensor leaf replaced by its ``_Meta``; non-tensor leaves raise."""
    for path, leaf in _tree.leaves_with_path(out):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{_API}: stage {stage} returned a {type(leaf).__name__} at {path}; the "
                "activations between stages must be a pytree of tensors (keep constants in "
                "a closure)."
            )
    return optree.tree_map(lambda t: _Meta(tuple(t.shape), t.dtype), out)


def _floating(mt: _Meta) -> bool:
    return mt.dtype.is_floating_point or mt.dtype.is_complex


def _keystr(key: Any) -> str:
    return f"[{key!r}]"


def _resolve_tied(tied: Any, n: int) -> list[tuple[str, list[tuple[int, str]]]]:
    """``tied`` as ``[(name, [(stage, leaf path), ...]), ...]``: stages non-negative and
    sorted, paths in ``fs.tree.leaves_with_path``'s form (``"['wte']"``)."""
    if tied is None:
        return []
    if not isinstance(tied, Mapping):
        raise TypeError(
            f"{_API}: tied must be a dict name -> stages, e.g. tied={{'wte': (0, -1)}}, got "
            f"{type(tied).__name__}."
        )
    out = []
    for name in sorted(tied):
        spec = tied[name]
        if isinstance(spec, Mapping):
            items = list(spec.items())
        elif isinstance(spec, (tuple, list)):
            items = [(stage, name) for stage in spec]
        else:
            raise TypeError(
                f"{_API}: tied[{name!r}] must be a tuple of stage indices (the leaf "
                f"params[{name!r}] of each) or a dict stage -> leaf path, got "
                f"{type(spec).__name__}."
            )
        owners = {}
        for stage, path in items:
            if isinstance(stage, bool) or not isinstance(stage, int) or not -n <= stage < n:
                raise ValueError(
                    f"{_API}: tied[{name!r}] names stage {stage!r}; the pipeline has stages "
                    f"0..{n - 1} (negative indices count from the last, -1)."
                )
            if isinstance(path, str) and path.startswith("["):
                key = path
            elif isinstance(path, (str, int)):
                key = _keystr(path)
            elif isinstance(path, tuple) and path:
                key = "".join(_keystr(p) for p in path)
            else:
                raise TypeError(
                    f"{_API}: tied[{name!r}] gives stage {stage} the path {path!r}; a path "
                    "is a key ('wte'), a tuple of keys (('head', 'w')) or a keystr "
                    "(\"['head']['w']\")."
                )
            owners[stage % n] = key
        if len(owners) < 2:
            raise ValueError(
                f"{_API}: tied[{name!r}] names {len(owners)} distinct stage(s); a tie needs "
                "two or more owners (e.g. (0, -1): the embedding and the LM head)."
            )
        out.append((name, sorted(owners.items())))
    return out


def _describe(got: Any, out: Any) -> str:
    return str(got) if got is not None else f"a tree with non-tensor leaves: {out!r}"


def _signature(tree: PyTree) -> Any:
    leaves, treedef = optree.tree_flatten(tree)
    return treedef, tuple(
        (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else repr(t)
        for t in leaves
    )


def _device(params: list[PyTree], inputs: PyTree, targets: PyTree) -> torch.device:
    for tree in (*params, inputs, targets):
        for leaf in optree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                return leaf.device
    return torch.device("cpu")


def _split(tree: PyTree, name: str, m: int, stage: int) -> list[PyTree]:
    """``m`` microbatches of ``tree``: tensor leaves cut along dim 0, other leaves shared."""
    if tree is None:
        raise ValueError(
            f"{_API}: {name} is None on the rank that runs stage {stage}, which reads "
            f"{name}; pass the batch's {name} there (other ranks may pass None)."
        )
    accessors, leaves, treedef = optree.tree_flatten_with_accessor(tree)
    cut = []
    for acc, leaf in zip(accessors, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            cut.append(None)
            continue
        if leaf.dim() == 0 or leaf.shape[0] % m != 0:
            why = (
                "it is 0-dim (no dim 0 to split); pass constants through a closure"
                if leaf.dim() == 0
                else f"dim 0 (size {leaf.shape[0]}) is not divisible by microbatches={m}; use "
                f"a batch size that is a multiple of {m} (e.g. DataLoader(drop_last=True))"
            )
            path = acc.codify(name)
            raise ValueError(
                f"{_API}: cannot split {path} of shape {tuple(leaf.shape)} into {m} "
                f"microbatches: {why}."
            )
        cut.append(einops.rearrange(leaf, "(k b) ... -> k b ...", k=m))
    return [
        optree.tree_unflatten(
            treedef, [leaf if c is None else c[i] for leaf, c in zip(leaves, cut, strict=True)]
        )
        for i in range(m)
    ]


def _weight(w: Any, i: int) -> float:
    if isinstance(w, torch.Tensor):
        if w.dim() != 0 or w.dtype == torch.bool or w.is_complex():
            raise TypeError(
                f"{_API}: weights returned a {w.dtype} tensor of shape {tuple(w.shape)} for "
                f"microbatch {i}; return a number or a 0-dim numeric tensor (e.g. mask.sum())."
            )
        w = float(w.detach().to(torch.float64))
    elif isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(
            f"{_API}: weights returned {w!r} of type {type(w).__name__} for microbatch {i}; "
            "return a number or a 0-dim tensor (e.g. mask.sum())."
        )
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(
            f"{_API}: weights returned {w} for microbatch {i}; weights must be finite and "
            ">= 0 (e.g. the number of valid tokens; 0 skips the microbatch)."
        )
    return w
