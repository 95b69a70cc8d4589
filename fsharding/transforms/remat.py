"""Activation checkpointing: ``fs.remat`` and ``fs.checkpoint_name``.

Owns the remat region: how it runs under torch's checkpoint, the dispatch mode that
offloads, measures and guards state inside it, and what an op writes (read from its
schema). The policies it asks live in :mod:`fsharding.transforms.policies`.

``remat(f, policy=...)`` runs ``f`` under ``torch.utils.checkpoint.checkpoint`` (non-reentrant,
RNG state preserved) with a selective-checkpoint context built from the policy: the values
the policy saves are cached, the rest is recomputed in backward by running ``f`` again.
Values, gradients and dropout masks are bitwise those of ``f``.

What fsharding adds around torch's checkpoint:

* pytree arguments: every tensor leaf of ``args`` and ``kwargs`` becomes a top-level
  checkpoint input, so the region's inputs are saved through saved-tensor hooks (an outer
  ``fs.offload`` moves them; nested leaves are not held by a hidden reference), and the
  device whose RNG state is preserved is found;
* offloading: values a policy answers ``fs.policies.Offloadable`` are copied to host memory
  when computed and copied back when recomputation reaches them (torch's ``*_CPU_OFFLOAD``
  policies act only under ``torch.compile``);
* state: recomputation never writes tensors made outside the region (BatchNorm running
  stats, ``num_batches_tracked``, caches, workspaces): the first write to such a storage
  makes a private copy of it, and the rest of the recomputation reads and writes the copy.
  State is updated once, by the forward (a dispatch mode during recomputation; a write it
  cannot see, by compiled code or inside an op's kernel, is not redirected). The mode
  costs a Python call per op, so it is left out where it cannot matter
  (``_Frame.guards_recompute``): under a selective policy after a forward that wrote
  nothing in place; for a block of ``fs.functional(model, wrap=...)``, whose caller knows
  the state (its params, buffers and the plain tensors its modules hold as attributes --
  counters, caches -- directly or in a list, tuple or dict attribute, declared through
  ``_context.REGION_STATE``), after a forward that wrote none of them and, under a
  selective policy (which sees every forward op), no other tensor. Full remat of such a
  block does not watch tensors it reaches only as globals or by closure: hold them as
  module attributes or buffers, or use a selective policy;
* a Hugging Face KV cache argument (``use_cache=True``) is updated by the forward only: a
  recomputation runs on a copy of the cache's structure as it was when the region started
  (``fsharding._replay``; a cache written in place raises instead of giving wrong grads);
* the forward's context variables and ``fs.amp`` op rule are in force again during
  recomputation, so ``amp(remat(f))`` recomputes in the forward's precision;
* :func:`in_remat` tells other transforms that they run inside a region (``fs.offload``
  inside ``remat`` steps aside: checkpoint's saved-tensor hook must stay innermost).

torch.compile: ``torch.compile(remat(f))`` works; ``remat(torch.compile(f))`` runs torch's
checkpoint alone (fsharding's mode would make compiled code fall back to eager): offloading
and state protection do not apply inside it. A compiled function deeper inside a region is
compiled in the forward only (checkpoint then sees other saved tensors): compile the
region's function itself or code around it.

Composition: ``offload(remat(f))`` keeps only the region's inputs, on the offload target;
``remat(gather(block))`` re-gathers params in backward; ``remat(amp(f))`` and
``amp(remat(f))`` recompute in the same precision as the forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

import optree
import torch
from torch import nn
from torch.utils import checkpoint as _ckpt
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from fsharding import _context, _replay
from fsharding import tree as _tree
from fsharding.transforms import amp as _amp
from fsharding.transforms import policies as _policies
from fsharding.transforms.policies import Offloadable

__all__ = ["remat", "checkpoint_name"]

_F = TypeVar("_F", bound=Callable[..., Any])

# The remat regions whose function is running on this thread, innermost last.
_FRAMES = _context.REMAT_FRAMES
# Set by fsharding.introspect while it measures saved activations (forward only).
_RECORDER = _context.SAVED_RECORDER


def in_remat() -> bool:
    """True while the function of a remat region runs: its forward or its recomputation.

    Transforms that install saved-tensor hooks (``fs.offload``) check it and step aside:
    only the innermost hook runs, and it must be checkpoint's.
    """
    return bool(_FRAMES.get())


def checkpoint_name(x: torch.Tensor, name: str) -> torch.Tensor:
    """Tags ``x`` with ``name`` so name-based remat policies can save or offload it.

    The identity in value and gradient (JAX's ``checkpoint_name``). Inside a remat region
    whose policy reads names it returns a copy of ``x`` made by the op
    ``torch.ops.fsharding.checkpoint_name`` (what the policy sees); elsewhere it returns
    ``x`` itself. Do not modify the result in place.

    Args:
        x: a tensor.
        name: the name policies refer to.

    Returns:
        ``x`` (or a copy of it).

    Example:
        >>> import torch, fsharding as fs
        >>> policy = fs.policies.save_only_these_names("h")
        >>> f = fs.remat(lambda x: fs.checkpoint_name(x.sin(), "h").cos().sum(), policy=policy)
        >>> f(torch.ones(2, requires_grad=True)).item() == torch.ones(2).sin().cos().sum().item()
        True
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"fs.checkpoint_name: x must be a torch.Tensor, got {type(x).__name__}; tag each "
            "tensor separately."
        )
    if not isinstance(name, str):
        raise TypeError(
            f"fs.checkpoint_name: name must be a str, got {name!r} ({type(name).__name__})."
        )
    frames = _FRAMES.get()
    if all(f.name_blind for f in frames):
        return x
    return _NAME_OP(x, name)


# --------------------------------------------------------------------------------------
# remat
# --------------------------------------------------------------------------------------


@overload
def remat(fn: _F, /, *, policy: Callable[..., Any] | None = None) -> _F: ...


@overload
def remat(
    fn: None = None, /, *, policy: Callable[..., Any] | None = None
) -> Callable[[_F], _F]: ...


def remat(fn: Callable[..., Any] | None = None, /, *, policy: Callable[..., Any] | None = None):
    """Activation checkpointing: ``fn`` keeps only what ``policy`` saves; backward recomputes.

    Args:
        fn: any function of pytrees of tensors (positional and keyword arguments); it may
            return any pytree. Omit it to get a decorator.
        policy: a policy from ``fs.policies`` (or any ``policy(op, *args, **kwargs) ->
            bool | Offloadable``). Default ``nothing_saveable``: only ``fn``'s inputs are
            kept. ``everything_saveable`` calls ``fn`` unchanged.

    Returns:
        A function with ``fn``'s signature, values and gradients.

    Raises:
        TypeError: ``fn`` is not callable or is an ``nn.Module`` (use ``fs.functional``),
            or ``policy`` is not a policy (e.g. a factory such as ``save_only_these_names``
            that was not called).

    Example:
        >>> import torch, fsharding as fs
        >>> @fs.remat(policy=fs.policies.dots_saveable)
        ... def block(w, x):
        ...     return torch.tanh(x @ w).sum()
        >>> loss, g = fs.value_and_grad(block)(torch.eye(2), torch.ones(3, 2))
        >>> g.shape
        torch.Size([2, 2])
    """
    policy = _check_policy(policy)
    if fn is None:
        return functools.partial(remat, policy=policy)
    if not callable(fn):
        raise TypeError(
            f"fs.remat: fn must be callable, got {type(fn).__name__}; use fs.remat(f, "
            "policy=...) or @fs.remat(policy=...)."
        )
    if isinstance(fn, torch.nn.Module):
        raise TypeError(
            f"fs.remat: fn is a torch.nn.Module ({type(fn).__name__}); remat transforms "
            "functions of explicit params. Wrap its blocks: apply, params = "
            "fs.functional(model, wrap={Block: fs.remat(policy=...)}), or the whole model: "
            "apply, params = fs.functional(model); fs.remat(apply, policy=...)(params, x)."
        ) from None
    if getattr(fn, "_fs_transform", False):
        # remat of a transform (e.g. fs.remat(fs.gather)) composes: block -> remat(t(block)).
        return lambda block: remat(fn(block), policy=policy)
    if policy is _policies.everything_saveable:

        @functools.wraps(fn)
        def plain(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return plain

    # A torch.compile'd fn would run eagerly under fsharding's dispatch mode in recompute only
    # and save other tensors than its compiled forward: it gets torch's checkpoint alone.
    compiled = hasattr(fn, "_torchdynamo_orig_callable")

    @functools.wraps(fn)
    def remat_fn(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        args, kwargs = _replay.protect(args, kwargs)  # a KV cache: updated by the forward only
        leaves, treedef = optree.tree_flatten((args, kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        tensors = [leaves[i] for i in slots]
        for i in slots:  # tensors travel as checkpoint inputs only, never by closure
            leaves[i] = None
        frame = _Frame(policy, compiled)

        def region(*inputs: torch.Tensor) -> Any:
            full = list(leaves)
            for i, t in zip(slots, inputs):
                full[i] = t
            a, k = _replay.resolve(*optree.tree_unflatten(treedef, full))
            return frame.run(fn, a, k)

        return _ckpt.checkpoint(
            region,
            *tensors,
            use_reentrant=False,
            preserve_rng_state=True,
            context_fn=frame.contexts,
        )

    return remat_fn


class _Frame:
    """One call of a remat'd function: its policy, offloaded values and forward context."""

    def __init__(self, policy: Callable[..., Any], compiled: bool = False):
        self.policy = policy
        self.compiled = compiled
        self.name_blind = any(policy is p for p in _NAME_BLIND)
        self.memo = _MEMO.setdefault(policy, {}) if policy in _BY_OP else None
        self.sac = policy is not _policies.nothing_saveable
        self.may_offload = not self.name_blind and not isinstance(
            policy, (_policies.SaveOnlyTheseNames, _policies.SaveAnyNamesButThese)
        )
        self.recorder = _RECORDER.get()
        self.context = contextvars.copy_context()
        self.amp_rules = _amp.recompute_context()  # fs.amp's op rules in force now
        self.calls = 0
        self.offloaded: dict[Any, list[Any]] = {}
        self.wrote = False  # the forward ran an op that may write in place
        self.state = _known_state()  # what the region may write, if known
        self.state_wrote = True
        self.wrote_undeclared = False  # a forward op wrote a tensor outside self.state
        self.declared: set[Any] | None = None  # storage keys of self.state
        # storages the forward made (known state only: a write to them is no state)
        self.made: set[Any] | None = set() if self.state is not None else None

    def contexts(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """checkpoint's ``context_fn``: (forward context, recompute context)."""
        fwd: list[Any] = []
        rec: list[Any] = []
        if not self.compiled:
            rec.append(_RegionMode(self, forward=False))
            if self.may_offload or self.recorder is not None:
                fwd.append(_RegionMode(self, forward=True))
        if self.sac:
            f, r = _ckpt.create_selective_checkpoint_contexts(self.sac_policy)
            fwd.append(f)  # entered last: the caching mode sees each op before ours
            rec.append(r)
        return _Entered(fwd), _Entered(rec)

    def guards_recompute(self) -> bool:
        """Whether recomputation runs under the state guard (``_RegionMode``): if the forward
        offloaded or was measured; else not if the caller's known state (:func:`_known_state`)
        was not written and (selective policies, which see every forward op) the forward
        wrote no other tensor in place; else always without selective checkpointing, and
        with it only if the forward ran an op that writes in place (torch's SAC mode refuses
        any op the forward did not run before it runs, so the guard would have nothing to
        redirect)."""
        if self.offloaded or self.recorder is not None:
            return True
        if self.state is not None:
            return self.state_wrote or self.wrote_undeclared
        return not self.sac or self.wrote

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.calls += 1
        if self.calls == 1:
            before = [t._version for t in self.state or ()]
            out = self._call(fn, args, kwargs, forward=True)
            self.state_wrote = [t._version for t in self.state or ()] != before
            return out
        return self.context.run(self._call, fn, args, kwargs, forward=False)

    def _call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, *, forward: bool) -> Any:
        token = _FRAMES.set((*_FRAMES.get(), self))
        try:
            with contextlib.ExitStack() as stack:
                if not forward:
                    stack.enter_context(self.amp_rules)
                elif self.recorder is not None:
                    # Measuring only (forward, never differentiated): see what the region
                    # would save, in place of checkpoint's hook.
                    hooks = torch.autograd.graph.saved_tensors_hooks
                    stack.enter_context(hooks(self.recorder.pack_in_region, lambda t: t))
                return fn(*args, **kwargs)
        finally:
            _FRAMES.reset(token)

    def decide(self, func: Any, args: tuple, kwargs: dict) -> Any:
        decision = self.policy(func, *args, **kwargs)
        if not isinstance(decision, (bool, Offloadable)):
            raise TypeError(
                f"fs.remat: policy {_policy_name(self.policy)} returned {decision!r} for "
                f"{func}; a policy must return True (save), False (recompute) or "
                "fs.policies.Offloadable(...)."
            )
        if decision is not False and _consumes_rng(func, args, kwargs):
            # recomputed from the replayed RNG state: a saved draw is skipped in recompute
            # and every later draw would get other random numbers (other dropout masks)
            return False
        return decision

    def sac_policy(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        """The policy in torch's selective-checkpoint vocabulary (offloading is ours). It
        sees every op of the forward, and notes one that may write."""
        memo = self.memo
        hit = memo.get(op) if memo is not None else None
        if hit is None:
            save = self.decide(op, args, kwargs) is True
            info = _OP_INFO.get(op) or _op_info(op)
            hit = (_SAVE if save else _RECOMPUTE, info is _PASS or bool(info[0]))
            if memo is not None and _SEEDED not in getattr(op, "tags", ()):  # seeded: by args
                memo[op] = hit
        made = self.made
        if made is not None and not self.wrote_undeclared and not ctx.is_recompute:
            info = _OP_INFO.get(op) or _op_info(op)
            out = getattr(ctx, "op_output", None)  # torch >= 2.5 asks after the op ran
            if info is not _PASS and info[1] and out is not None:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    made.add(_tree.storage_key(t))
        if hit[1]:
            if ctx.is_recompute and not self.wrote:
                # torch <= 2.11 asks the policy again in recompute and runs an op the
                # forward did not run; "save" makes it refuse this write (nothing cached) as
                # torch 2.13 does, which guards_recompute() counts on.
                return _SAVE
            self.wrote = True
            if self.state is not None and not self.wrote_undeclared and not ctx.is_recompute:
                self.wrote_undeclared = self._writes_undeclared(op, args, kwargs)
        return hit[0]

    def _writes_undeclared(self, op: Any, args: tuple, kwargs: dict) -> bool:
        """Whether ``op`` writes a tensor that is neither in the declared state nor made by
        the forward (e.g. dropout's mask, ``bernoulli_`` on a fresh tensor)."""
        if self.declared is None:
            self.declared = {_tree.storage_key(t) for t in self.state or ()}
        info = _OP_INFO.get(op) or _op_info(op)
        made = self.made or ()
        for i, name in info[0] if info is not _PASS else ():
            value = args[i] if i is not None and i < len(args) else kwargs.get(name)
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor):
                    key = _tree.storage_key(t)
                    if key is None or (key not in self.declared and key not in made):
                        return True
        return False


_SAVE, _RECOMPUTE = _ckpt.CheckpointPolicy.MUST_SAVE, _ckpt.CheckpointPolicy.PREFER_RECOMPUTE
# Built-in policies that decide by the op alone: (decision, may write) remembered per op.
_BY_OP = (_policies.dots_saveable, _policies.dots_with_no_batch_dims_saveable)
_MEMO: dict[Any, dict[Any, tuple[Any, bool]]] = {}
# Built-in policies that never look at names (checkpoint_name need not tag anything).
_NAME_BLIND = (_policies.everything_saveable, _policies.nothing_saveable, *_BY_OP)
# The op fs.checkpoint_name tags a value with (registered by fs.policies, which reads it).
_NAME_OP = torch.ops.fsharding.checkpoint_name.default
# Factories that users may pass uncalled by mistake.
_FACTORIES = (
    _policies.save_only_these_names,
    _policies.save_any_names_but_these,
    _policies.save_and_offload_only_these_names,
)


def _check_policy(policy: Any) -> Callable[..., Any]:
    """Validates ``fs.remat``'s ``policy=`` argument (None means ``nothing_saveable``)."""
    if policy is None:
        return _policies.nothing_saveable
    if any(policy is f for f in _FACTORIES):
        raise TypeError(
            f"fs.remat: policy={policy.__name__} is a policy factory, not a policy; call it "
            f"with the names, e.g. policy=fs.policies.{policy.__name__}(...)."
        )
    if not callable(policy) or isinstance(policy, (type, str)):
        builtins = ", ".join(_policies.__all__[1:-1])
        raise TypeError(
            "fs.remat: policy must be a callable policy(op, *args, **kwargs) -> bool | "
            f"Offloadable such as fs.policies.dots_saveable, got {policy!r} "
            f"({type(policy).__name__}). Built-ins: {builtins}."
        )
    return policy


def _policy_name(policy: Any) -> str:
    return getattr(policy, "__name__", None) or repr(policy)


class _Entered(contextlib.ExitStack):
    """Enters several context managers in order, exits them in reverse (re-enterable)."""

    def __init__(self, managers: list[Any]):
        super().__init__()
        self.managers = managers

    def __enter__(self) -> _Entered:
        for m in self.managers:
            self.enter_context(m)
        return self


# --------------------------------------------------------------------------------------
# what a region may write (known state) and what an op writes
# --------------------------------------------------------------------------------------


def _known_state() -> tuple[torch.Tensor, ...] | None:
    """The tensors a region starting now may write, or None (unknown: anything).

    ``fs.functional(model, wrap=...)`` declares a wrapped block's state through
    ``_context.REGION_STATE`` as ``(tensors, module)``: its params and buffers, plus the
    plain tensor attributes of ``module``'s modules, read here as they are now.
    """
    known = _context.REGION_STATE.get()
    if known is None:
        return None
    tensors, module = known
    if module is None:
        return tuple(tensors)
    return (*tensors, *_attribute_tensors(module))


def _attribute_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors held in the ``__dict__`` of ``module`` and its submodules: directly or as
    values of a list, tuple or dict attribute (params and buffers are declared anyway)."""
    found: list[torch.Tensor] = []
    stack = [module]
    while stack:
        m = stack.pop()
        for key, value in m.__dict__.items():
            if isinstance(value, _TensorBase):
                found.append(value)
            elif key in _MODULE_DICTS:
                if key == "_modules":
                    stack.extend(v for v in value.values() if v is not None)
            elif isinstance(value, (list, tuple)):
                found.extend(v for v in value if isinstance(v, _TensorBase))
            elif isinstance(value, dict):
                found.extend(v for v in value.values() if isinstance(v, _TensorBase))
    return found


# torch.Tensor's metaclass makes isinstance(x, torch.Tensor) slow; the C base class is not.
_TensorBase = torch._C.TensorBase
# nn.Module's own containers: params and buffers (declared), submodules (walked), hooks.
_MODULE_DICTS = frozenset(
    ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
) | frozenset(k for k in nn.Module().__dict__ if "hook" in k)

_IGNORED = getattr(_ckpt, "SAC_IGNORED_OPS", {torch.ops.aten.detach.default})
# Ops that write their running-stat arguments without saying so in their schema.
_UNDECLARED_WRITES = {
    f"aten::{n}": ((3, "running_mean"), (4, "running_var"))
    for n in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm")
}
_OP_INFO: dict[Any, tuple[tuple, bool]] = {}
_PASS = ((), False)  # ops the mode passes through: SAC's ignored ops, non-OpOverloads


def _op_info(func: Any) -> tuple[tuple, bool]:
    """``(position or None, name)`` of each argument ``func`` writes in place, and whether
    its outputs are fresh storages (no output aliases an input); ``_PASS`` for the rest.
    Remembered per op in ``_OP_INFO`` (read it first: ``_OP_INFO.get(op) or _op_info(op)``).
    """
    if func in _IGNORED or not isinstance(func, torch._ops.OpOverload):
        info = _PASS
    else:
        schema = func._schema
        writes = tuple(
            (None if a.kwarg_only else i, a.name)
            for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        ) + _UNDECLARED_WRITES.get(schema.name, ())
        info = (writes, all(r.alias_info is None for r in schema.returns))
    _OP_INFO[func] = info
    return info


_SEEDED = torch.Tag.nondeterministic_seeded


def _consumes_rng(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` draws from the RNG here: seeded ops (dropout, ``rand_like``, ...);
    attention kernels only with ``dropout_p > 0`` (on CUDA one fused op draws the masks)."""
    if not isinstance(func, torch._ops.OpOverload) or _SEEDED not in func.tags:
        return False
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            p = args[i] if i < len(args) else kwargs.get("dropout_p", a.default_value)
            return bool(p)
    return True


# --------------------------------------------------------------------------------------
# the region's dispatch mode: offloading, state protection, measurement
# --------------------------------------------------------------------------------------


class _RegionMode(TorchDispatchMode):
    """Below the selective-checkpoint mode: it sees the ops that really run.

    Forward: copies the outputs the policy offloads to host memory; reports cached and
    offloaded outputs to a recorder. Recompute (entered only if ``frame.guards_recompute()``
    once the forward has run): returns the offloaded copies instead of computing them again,
    and redirects in-place writes to tensors made outside the region (state) to copies.
    """

    def __init__(self, frame: _Frame, *, forward: bool):
        super().__init__()
        self.frame = frame
        self.forward = forward
        self.on = self.replay = False
        self.created: set[Any] = set()  # storage keys
        self.scratch: dict[Any, torch.Tensor] = {}  # outside storage key -> private copy
        self.taken: dict[Any, int] = {}

    def __enter__(self) -> _RegionMode:
        self.on = self.forward or self.frame.guards_recompute()
        if not self.on:
            return self
        self.replay = bool(self.frame.offloaded)
        for memo in (self.created, self.scratch, self.taken):
            memo.clear()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            self.on = False
            super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        info = _OP_INFO.get(func) or _op_info(func)
        if info is _PASS:
            return func(*args, **kwargs)  # e.g. a compiled region run as one operator
        frame = self.frame
        if self.forward:
            decision = frame.decide(func, args, kwargs)
            out = func(*args, **kwargs)
            if isinstance(decision, Offloadable):
                leaves, spec = optree.tree_flatten(out)
                host = [_to_host(x) for x in leaves]
                frame.offloaded.setdefault(func, []).append((spec, host))
                if frame.recorder is not None:
                    frame.recorder.offloaded(func, out, host)
            elif decision is True and frame.recorder is not None:
                frame.recorder.cached(func, out)
            return out
        if self.replay and isinstance(frame.decide(func, args, kwargs), Offloadable):
            i = self.taken.get(func, 0)
            self.taken[func] = i + 1
            spec, host = frame.offloaded[func][i]
            return optree.tree_unflatten(spec, [_from_host(*h) for h in host])
        writes, fresh = info
        if self.scratch:  # reads and writes of outside storage written earlier: the copy
            args, kwargs = tree_map_only(torch.Tensor, self._reroute, (args, kwargs))
        if writes:
            args, kwargs = self._protect_state(writes, args, kwargs)
        out = func(*args, **kwargs)
        if fresh:  # new storages: the region's own, free to write
            add = self.created.add
            for t in out if isinstance(out, (tuple, list)) else (out,):
                add(_tree.storage_key(t))
        return out

    def _protect_state(self, writes: tuple, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for i, name in writes:
            if i is not None and i < len(args):
                args[i] = self._scratch(args[i])
            elif name in kwargs:
                kwargs[name] = self._scratch(kwargs[name])
        return tuple(args), kwargs

    def _scratch(self, value: Any) -> Any:
        """Where a write to ``value`` goes: ``value`` itself if the region made its storage,
        else the same view of a private copy of that storage (copy on first write)."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._scratch(v) for v in value)
        key = _tree.storage_key(value)
        if key is None or key in self.created:  # no storage, empty, or the region's own
            return value
        copy = self.scratch.get(key)
        if copy is None:
            size = value.untyped_storage().nbytes() // value.element_size()
            copy = value.as_strided((size,), (1,), 0).clone()
            self.scratch[key] = copy
            self.created.add(_tree.storage_key(copy))
        if copy.dtype != value.dtype:
            return value.clone()
        return copy.as_strided(value.size(), value.stride(), value.storage_offset())

    def _reroute(self, t: torch.Tensor) -> torch.Tensor:
        copy = self.scratch.get(_tree.storage_key(t))
        if copy is None or copy.dtype != t.dtype:
            return t
        return copy.as_strided(t.size(), t.stride(), t.storage_offset())


def _to_host(x: Any) -> tuple[Any, torch.device | None]:
    """An offloaded value: its host copy, and the device it returns to (None: it stays)."""
    if not isinstance(x, torch.Tensor):
        return x, None
    if x.device.type == "cpu":  # nothing to offload to: a distinct copy keeps it observable
        return x.detach().clone(), None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(x.detach(), non_blocking=True), x.device


def _from_host(x: Any, device: torch.device | None) -> Any:
    if device is not None:
        return x.to(device, non_blocking=True)
    return x.clone() if isinstance(x, torch.Tensor) else x  # never the stored copy itself
