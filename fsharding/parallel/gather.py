"""``fs.gather``: ZeRO-3 one block at a time (FSDP's unit, the functional way).

Under ``fs.zero(..., stage=3, gather="blocks")`` the gradient function receives the
rank-local dim-0 shards of the params (plain tensors) and ``fs.zero`` binds a
:class:`Sharding` that says, per shard storage, where its rows live. Then
``gather(block)(block_params, *args)``:

* forward: all-gathers the sharded leaves of ``block_params`` (one autograd op, one
  bucketed all-gather per dtype) and calls ``block`` on full tensors;
* backward: reduce-scatters (sums) the full grads back to this rank's rows, so the grads
  of ``grad_fn`` come out already sharded, block by block, during backward (fs.zero then
  divides by the data-parallel size).

At stage 2 (``gather="blocks"``) the full params are held on every rank: the forward reads
them without communicating and the backward reduce-scatters as above (no full-size
gradient). Leaves that are not shards (replicated scalars, buffers, activations) pass
through, and outside such a step ``gather`` calls ``block`` unchanged (a local mesh,
``fs.train_step``, ``fs.zero`` with ``gather="boundary"``).

``remat(gather(block))`` runs the all-gather inside the remat region: the gathered params
are consumed there and not saved, and backward recomputes the region, all-gather
included, so full params exist for one block at a time (SimpleFSDP). ``gather(block)``
without remat keeps its full params alive until backward (they are saved for it), unless
``gather(block, reshard_after_forward=True)`` (FSDP2's default): then saved-tensor hooks keep
references to the full params instead, the block's full params are freed when it returns,
and backward all-gathers them again (once per block, when it first needs them; with NCCL
the next block's all-gather is prefetched): one block's full params at a time (two with the
prefetch) without recomputing the block, for a third collective per block. The
policies of ``fs.policies`` never save the collective's outputs (they save matmuls or named
values), so each recomputes it; ``everything_saveable`` does not checkpoint at all.

Under ``fs.amp`` outside the block, a cast of a shard is recognised (its autograd graph
leads to the shard): the shard is all-gathered in the compute dtype and its grads are
reduce-scattered in the param dtype (FSDP2's ``param_dtype`` / ``reduce_dtype``).

``fs.functional(model, wrap={Block: lambda f: fs.remat(fs.gather(f))})`` marks those blocks
as gather-owned (the ``_fs_gathers`` attribute, kept by ``functools.wraps`` through remat,
amp and offload); its ``apply`` gathers the other params (embeddings, head, final norm)
once on entry, with the same autograd all-gather, and keeps them until backward.

This module owns all of ``fs.gather``:

* :func:`gather`, the public transform;
* :class:`Sharding`, what ``fs.zero(gather="blocks")`` binds in ``_context.SHARDING`` while
  ``grad_fn`` runs (:func:`call_sharded`), and :func:`gather_list`, the autograd all-gather
  of the shards found in a list of leaves (bucketed by ``parallel/_buckets``);
* the saved-tensor hooks of ``reshard_after_forward=True`` (``_Reshard``);
* the apply-entry gather of ``fs.functional`` (:meth:`Sharding.gather_unowned`, which
  :func:`marks_gather` tells which blocks gather their own params);
* :class:`LiveBytes`, the gathered full params alive, which ``fs.memory_report`` reads
  (:func:`track_gathered`; ``fs.zero`` finds it with :func:`current_tracker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, overload

import optree
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.multiprocessing.reductions import StorageWeakRef

from fsharding import _context
from fsharding import tree as _tree
from fsharding._compat import settle, top_saved_tensors_hooks
from fsharding.parallel import _buckets as _lay
from fsharding.transforms import remat as _remat

__all__ = ["gather"]

Axis = str | tuple[str, ...]
F = TypeVar("F", bound=Callable[..., Any])

_SHARDING = _context.SHARDING
_TRACKER = _context.GATHERED_TRACKER
_CASTS = frozenset({"ToCopyBackward0", "AliasBackward0"})  # what fs.amp does to a param


@overload
def gather(block_fn: F, /, *, axis: Axis = "dp", reshard_after_forward: bool = False) -> F: ...


@overload
def gather(
    block_fn: None = None, /, *, axis: Axis = "dp", reshard_after_forward: bool = False
) -> Callable[[F], F]: ...


def gather(
    block_fn: Callable[..., Any] | None = None,
    /,
    *,
    axis: Axis = "dp",
    reshard_after_forward: bool = False,
) -> Any:
    """All-gathers a block's params on entry; reduce-scatters their grads in backward.

    Args:
        block_fn: ``block_fn(block_params, *args, **kwargs)``; ``block_params`` (the first
            positional argument) is any pytree. Omit it to get a transform
            (``fs.gather(axis="shard")``).
        axis: the mesh axis the params are sharded over: ``fs.zero``'s ``axis`` (for a tuple
            ``axis=("replicate", "shard")``, its last entry or the same tuple).
        reshard_after_forward: free the full params when the block returns and all-gather
            them again when backward first needs them (FSDP2's default), instead of keeping
            them saved for backward. Full params then exist for one block at a time without
            recomputing the block (``remat(gather(block))`` recomputes it). Costs one more
            all-gather per block per step (ZeRO-3's 3Ψ). No effect inside a remat region
            (nothing is saved there) or at stage 2 (full params are held anyway).

    Returns:
        A function with ``block_fn``'s signature. Inside ``fs.zero(..., stage=3,
        gather="blocks")`` it gathers (at stage 2 it reads the held full params and
        reduce-scatters their grads); elsewhere it is ``block_fn``.

    Raises:
        ValueError: (when called in a sharded step) ``axis`` is not an axis of the mesh, or
            not the axis ``fs.zero`` shards over.

    Example:
        >>> import torch, fsharding as fs
        >>> block = lambda p, x: torch.tanh(x @ p["w"])
        >>> f = fs.remat(fs.gather(block))  # outside fs.zero: block itself
        >>> f({"w": torch.eye(2)}, torch.ones(1, 2)).shape
        torch.Size([1, 2])
        >>> g = fs.gather(block, reshard_after_forward=True)  # FSDP2's memory, no recompute
    """
    _check_axis_arg(axis)
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(
            "fs.gather: reshard_after_forward must be True or False, got "
            f"{reshard_after_forward!r}."
        )
    if block_fn is None:
        transform = functools.partial(
            gather, axis=axis, reshard_after_forward=reshard_after_forward
        )
        transform._fs_gathers = True  # type: ignore[attr-defined]
        return transform
    if not callable(block_fn):
        raise TypeError(
            f"fs.gather: block_fn must be callable, got {type(block_fn).__name__}; use "
            "fs.gather(block) or fs.gather(axis=...)(block)."
        )

    # The closure refers to module-level names only (no ContextVar), so cloudpickle can
    # send a gathered block defined in __main__ or a notebook by value (fs.launch).
    @functools.wraps(block_fn)
    def gathered(block_params: Any, *args: Any, **kwargs: Any) -> Any:
        return _call_gathered(block_fn, axis, reshard_after_forward, block_params, args, kwargs)

    gathered._fs_gathers = True  # type: ignore[attr-defined]  # kept by functools.wraps
    return gathered


gather._fs_gathers = True  # type: ignore[attr-defined]  # wrap={Block: fs.gather}
gather._fs_transform = True  # type: ignore[attr-defined]  # fs.remat(fs.gather) composes


def _call_gathered(
    block_fn: Callable[..., Any],
    axis: Axis,
    reshard_after_forward: bool,
    block_params: Any,
    args: tuple,
    kwargs: dict[str, Any],
) -> Any:
    sharding = _SHARDING.get()
    if sharding is None:
        return block_fn(block_params, *args, **kwargs)
    sharding.check_axis(axis, "fs.gather")
    reshard = _Reshard.wanted(sharding) if reshard_after_forward else None
    leaves, treedef = optree.tree_flatten(block_params)
    block_params = optree.tree_unflatten(treedef, gather_list(sharding, leaves, reshard))
    del leaves
    if reshard is None or not reshard.index:
        return block_fn(block_params, *args, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(reshard.pack, reshard.unpack):
        return block_fn(block_params, *args, **kwargs)


def _check_axis_arg(axis: Any) -> None:
    ok = isinstance(axis, str) or (
        isinstance(axis, tuple) and axis and all(isinstance(a, str) for a in axis)
    )
    if not ok:
        raise TypeError(
            f"fs.gather: axis must be a mesh axis name (str) or a tuple of them, got {axis!r}."
        )


# --------------------------------------------------------------------------------------
# what fs.zero binds while grad_fn runs
# --------------------------------------------------------------------------------------


class LiveBytes:
    """Bytes of gathered full params alive now, and the peak (storages checked when a
    gather allocates, which is when the peak can grow)."""

    def __init__(self) -> None:
        self._live: dict[tuple[torch.device, int], tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def add(self, tensors: list[torch.Tensor]) -> None:
        """Counts ``tensors`` (gathered full params, each its own storage) as alive."""
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        for t in tensors:
            key = _tree.storage_key(t)
            if key is not None:
                st = t.untyped_storage()
                self._live[key] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, self.current)

    @property
    def current(self) -> int:
        return sum(n for ref, n in self._live.values() if not ref.expired())

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in a gathered storage that is still alive."""
        key = _tree.storage_key(t)
        v = self._live.get(key) if key is not None else None
        return v is not None and not v[0].expired()


@contextlib.contextmanager
def track_gathered() -> Iterator[LiveBytes]:
    """Records the gathered full params of the steps run inside (``fs.memory_report``)."""
    tracker = LiveBytes()
    token = _TRACKER.set(tracker)
    try:
        yield tracker
    finally:
        _TRACKER.reset(token)


def current_tracker() -> LiveBytes | None:
    """The tracker of the innermost :func:`track_gathered`, else None."""
    return _TRACKER.get()


@dataclasses.dataclass(eq=False)
class Sharding:
    """Where the rank-local shards passed to ``grad_fn`` belong (bound by ``fs.zero``).

    Attributes:
        axis: the mesh axis the params are sharded over.
        axes: all data-parallel axes of the step (``axis`` last).
        mesh_axes: every axis of the mesh (for error messages).
        group: the process group of ``axis``.
        layouts: storage id of a local shard (``untyped_storage()._cdata``: shared by the
            detached aliases ``value_and_grad`` makes, distinct even for empty shards) ->
            its :class:`~fsharding.parallel._buckets.LeafLayout`.
        rank: this rank's index in ``group``.
        tracker: the :class:`LiveBytes` of ``fs.memory_report``, or None.
        gathers: how many gathers ran (:func:`call_sharded` checks that some did).
        fulls: at stage 2 (params stored full), storage id of a shard -> its full tensor:
            the forward "gather" reads it without communicating; backward reduce-scatters.
        last_reshard: a weakref to the latest ``_Reshard`` (``reshard_after_forward=True``
            call): the next call's keeps it, to prefetch its all-gather in backward.
    """

    axis: str
    axes: tuple[str, ...]
    mesh_axes: tuple[str, ...]
    group: Any
    layouts: dict[int, _lay.LeafLayout]
    rank: int
    tracker: LiveBytes | None = None
    gathers: int = 0
    fulls: dict[int, torch.Tensor] | None = None  # stage 2: the full params, held locally
    last_reshard: Any = None  # weakref to the latest gather(reshard_after_forward=True) call

    def gather_unowned(
        self,
        module: torch.nn.Module,
        wrapped: Mapping[str, tuple[torch.nn.Module, Callable[..., Any]]],
        tensors: dict[str, torch.Tensor],
        cache_key: Any,
    ) -> dict[str, torch.Tensor]:
        """For ``fs.functional``'s apply (which finds this sharding in
        ``_context.SHARDING``): gathers the entries of ``tensors`` (``module``'s params by
        name) that no gather-marked block of ``wrapped`` (submodule name -> (submodule,
        transform)) owns; those blocks gather their own. ``cache_key``: a weak-referenceable
        object alive as long as ``module`` and ``wrapped`` stay as they are (the apply's
        runner): which names are owned is computed once per key."""
        owned = _OWNED.get(cache_key)
        if owned is None:
            owned = _OWNED[cache_key] = _owned_names(module, wrapped)
        names = [k for k in tensors if k not in owned]
        out = dict(tensors)
        out.update(zip(names, gather_list(self, [tensors[k] for k in names])))
        return out

    def check_axis(self, axis: Axis, api: str) -> None:
        names = (axis,) if isinstance(axis, str) else axis
        for a in names:
            if a not in self.mesh_axes:
                raise ValueError(
                    f"{api}: unknown axis {a!r}; the mesh has axes {self.mesh_axes}. Pass the "
                    f"axis fs.zero shards over: axis={self.axis!r}."
                )
        if axis != self.axis and tuple(names) != self.axes:
            raise ValueError(
                f"{api}: axis={axis!r}, but fs.zero shards params over {self.axis!r}; pass "
                f"axis={self.axis!r}."
            )

    def find(self, t: Any) -> tuple[torch.Tensor, _lay.LeafLayout] | None:
        """``(shard, layout)`` if ``t`` is a shard, or a cast of one (fs.amp), else None."""
        if type(t) not in (torch.Tensor, torch.nn.Parameter):  # (not DTensor, not a leaf)
            return None
        src = t
        lay = self._layout(t)
        if lay is None:
            node, hops = t.grad_fn, 0
            while node is not None and node.name() in _CASTS and hops < 8:
                nxt = [f for f, _ in node.next_functions if f is not None]
                if len(nxt) != 1:
                    return None
                node, hops = nxt[0], hops + 1
            src = getattr(node, "variable", None)
            if src is None or hops == 0 or src.shape != t.shape:
                return None
            lay = self._layout(src)
        return None if lay is None else (src, lay)

    def _layout(self, t: torch.Tensor) -> _lay.LeafLayout | None:
        lay = self.layouts.get(t.untyped_storage()._cdata)
        if lay is None or tuple(t.shape) != lay.local_shape(self.rank):
            return None
        return lay if t.storage_offset() == 0 and t.is_contiguous() else None


@contextlib.contextmanager
def _bind_sharding(s: Sharding) -> Iterator[Sharding]:
    """Binds ``s`` while ``grad_fn`` runs (remat recomputation re-enters it by itself)."""
    token = _SHARDING.set(s)
    try:
        yield s
    finally:
        _SHARDING.reset(token)


_HOW = (
    "With gather='blocks' grad_fn gets rank-local shards: run the model through "
    "fs.functional(model, wrap={Block: lambda f: fs.remat(fs.gather(f))}) or wrap every use "
    "of params in fs.gather, or use gather='boundary'."
)


def call_sharded(s: Sharding, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with ``s`` bound (``fs.zero``'s ``gather="blocks"``); a
    function that never gathers raises (its grads would be those of the shards)."""
    with _bind_sharding(s):
        try:
            out = fn(*args, **kwargs)
        except (RuntimeError, IndexError) as e:  # what shape mismatches raise
            if s.gathers or not s.layouts:
                raise
            raise RuntimeError(
                f"fs.zero(gather='blocks'): grad_fn raised {type(e).__name__}: {e} before "
                f"gathering any params. {_HOW}"
            ) from e
    if s.layouts and not s.gathers:
        raise ValueError(f"fs.zero(gather='blocks'): grad_fn gathered no params. {_HOW}")
    return out


# --------------------------------------------------------------------------------------
# the autograd all-gather
# --------------------------------------------------------------------------------------


class _Plan:
    """One gather: buckets in the compute dtypes (forward) and the param dtypes (backward)."""

    def __init__(self, s: Sharding, found: list[tuple[torch.Tensor, _lay.LeafLayout]], dtypes):
        layouts = [lay for _, lay in found]
        self.group, self.rank, self.tracker = s.group, s.rank, s.tracker
        self.dtypes = dtypes
        self.param_dtypes = [lay.dtype for lay in layouts]
        self.fulls = None
        if s.fulls is not None:
            self.fulls = [s.fulls[src.untyped_storage()._cdata] for src, _ in found]
        fwd = [
            dataclasses.replace(x, index=i, dtype=d)
            for i, (x, d) in enumerate(zip(layouts, dtypes))
        ]
        bwd = [dataclasses.replace(x, index=i) for i, x in enumerate(layouts)]
        self.gather_buckets = _lay.make_buckets(fwd)
        self.scatter_buckets = _lay.make_buckets(bwd)


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows -> full tensors. Backward: reduce-scatter (sum) -> rows."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan = plan
        if plan.fulls is not None:  # stage 2: full params are here already
            return tuple(f.detach().to(d) for f, d in zip(plan.fulls, plan.dtypes))
        device = shards[0].device
        cast = [s.to(d) for s, d in zip(shards, plan.dtypes)]
        fulls = _lay.all_gather_buckets(plan.gather_buckets, cast, plan.group, device)
        if plan.tracker is not None:
            plan.tracker.add(fulls)
        return tuple(fulls)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        plan = ctx.plan
        g = [x.to(d) for x, d in zip(grads, plan.param_dtypes)]
        device = g[0].device
        return (None, *_lay.reduce_scatter_buckets(plan.scatter_buckets, g, plan.group, device))


def gather_list(s: Sharding, leaves: list[Any], reshard: _Reshard | None = None) -> list[Any]:
    """``leaves`` with every shard (or cast of one) replaced by its full tensor; with
    ``reshard``, it learns the full tensors (to pack them for backward as references)."""
    found = [(i, *hit) for i, x in enumerate(leaves) if (hit := s.find(x)) is not None]
    if not found:
        return list(leaves)
    plan = _Plan(s, [(src, lay) for _, src, lay in found], [leaves[i].dtype for i, _, _ in found])
    fulls = _GatherRows.apply(plan, *[src for _, src, _ in found])
    s.gathers += 1
    if reshard is not None:
        reshard.learn(plan, [src for _, src, _ in found], fulls)
    out = list(leaves)
    for (i, _, _), full in zip(found, fulls):
        out[i] = full
    return out


# --------------------------------------------------------------------------------------
# gather(block, reshard_after_forward=True): full params re-gathered in backward
# --------------------------------------------------------------------------------------
#
# Saved-tensor hooks installed around the block keep each saved view of a gathered full
# param as a reference (index, size, stride, offset); its first unpack in backward
# all-gathers the block's shards once more (one bucketed collective), later unpacks of the
# same block reuse that copy, and it is dropped when every reference has been unpacked.
# Saved tensors that are not gathered params go to the hook that was in force outside the
# block (fs.offload, fs.memory_report), so those keep working. Inside a remat region nothing
# is installed (checkpoint's hook must stay innermost, and the region saves no params).


class _Saved:
    """A saved view of a gathered full param, kept as a reference (no data)."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index: int, t: torch.Tensor):
        self.index, self.size, self.stride, self.offset = (
            index,
            t.size(),
            t.stride(),
            t.storage_offset(),
        )


class _Outer:
    """A saved tensor packed by the saved-tensor hook that was in force outside the block."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


# Backward prefetch: None = where the backend gathers into the output in place (NCCL). On
# gloo an all-gather in flight also holds gloo's own flattened input and output copies:
# prefetching one block there kept ~3 blocks' bytes more alive (GPT small: +11 MiB peak RSS
# per rank) for little overlap on CPU cores the compute already uses. (Tests set it.)
_PREFETCH: bool | None = None


def _prefetches(group: Any) -> bool:
    if _PREFETCH is not None:
        return _PREFETCH
    return dist.get_backend(group) != "gloo"


class _Reshard:
    """``gather(reshard_after_forward=True)``: saved-tensor hooks that keep views of the
    block's gathered full params as references and all-gather them again (once, for all of
    the block's params) when backward first unpacks one; the copy is dropped when backward
    has unpacked every reference. Other saved tensors go to the hook in force outside
    (``fs.offload``, ``fs.memory_report``), or are kept as usual.

    Backward prefetch (FSDP2's; not on gloo, see ``_PREFETCH``): when a block re-gathers,
    the all-gather of the block that ran before it in forward (next in backward) is launched
    without waiting, so it overlaps this block's backward; at most two blocks' full params
    exist at once. Every rank runs the same graph, so every rank launches the same
    collectives in the same order.
    """

    def __init__(self, outer: tuple[Callable, Callable] | None, prev: Any):
        self.outer = outer
        self.prev = prev  # weakref to the reshard of the block before, or None
        self.index: dict[tuple[torch.device, int], tuple[int, torch.dtype]] = {}
        self.plan: _Plan | None = None
        self.shards: list[torch.Tensor] = []
        self.cache: list[torch.Tensor] | None = None
        self.pending: list | None = None  # a launched (prefetched) all-gather
        self.packed = 0
        self.left = 0

    @staticmethod
    def wanted(s: Sharding) -> _Reshard | None:
        """A reshard for this call, or None where it has no effect (stage 2, no grad, or
        inside a checkpoint region, whose hook must stay innermost)."""
        if s.fulls is not None or not torch.is_grad_enabled() or _remat.in_remat():
            return None
        top = top_saved_tensors_hooks()
        name = getattr(top[0], "__qualname__", "") if top is not None else ""
        if name.startswith(("_checkpoint_hook.", "_recomputation_hook.")):
            return None
        r = _Reshard(top, s.last_reshard)
        s.last_reshard = weakref.ref(r)
        return r

    def learn(self, plan: _Plan, shards: list[torch.Tensor], fulls: tuple) -> None:
        if plan.fulls is not None or self.plan is not None:
            return
        self.plan, self.shards = plan, [t.detach() for t in shards]
        keys = [_tree.storage_key(f) for f in fulls]
        self.index = {k: (i, f.dtype) for i, (k, f) in enumerate(zip(keys, fulls)) if k is not None}

    def pack(self, t: torch.Tensor) -> Any:
        key = _tree.storage_key(t)  # None: empty, or no storage (tensor subclasses)
        hit = self.index.get(key) if key is not None else None
        if hit is not None and hit[1] == t.dtype:
            self.packed += 1
            self.left += 1
            return _Saved(hit[0], t)
        if self.outer is not None:
            return _Outer(self.outer[0](t))
        return t

    def unpack(self, x: Any) -> torch.Tensor:
        if isinstance(x, _Outer):
            return self.outer[1](x.value)  # type: ignore[index]
        if not isinstance(x, _Saved):
            return x
        fulls = self.cache
        if fulls is None:
            fulls = self.cache = self._regather()
        self.left -= 1
        if self.left <= 0:  # every reference unpacked: drop ours (a second backward regathers)
            self.cache, self.left = None, self.packed
        return fulls[x.index].as_strided(x.size, x.stride, x.offset)

    def _launch(self) -> None:
        plan = self.plan
        assert plan is not None
        with torch.no_grad():
            cast = [s.to(d) for s, d in zip(self.shards, plan.dtypes)]
            self.pending = _lay.start_all_gather(
                plan.gather_buckets, cast, plan.group, self.shards[0].device
            )
        if plan.tracker is not None:  # the buffers being gathered into count from now
            plan.tracker.add([out for _, out in self.pending])

    def _regather(self) -> list[torch.Tensor]:
        if self.pending is None:
            self._launch()
        pending, self.pending = self.pending, None
        fulls = _lay.finish_all_gather(pending, len(self.shards))  # type: ignore[arg-type]
        if self.plan.tracker is not None:  # type: ignore[union-attr]
            self.plan.tracker.add(fulls)  # type: ignore[union-attr]
        prev = self.prev() if self.prev is not None else None
        if (  # prefetch the next block of backward, if its backward has not started
            _prefetches(self.plan.group)  # type: ignore[union-attr]
            and prev is not None
            and prev.packed
            and prev.cache is None
            and prev.pending is None
            and prev.left == prev.packed
        ):
            prev._launch()
        return fulls

    def __del__(self) -> None:
        pending = getattr(self, "pending", None)
        if pending:  # prefetched but never needed (e.g. backward stopped early): finish it
            with contextlib.suppress(Exception):
                for _, out in pending:
                    torch.ops._c10d_functional.wait_tensor(out)
                # and let gloo's worker drop it now, not during interpreter exit
                settle([(out, 1) for _, out in pending if out.device.type == "cpu"])


# --------------------------------------------------------------------------------------
# fs.functional: params no gather-marked block owns are gathered on entry
# --------------------------------------------------------------------------------------

_OWNED: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def _owned_names(module: torch.nn.Module, wrapped: Mapping[str, tuple[Any, Any]]) -> frozenset[str]:
    """Param names of ``module`` used only inside wrapped blocks whose transform gathers."""
    prefixes = tuple(name + "." for name, (sub, t) in wrapped.items() if marks_gather(t, sub))
    if not prefixes:
        return frozenset()
    aliases: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    owned = [ns for ns in aliases.values() if all(n.startswith(prefixes) for n in ns)]
    return frozenset(n for ns in owned for n in ns)


def _probe_for(block: torch.nn.Module | None) -> Callable[..., Any]:
    """A stand-in for the function ``fs.functional`` passes to a wrap transform: for a
    ``block``, with its forward's name, docstring and signature (``functools.wraps``), as
    the real one has."""

    def probe(block_params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    if block is not None:
        functools.update_wrapper(probe, type(block).forward)
    return probe


def marks_gather(transform: Callable[..., Any], block: torch.nn.Module | None = None) -> bool:
    """Whether ``transform(block_fn)`` gathers: the ``_fs_gathers`` mark, kept by
    functools.wraps through remat, amp and offload, on the transform or on what it returns
    for a stand-in of ``block``'s function. Returning a function without the mark is the one
    "does not gather"; an exception is the transform's own and propagates (with a note)."""
    if getattr(transform, "_fs_gathers", False):
        return True
    try:
        wrapped = transform(_probe_for(block))
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            where = f" of {type(block).__name__}" if block is not None else ""
            e.add_note(
                f"(raised by the fs.functional(wrap=...) transform{where}, applied by "
                "fs.zero(..., gather='blocks') to the block's function to learn whether it "
                "gathers the block's params with fs.gather)"
            )
        raise
    return bool(getattr(wrapped, "_fs_gathers", False))
