"""``fs.memory_report``: what one training step holds and sends, per rank, measured.

This module owns the measurement of one step: :class:`MemoryReport` and
:func:`memory_report`, the saved-activation, gradient and communication counters behind
them. While a report measures, its measurement (``_Measure``) is in force as
``_context.MEMORY_MEASURE``: steps below this layer that know more than autograd shows
(``fs.zero``: its grads before and after the reduction) report to it through
``_Measure.observe_grads``, without importing this module.

``memory_report(step, params, opt_state, batch)`` runs ``step.step`` once (results dropped;
``step`` is pure, so nothing is changed) and reports, for this rank:

* model state: bytes of ``params``, ``opt_state`` and the grads the optimizer update reads
  (local shards only; live tensors, each storage once, ``fs.tree.nbytes``);
* the grads backward produced (the peak of one ``grad_fn`` call's grads: full-size unless
  ``fs.zero(..., gather="blocks")`` at stage 2 or 3);
* the peak of saved activations: storages packed for backward by autograd's saved-tensor
  hooks and still alive, each storage once (a view counts its whole storage); params
  (autograd leaves that require grad) and gathered params excluded. A remat region counts
  its inputs (what it keeps); values a selective-checkpoint policy caches bypass the hooks
  and are not included (``fs.print_saved_activations`` lists them);
* the peak of gathered full params alive at once (``fs.zero`` at stage 3);
* communication by collective, in **logical bytes per rank** for N ranks in the
  collective's group and B bytes of its input on this rank: all-reduce ``2B(N-1)/N``,
  all-gather ``B(N-1)`` (the output's ``(N-1)/N``), reduce-scatter and all-to-all
  ``B(N-1)/N``, broadcast and send ``B``. This is the ring algorithm's traffic, the ZeRO
  paper's unit (DP ≈ 2Ψ, ZeRO-3 ≈ 3Ψ, times (N-1)/N), independent of how a backend runs it
  (gloo emulates reduce-scatter with an all-reduce). Padding of uneven shards is included.
  Every collective dispatched through torch's c10d ops counts, whoever issued it.
* for a step over ``fs.pipeline`` (``fs.train_step`` of a pipeline's grad function): one
  :class:`StageMemory` per stage this rank runs, in ``MemoryReport.stages``: the peak of
  the activations that stage's forwards saved (the rule above, attributed to the stage
  whose action was running), the peak of received activations it held (from their forward
  until their backward, or until their weight-gradient action under zero bubble), and the
  bytes and messages it sent and received point to point (activations, their gradients and
  tied-weight gradients, headers included; the first call's shape probe excluded). The
  pipeline reports them through ``_context.MEMORY_MEASURE`` (``_Measure.enter_stage`` and
  ``_Measure.observe_stage``), as ``fs.zero`` reports its grads.

Example:
    >>> import torch, fsharding as fs
    >>> from fsharding import optim
    >>> step = fs.train_step(fs.value_and_grad(lambda p, x: (p["w"] * x).sum()), optim.adam(0.1))
    >>> params, opt_state = step.init({"w": torch.ones(256)})
    >>> r = fs.memory_report(step, params, opt_state, torch.ones(256))
    >>> r.params, r.grads, r.opt_state  # adam's state: mu and nu
    (1024, 1024, 2048)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fsharding import _context
from fsharding import tree as _tree
from fsharding.parallel import gather as _gather

__all__ = ["MemoryReport", "StageMemory", "memory_report"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """One pipeline stage's activations and point-to-point traffic in one step.

    Attributes:
        stage: the stage's global index.
        saved_activations: peak bytes its forwards saved for backward (params and received
            activations, autograd leaves, excluded).
        received_activations: peak bytes of received activations it held at once.
        p2p_sent: bytes it sent to other ranks (activations forward, gradients back, tied
            gradients; message headers included).
        p2p_received: bytes it received from other ranks.
        messages_sent: messages sent (each a header and the tensors of one pytree).
        messages_received: messages received.
    """

    stage: int
    saved_activations: int
    received_activations: int
    p2p_sent: int
    p2p_received: int
    messages_sent: int
    messages_received: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-rank memory and communication of one step; ``str(report)`` is a table.

    Attributes:
        rank: this process's global rank (0 without a process group).
        world_size: the number of processes.
        params: bytes of the params this rank holds.
        grads: bytes of the grads the optimizer update reads on this rank.
        opt_state: bytes of the optimizer state this rank holds.
        backward_grads: peak bytes of the grads one ``grad_fn`` call returned.
        saved_activations: peak bytes saved for backward (params excluded).
        gathered_params: peak bytes of all-gathered full params alive at once.
        comm_bytes: logical bytes per rank by collective (``"all_reduce"``,
            ``"all_gather"``, ``"reduce_scatter"``, ...).
        comm_calls: number of calls by collective.
        stages: for a step over ``fs.pipeline``, a :class:`StageMemory` per stage this rank
            runs, by global stage index (empty otherwise).
    """

    rank: int
    world_size: int
    params: int
    grads: int
    opt_state: int
    backward_grads: int
    saved_activations: int
    gathered_params: int
    comm_bytes: Mapping[str, int]
    comm_calls: Mapping[str, int]
    stages: Mapping[int, StageMemory] = dataclasses.field(default_factory=dict)

    @property
    def model_state(self) -> int:
        """``params + grads + opt_state``: ANCHORS.md's model state per rank."""
        return self.params + self.grads + self.opt_state

    @property
    def comm_total(self) -> int:
        """All logical communication bytes of the step on this rank."""
        return sum(self.comm_bytes.values())

    def __str__(self) -> str:
        rows = [
            ("params", self.params),
            ("grads (optimizer input)", self.grads),
            ("optimizer state", self.opt_state),
            ("model state", self.model_state),
            ("grads from backward (peak)", self.backward_grads),
            ("saved activations (peak)", self.saved_activations),
            ("gathered params (peak)", self.gathered_params),
        ]
        lines = [f"memory_report: rank {self.rank} of {self.world_size}, one step"]
        lines += [f"  {name:<28}{_fmt(n):>12}" for name, n in rows]
        lines.append("communication (logical bytes per rank)")
        lines.append(f"  {'collective':<18}{'calls':>8}{'bytes':>14}")
        for kind in sorted(self.comm_bytes):
            lines.append(f"  {kind:<18}{self.comm_calls[kind]:>8}{_fmt(self.comm_bytes[kind]):>14}")
        lines.append(
            f"  {'total':<18}{sum(self.comm_calls.values()):>8}{_fmt(self.comm_total):>14}"
        )
        if self.stages:
            lines.append("pipeline stages (peaks; point-to-point bytes and messages)")
            lines.append(
                f"  {'stage':<7}{'saved act':>12}{'received act':>14}"
                f"{'p2p sent':>12}{'p2p recv':>12}{'msgs':>10}"
            )
            for k in sorted(self.stages):
                st = self.stages[k]
                lines.append(
                    f"  {k:<7}{_fmt(st.saved_activations):>12}"
                    f"{_fmt(st.received_activations):>14}{_fmt(st.p2p_sent):>12}"
                    f"{_fmt(st.p2p_received):>12}"
                    f"{f'{st.messages_sent}/{st.messages_received}':>10}"
                )
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def memory_report(step: Any, params: PyTree, opt_state: Any, batch: Any) -> MemoryReport:
    """Runs one step and reports this rank's memory and communication.

    Under several processes every rank must call it (it runs a step). The step's results
    are dropped: ``params`` and ``opt_state`` are not changed (not donated).

    Args:
        step: a ``Step`` from ``fs.train_step`` or ``fs.zero``.
        params: params as ``step.init`` returned them.
        opt_state: its optimizer state.
        batch: one (rank-local) batch.

    Returns:
        A :class:`MemoryReport` for this rank.

    Example:
        >>> import torch, fsharding as fs
        >>> from fsharding import optim
        >>> step = fs.train_step(fs.value_and_grad(lambda p, x: (p @ x).sum()), optim.sgd(0.1))
        >>> params, opt_state = step.init(torch.ones(4, 4))
        >>> r = fs.memory_report(step, params, opt_state, torch.ones(4, 8))
        >>> r.saved_activations, r.comm_total  # x saved for p's grad; one process
        (128, 0)
    """
    if not hasattr(step, "step") or not callable(step.step):
        raise TypeError(
            f"fs.memory_report: step must be the Step of fs.train_step or fs.zero, got "
            f"{type(step).__name__}."
        )
    measure = _Measure(params)
    token = _context.MEMORY_MEASURE.set(measure)
    try:
        with contextlib.ExitStack() as stack:
            tracker = stack.enter_context(_gather.track_gathered())
            measure.tracker = tracker
            stack.enter_context(measure.comm)
            stack.enter_context(_GradCapture(measure))
            stack.enter_context(
                torch.autograd.graph.saved_tensors_hooks(measure.pack, measure.unpack)
            )
            out = step.step(params, opt_state, batch)
        del out
    finally:
        _context.MEMORY_MEASURE.reset(token)
    initialized = dist.is_available() and dist.is_initialized()
    return MemoryReport(
        rank=dist.get_rank() if initialized else 0,
        world_size=dist.get_world_size() if initialized else 1,
        params=_tree.nbytes(params),
        grads=measure.grads if measure.grads is not None else measure.backward_grads,
        opt_state=_tree.nbytes(opt_state),
        backward_grads=measure.backward_grads,
        saved_activations=measure.saved_peak,
        gathered_params=tracker.peak,
        comm_bytes=dict(measure.comm.bytes),
        comm_calls=dict(measure.comm.calls),
        stages={
            k: StageMemory(
                stage=k,
                saved_activations=measure.stage_peak.get(k, 0),
                **{f: measure.stage_io[k].get(f, 0) for f in _STAGE_IO},
            )
            for k in sorted(measure.stage_io)
        },
    )


_STAGE_IO = (
    "received_activations",
    "p2p_sent",
    "p2p_received",
    "messages_sent",
    "messages_received",
)


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------


class _Saved:
    """What the pack hook stores: the tensor, and its storage's release on drop."""

    __slots__ = ("t", "key", "measure")

    def __init__(self, t: torch.Tensor, key: Any, measure: _Measure):
        self.t, self.key, self.measure = t, key, measure

    def __del__(self) -> None:
        if self.key is not None:
            self.measure.release(self.key)


class _Measure:
    """One report's counters (in force as ``_context.MEMORY_MEASURE`` while it measures)."""

    def __init__(self, params: PyTree):
        self.param_keys = {
            _storage_key(_tree.local_tensor(x))
            for x in optree.tree_leaves(params)
            if isinstance(x, torch.Tensor)
        }
        self.tracker: _gather.LiveBytes | None = None
        self.comm = _CommCounter()
        self.refs: dict[Any, list[int]] = {}  # storage -> [count, nbytes]
        self.saved_now = self.saved_peak = 0
        self.backward_grads = 0
        self.grads: int | None = None
        self.zero_reported = False
        self.stage: int | None = None  # the pipeline stage whose action runs now
        self.stage_now: dict[int, int] = {}
        self.stage_peak: dict[int, int] = {}
        self.stage_io: dict[int, dict[str, int]] = {}

    def enter_stage(self, stage: int | None) -> int | None:
        """Called by ``fs.pipeline`` around each action: saved tensors packed from now on
        count for ``stage``; returns the stage before (to restore)."""
        before, self.stage = self.stage, stage
        return before

    def observe_stage(self, stage: int, io: Mapping[str, int]) -> None:
        """Called by ``fs.pipeline`` after a call: a stage's received-activation peak and
        its point-to-point bytes and messages (added up over calls; peaks maxed)."""
        mine = self.stage_io.setdefault(stage, {})
        for name, value in io.items():
            if name == "received_activations":
                mine[name] = max(mine.get(name, 0), value)
            else:
                mine[name] = mine.get(name, 0) + value

    def observe_grads(self, grads: list[Any], *, reduced: bool = False) -> None:
        """Called by a step that reports its grads (``fs.zero``): the grads ``grad_fn``
        returned, then (``reduced=True``) the grads the optimizer update reads."""
        if reduced:
            self.grads = _tree.nbytes(grads)
        else:
            self.zero_reported = True
            self.backward_grads = max(self.backward_grads, _tree.nbytes(grads))

    def pack(self, t: torch.Tensor) -> _Saved:
        key = _storage_key(t)
        base = t._base if t._base is not None else t
        skip = (
            key is None
            or key in self.param_keys
            or (base.is_leaf and base.requires_grad)  # what is differentiated: params
            or (self.tracker is not None and self.tracker.holds(t))
        )
        if skip:
            return _Saved(t, None, self)
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [0, t.untyped_storage().nbytes(), self.stage]
            self.saved_now += entry[1]
            self.saved_peak = max(self.saved_peak, self.saved_now)
            if self.stage is not None:
                now = self.stage_now[self.stage] = self.stage_now.get(self.stage, 0) + entry[1]
                self.stage_peak[self.stage] = max(self.stage_peak.get(self.stage, 0), now)
        entry[0] += 1
        return _Saved(t, key, self)

    def unpack(self, saved: _Saved) -> torch.Tensor:
        return saved.t

    def release(self, key: Any) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.saved_now -= entry[1]
            if entry[2] is not None:
                self.stage_now[entry[2]] -= entry[1]
            del self.refs[key]


def _storage_key(t: Any) -> Any:
    """``tree.storage_key`` of a plain tensor; None for subclasses (DTensor, Parameter, ...)."""
    return _tree.storage_key(t) if type(t) is torch.Tensor else None


class _GradCapture(TorchFunctionMode):
    """Bytes of the grads ``torch.autograd.grad`` returns (for steps that do not report
    their grads, e.g. ``fs.train_step``)."""

    def __init__(self, measure: _Measure):
        super().__init__()
        self.measure = measure

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        if func is torch.autograd.grad and not self.measure.zero_reported:
            n = _tree.nbytes([g for g in out if isinstance(g, torch.Tensor)])
            self.measure.backward_grads = max(self.measure.backward_grads, n)
        return out


# --------------------------------------------------------------------------------------
# communication
# --------------------------------------------------------------------------------------

_INPUT_ARGS = ("input", "input_tensor", "input_tensors", "tensors", "tensor", "self")
_KINDS = (
    ("reduce_scatter", "reduce_scatter"),
    ("allreduce", "all_reduce"),
    ("all_reduce", "all_reduce"),
    ("allgather", "all_gather"),
    ("all_gather", "all_gather"),
    ("alltoall", "all_to_all"),
    ("all_to_all", "all_to_all"),
    ("broadcast", "broadcast"),
    ("send", "send"),
)
_IGNORED = ("wait", "barrier", "recv")  # no payload of their own (recv: counted by send)


class _CommCounter(TorchDispatchMode):
    """Counts c10d collectives (``torch.ops.c10d`` and ``_c10d_functional``) as they are
    dispatched: calls and logical bytes per rank."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        name = getattr(getattr(func, "_schema", None), "name", "")
        if "c10d" in name.split("::")[0]:
            self._count(func, name.split("::")[-1], args, kwargs)
        return func(*args, **kwargs)

    def _count(self, func: Any, op: str, args: tuple, kwargs: dict) -> None:
        if any(w in op for w in _IGNORED):
            return
        kind = next((k for pattern, k in _KINDS if pattern in op), op.rstrip("_"))
        schema = func._schema.arguments
        bound = {
            a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema)
        }
        payload = next((bound[n] for n in _INPUT_ARGS if bound.get(n) is not None), None)
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(payload))
        n = _group_size(bound)
        if kind == "all_reduce":
            logical = 2 * nbytes * (n - 1) // n
        elif kind == "all_gather":
            logical = nbytes * (n - 1)
        elif kind in ("reduce_scatter", "all_to_all"):
            logical = nbytes * (n - 1) // n
        else:
            logical = nbytes if n > 1 else 0
        self.bytes[kind] = self.bytes.get(kind, 0) + logical
        self.calls[kind] = self.calls.get(kind, 0) + 1


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _group_size(bound: dict[str, Any]) -> int:
    if isinstance(bound.get("group_size"), int):
        return bound["group_size"]
    pg = bound.get("process_group")
    if pg is not None and hasattr(pg, "size"):
        return pg.size()
    name = bound.get("group_name")
    if name is not None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(name).size()
    return dist.get_world_size() if dist.is_initialized() else 1
