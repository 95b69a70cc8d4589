"""The functional core: modules as pure functions of explicit params, and their gradients.

Owns ``fs.functional`` -- any ``nn.Module`` as ``apply(params, *args)`` over a params dict:
the params key check, buffers frozen or threaded as state, meta-device buffers recomputed,
per-block transforms (``wrap=``) -- and ``fs.value_and_grad`` / ``fs.grad``, which
differentiate any function of pytrees with ``torch.autograd.grad`` (never
``torch.func.grad``, which refuses the saved-tensor hooks that remat, offload and
collectives rely on).

It imports only the layer below it (``tree``, ``_context``, ``_replay``, ``precision``) and
talks upward through declared channels: a wrapped block declares the state it may write
(``_context.REGION_STATE``, read by ``fs.remat``'s guard); a sharded call gathers through
``_context.SHARDING``; a Hugging Face KV cache argument of a wrapped block is replayed for
recomputation by ``_replay``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import optree
import torch
from torch import nn
from torch.nn.utils import stateless

from fsharding import _context, _replay
from fsharding import tree as _tree
from fsharding.precision import as_loss_scale

__all__ = ["functional", "value_and_grad", "grad"]

_PyTree = Any
_Transform = Callable[[Callable[..., Any]], Callable[..., Any]]
_WrapSpec = Mapping[type, _Transform] | Callable[[str, nn.Module], _Transform | None] | None


# --------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------


def functional(
    module: nn.Module,
    *,
    buffers: Literal["frozen", "state"] = "frozen",
    wrap: _WrapSpec = None,
) -> (
    tuple[Callable[..., Any], dict[str, torch.Tensor]]
    | tuple[Callable[..., Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]
):
    """Turns ``module`` into a pure function of an explicit params dict.

    ``params`` is keyed as ``module.named_parameters()`` (tied weights appear once) and its
    values are ``p.detach()``: they share storage with the module but never carry ``.grad``.
    ``apply`` reads them and never writes them, and neither does a step that is not donated
    (``step.step(params, opt_state, batch)`` returns new tensors). A step with
    ``donate=True`` updates the params it is given in place: those of ``fs.functional``
    (and ``step.init``'s, their aliases) are the module's own tensors, so the module then
    holds the trained weights. Pass ``{k: v.clone() for k, v in params.items()}`` to
    ``step.init`` to keep the module's weights as they were.
    ``apply(params, *args, **kwargs)`` runs the module through ``functional_call`` with the
    passed params in force — also during backward, so a checkpoint *inside* the module (a
    closure over module attributes, Hugging Face ``gradient_checkpointing_enable()``)
    recomputes with the passed params rather than the module's own (torch's plain
    ``functional_call`` silently gets this wrong once the two differ).

    Meta-device init (``fs.zero``'s ``init(params, init_fn=...)``): ``apply`` runs with the
    params passed; a non-persistent buffer left on meta (rotary ``inv_freq``) is recomputed
    once on the params' device by the owning submodule's ``reset_parameters()`` (a Hugging
    Face model's ``_init_weights``) and kept by ``apply``, never written into the module; a
    persistent one (a checkpoint value) raises until loaded. Buffers the module had when
    ``fs.functional`` was called stay in use after ``model.to("meta")``.

    Args:
        module: any ``nn.Module``, possibly built under ``torch.device("meta")`` (see
            above). It is not modified (``apply`` swaps the passed tensors in and out for
            the call); see above for what a donated step writes.
        buffers: ``"frozen"`` keeps buffers as read-only constants (a forward that updates a
            buffer, e.g. BatchNorm in training mode, raises and points to ``"state"``).
            ``"state"`` returns ``(apply, params, state)`` with
            ``apply(params, state, *args, **kwargs) -> (out, new_state)``; ``state`` is never
            mutated.
        wrap: per-submodule transforms. A mapping ``{BlockClass: transform}`` or a callable
            ``(qualified_name, submodule) -> transform | None``. Each selected submodule
            then runs as ``transform(block_apply)(block_params, *args, **kwargs)`` with its
            own params passed explicitly (keys relative to the submodule), so ``fs.remat``,
            ``fs.offload``, ``fs.amp`` and ``fs.gather`` see them. A submodule nested inside
            a selected one is not selected again by a mapping (the outer one wins). A
            Hugging Face ``Cache`` argument (the KV cache of ``use_cache=True``) is updated
            by the block's forward only: a recomputation (``fs.remat``) runs on a copy of
            the cache's structure as it was when the block started, sharing its tensors.
            That is exact for caches that replace their tensors (``DynamicCache``); one
            that writes them in place (``StaticCache``, sliding-window layers) has lost
            its entry state, and the recomputation raises a RuntimeError instead of
            computing wrong grads (use a ``DynamicCache`` or ``use_cache=False``).

    Returns:
        ``(apply, params)``, or ``(apply, params, state)`` with ``buffers="state"``.

    Raises:
        ValueError: ``buffers`` is not ``"frozen"`` or ``"state"``, or ``wrap`` is malformed
            or selects no submodule (no class of the mapping matches any; a class that
            matches none while others match only warns, naming it).
        KeyError: (from ``apply``) ``params`` lacks a parameter of the module, or has a key
            that is not one; the message names them.

    Example:
        >>> import torch, fsharding as fs
        >>> model = torch.nn.Linear(3, 2)
        >>> apply, params = fs.functional(model)
        >>> sorted(params)
        ['bias', 'weight']
        >>> apply(params, torch.ones(1, 3)).shape
        torch.Size([1, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"fs.functional: module must be a torch.nn.Module, got {type(module).__name__}."
        )
    if buffers not in ("frozen", "state"):
        raise ValueError(
            f"fs.functional: buffers must be 'frozen' or 'state', got {buffers!r}. Use "
            "'state' for modules that update buffers in training (e.g. BatchNorm)."
        )
    params = {name: p.detach() for name, p in module.named_parameters()}
    wrapped = _select_wrapped(module, wrap)
    runner = _Runner(module, wrapped)

    if buffers == "frozen":

        def apply(params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
            return runner(params, None, args, kwargs)[0]

        apply.__doc__ = f"Pure apply of {type(module).__name__}: apply(params, *args, **kwargs)."
        return apply, params

    state = {name: b.detach().clone() for name, b in module.named_buffers()}

    def apply_with_state(
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        return runner(params, state, args, kwargs)

    apply_with_state.__doc__ = (
        f"Pure apply of {type(module).__name__}: apply(params, state, *args, **kwargs) -> "
        "(out, new_state)."
    )
    return apply_with_state, params, state


def _select_wrapped(module: nn.Module, wrap: _WrapSpec) -> dict[str, tuple[nn.Module, _Transform]]:
    """Qualified name -> (submodule, transform) for the submodules ``wrap`` selects."""
    if wrap is None:
        return {}
    out: dict[str, tuple[nn.Module, _Transform]] = {}
    if isinstance(wrap, Mapping):
        for cls, t in wrap.items():
            if not isinstance(cls, type) or not callable(t):
                raise ValueError(
                    "fs.functional: wrap must map module classes to transforms "
                    f"(e.g. {{Block: fs.remat(policy=...)}}), got {cls!r}: {t!r}."
                )
        subs = [(name, sub) for name, sub in module.named_modules() if name != ""]
        unmatched = [c for c in wrap if not any(isinstance(sub, c) for _, sub in subs)]
        if unmatched and len(unmatched) == len(wrap):
            names = ", ".join(c.__qualname__ for c in unmatched)
            raise ValueError(
                f"fs.functional: wrap classes {names} match no submodule of "
                f"{type(module).__name__}, so no transform would run. Its submodule classes "
                f"are {_class_names(subs)}; map one of them."
            )
        if unmatched:  # a mapping shared across model families: fine, but say so
            names = ", ".join(c.__qualname__ for c in unmatched)
            warnings.warn(
                f"fs.functional: wrap class{'es' if len(unmatched) > 1 else ''} {names} "
                f"match{'' if len(unmatched) > 1 else 'es'} no submodule of "
                f"{type(module).__name__}; {'their' if len(unmatched) > 1 else 'its'} "
                "transform does not run (the other entries do).",
                stacklevel=3,
            )
        for name, sub in subs:
            if any(name.startswith(p + ".") for p in out):
                continue
            t = next((t for cls, t in wrap.items() if isinstance(sub, cls)), None)
            if t is not None:
                out[name] = (sub, t)
        return out
    if callable(wrap):
        subs = [(name, sub) for name, sub in module.named_modules() if name != ""]
        for name, sub in subs:
            t = wrap(name, sub)
            if t is not None:
                if not callable(t):
                    raise ValueError(
                        f"fs.functional: wrap({name!r}, ...) returned {t!r}, which is not a "
                        "transform; return a callable such as fs.remat(policy=...) or None."
                    )
                out[name] = (sub, t)
        if not out:
            raise ValueError(
                f"fs.functional: the wrap callable selected no submodule of "
                f"{type(module).__name__} (it returned None for all {len(subs)}, e.g. "
                f"{[n for n, _ in subs[:3]]}), so no transform would run. Check its test on "
                "the name or class, or pass wrap=None."
            )
        return out
    raise ValueError(
        "fs.functional: wrap must be a mapping {ModuleClass: transform} or a callable "
        f"(name, submodule) -> transform | None, got {type(wrap).__name__}."
    )


def _class_names(subs: list[tuple[str, nn.Module]]) -> list[str]:
    names = dict.fromkeys(type(sub).__name__ for _, sub in subs)
    return list(names)[:8] + (["..."] if len(names) > 8 else [])


class _Runner:
    """Runs a module with passed params and buffers in force, in forward and in backward."""

    def __init__(self, module: nn.Module, wrapped: dict[str, tuple[nn.Module, _Transform]]):
        self.module = module
        self.wrapped = wrapped
        # Buffers as they are now: still used after model.to("meta") frees the module.
        self.captured = dict(module.named_buffers())
        self.buffer_names = list(self.captured)
        self.made: dict[tuple[str, torch.device], torch.Tensor] = {}  # meta buffers, made
        # Every name of each parameter (tied weights: several) -> its first name.
        self.canonical: dict[str, str] = {}
        by_id: dict[int, str] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            self.canonical[n] = by_id.setdefault(id(p), n)
        self.required = tuple(dict.fromkeys(self.canonical.values()))
        self.checked_keys: tuple | None = None  # the last key tuple that passed the check
        # Names bound to one tensor (tied weights, a buffer registered twice): what torch's
        # functional_call(tie_weights=True) finds on every call, found once.
        self.tied = _tied_names(module)
        # Block params are read from the block's attributes at call time (they are the
        # passed params while the reparametrization is in force), keyed relative to it.
        self.block_param_names = {
            name: [n for n, _ in sub.named_parameters()] for name, (sub, _) in wrapped.items()
        }

    def _check_params(self, params: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(
                "apply: params must be the dict returned by fs.functional (name -> tensor), "
                f"got {type(params).__name__}."
            )
        keys = tuple(params)
        if keys == self.checked_keys:  # the hot path: the same keys as last time
            return
        what = type(self.module).__name__
        unknown = [k for k in keys if k not in self.canonical]
        if unknown:
            k = unknown[0]
            hint = ""
            if k in self.captured:
                hint = (
                    f" {k!r} is a buffer: buffers are not params (they stay in the module, "
                    "or go in state with fs.functional(module, buffers='state'))."
                )
            elif isinstance(k, str):
                close = difflib.get_close_matches(k, list(self.canonical), n=1)
                hint = f" For {k!r}, did you mean {close[0]!r}?" if close else ""
            raise KeyError(
                f"apply: params has keys that are not parameters of {what}: "
                f"{_keystrs(unknown)}.{hint} Pass the dict returned by fs.functional(module) "
                "(or a tree with the same keys)."
            ) from None
        given = {self.canonical[k] for k in keys}
        missing = [n for n in self.required if n not in given]
        if missing:
            raise KeyError(
                f"apply: params is missing parameters of {what}: {_keystrs(missing)} "
                f"({len(missing)} of {len(self.required)}). Every parameter must be passed "
                "(the module's own tensor would run in its place, with no gradient): pass "
                "the dict returned by fs.functional(module), or add the missing entries (to "
                "freeze one, pass it and leave its gradient unused)."
            ) from None
        self.checked_keys = keys

    # -- buffers ---------------------------------------------------------------------

    def _buffer(self, name: str, b: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``b``, unless it is on meta: then the buffer as captured, or recomputed."""
        if not b.is_meta:
            return b
        c = self.captured.get(name)
        if c is not None and not c.is_meta:
            return c
        made = self.made.get((name, device))
        if made is None:
            self._materialise(device, name)
            made = self.made[(name, device)]
        return made

    def _materialise(self, device: torch.device, name: str) -> None:
        """Recomputes buffer ``name``, which never had a value (built on meta), on
        ``device``, with the other non-persistent meta buffers of its owner (one recipe
        run). Only what is asked for: a persistent buffer passed in ``state`` is not."""
        owner_name, _, _ = name.rpartition(".")
        owner = self.module.get_submodule(owner_name)
        todo: dict[str, list[str]] = {}
        for a, b in owner.named_buffers(recurse=False):
            n = _join(owner_name, [a])[0]
            c = self.captured.get(n, b)
            if (n, device) in self.made or not (b.is_meta and c.is_meta):
                continue
            if n == name or a in owner._non_persistent_buffers_set:
                todo.setdefault(owner_name, []).append(a)
        persistent = [
            n
            for owner_name, attrs in todo.items()
            for a, n in zip(attrs, _join(owner_name, attrs))
            if a not in self.module.get_submodule(owner_name)._non_persistent_buffers_set
        ]
        if persistent:
            # In the state dict: their values are the checkpoint's, not an init's.
            raise RuntimeError(
                f"apply: buffers {_keystrs(persistent)} of {type(self.module).__name__} are "
                "on the meta device (the module was built under torch.device('meta')) and "
                "are persistent (state-dict entries, e.g. BatchNorm running stats), so their "
                "values come from your checkpoint or init, which apply cannot guess. Load "
                "them into the module first, e.g. model.load_state_dict(buffers, "
                "strict=False, assign=True), or pass them in state with "
                "fs.functional(model, buffers='state'). (Non-persistent buffers, such as "
                "rotary inv_freq, are recomputed.)"
            )
        for owner_name, attrs in todo.items():
            owner = self.module.get_submodule(owner_name)
            shadow = _shadow(owner, device, set(attrs))
            fresh = {a: (shadow._buffers[a], shadow._buffers[a]._version) for a in attrs}
            recipes = []
            hf = _hf_ancestor(self.module, owner_name)
            if hf is not None:
                recipes.append(("_init_weights", lambda m, hf=hf: hf._init_weights(m)))
            if callable(getattr(shadow, "reset_parameters", None)):
                recipes.append(("reset_parameters", lambda m: m.reset_parameters()))
            done: dict[str, torch.Tensor] = {}
            for recipe_name, recipe in recipes:
                try:
                    with torch.random.fork_rng(devices=[]), torch.no_grad():
                        recipe(shadow)
                except Exception as e:
                    raise RuntimeError(
                        f"apply: recomputing the meta-device buffers "
                        f"{_keystrs(_join(owner_name, attrs))} of {type(owner).__name__} "
                        f"with {recipe_name}() failed: {type(e).__name__}: {e}"
                    ) from e
                for a in attrs:
                    t = shadow._buffers.get(a)
                    t0, v0 = fresh[a]
                    if t is not None and not t.is_meta and (t is not t0 or t._version != v0):
                        done[a] = t.detach().to(device)
                if len(done) == len(attrs):
                    break
            left = [a for a in attrs if a not in done]
            if left:
                raise RuntimeError(
                    f"apply: buffers {_keystrs(_join(owner_name, left))} of "
                    f"{type(self.module).__name__} are on the meta device (the module was "
                    "built under torch.device('meta')) and have no value to run with. apply "
                    "recomputes such buffers with the owning submodule's reset_parameters() "
                    "(or a Hugging Face model's _init_weights), and "
                    f"{type(owner).__name__} has none that sets them. Give it a "
                    "reset_parameters() that recomputes them in place, or build the module "
                    "with its buffers on a real device (only the params on meta), or "
                    "materialise the buffers before calling fs.functional."
                )
            for a, t in done.items():
                self.made[(_join(owner_name, [a])[0], device)] = t

    # -- running ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _in_force(self, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
        untied = self._untie(tensors)
        try:
            with stateless._reparametrize_module(self.module, untied, strict=False):
                with self._patched_blocks():
                    yield
        finally:
            if untied is not tensors:  # what the module holds at exit, as torch writes back
                for k in tensors:
                    tensors[k] = untied[k]

    def _untie(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` with every name tied to a given one bound to its value (torch's
        ``tie_weights=True``, with the ties found at construction); ``tensors`` itself if
        no tied name is given."""
        untied = None
        for names in self.tied:
            given = [n for n in names if n in tensors]
            if not given:
                continue
            if len({id(tensors[n]) for n in given}) > 1:
                raise ValueError(
                    f"functional_call got multiple values for keys {sorted(names)}, which are "
                    "tied. Consider using tie_weights=False"
                )
            if untied is None:
                untied = dict(tensors)
            for n in names:
                untied[n] = tensors[given[0]]
        return tensors if untied is None else untied

    @contextlib.contextmanager
    def _patched_blocks(self) -> Iterator[None]:
        if not self.wrapped:
            yield
            return
        patched = []
        try:
            for name, (sub, transform) in self.wrapped.items():
                had_own = "forward" in sub.__dict__
                prev = sub.__dict__.get("forward")
                sub.forward = self._block_forward(name, sub, transform)
                patched.append((sub, had_own, prev))
            yield
        finally:
            for sub, had_own, prev in reversed(patched):
                if had_own:
                    sub.forward = prev
                else:
                    del sub.forward

    def _block_forward(self, name: str, sub: nn.Module, transform: _Transform) -> Callable:
        names = self.block_param_names[name]
        cls_forward = type(sub).forward

        def block_apply(block_params: Mapping[str, torch.Tensor], *args: Any, **kw: Any) -> Any:
            args, kw = _replay.resolve(args, kw)
            with stateless._reparametrize_module(sub, dict(block_params), strict=False):
                return cls_forward(sub, *args, **kw)

        functools.update_wrapper(block_apply, cls_forward)
        transformed = transform(block_apply)

        def forward(*args: Any, **kw: Any) -> Any:
            block_params = {n: _get_attr(sub, n) for n in names}
            state = (*block_params.values(), *(b for _, b in sub.named_buffers()))
            if torch.is_grad_enabled():  # (a recomputation needs a backward)
                args, kw = _replay.protect(args, kw)
            # The state the block may write, for fs.remat's guard (no second write).
            token = _context.REGION_STATE.set((state, sub))
            try:
                return transformed(block_params, *args, **kw)
            finally:
                _context.REGION_STATE.reset(token)

        return forward

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor] | None,
        args: tuple,
        kwargs: dict,
    ) -> tuple[Any, dict[str, torch.Tensor] | None]:
        self._check_params(params)
        device = _device_of(params)
        # fs.zero(stage=3, gather="blocks") passes shards: gather those no fs.gather block owns.
        tensors = dict(params)
        sharding = _context.SHARDING.get()
        if sharding is not None:
            tensors = sharding.gather_unowned(self.module, self.wrapped, tensors, self)
        if state is None:
            # Frozen buffers: pass copies so an in-place update (BatchNorm) can be detected
            # without ever touching the module's own buffers.
            frozen = {n: self._buffer(n, b, device).clone() for n, b in self.module.named_buffers()}
            versions = {n: b._version for n, b in frozen.items()}
            tensors.update(frozen)
        else:
            missing = [n for n in self.buffer_names if n not in state]
            if missing:
                raise KeyError(
                    f"apply: state is missing buffers {missing[:5]}; pass the state returned "
                    "by fs.functional(module, buffers='state') or by the previous apply."
                )
            new_state = {n: self._buffer(n, state[n], device).clone() for n in self.buffer_names}
            tensors.update(new_state)
        with self._in_force(tensors):
            out = self.module(*args, **kwargs)
        if state is None:
            changed = [n for n, b in frozen.items() if b._version != versions[n]]
            if changed:
                raise RuntimeError(
                    f"apply: {type(self.module).__name__} updated buffers {changed[:5]} in "
                    "place (e.g. BatchNorm running stats in training mode), but buffers are "
                    "frozen. Use fs.functional(module, buffers='state') to thread them as "
                    "state, or call module.eval() first. The module's buffers are unchanged."
                )
        _keep_in_force_during_backward(out, functools.partial(self._in_force, tensors))
        if state is None:
            return out, None
        return out, {n: b.detach() for n, b in new_state.items()}


def _tied_names(module: nn.Module) -> list[tuple[str, ...]]:
    """Groups of names (params and buffers) that hold one tensor, as torch's
    ``_untie_named_tensors_map`` finds them."""
    names_of: dict[int, list[str]] = {}
    for n, t in (
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ):
        names_of.setdefault(id(t), []).append(n)
    return [tuple(names) for names in names_of.values() if len(names) > 1]


def _keystrs(names: list[str], limit: int = 5) -> str:
    shown = "".join(f"[{n!r}]" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _join(prefix: str, attrs: list[str]) -> list[str]:
    return [f"{prefix}.{a}" if prefix else a for a in attrs]


def _device_of(params: Mapping[str, Any]) -> torch.device:
    for v in params.values():
        if isinstance(v, torch.Tensor) and not v.is_meta:
            return v.device
    return torch.device("cpu")


def _shadow(module: nn.Module, device: torch.device, targets: set[str]) -> nn.Module:
    """A copy of ``module`` whose params are meta and whose ``targets`` buffers are empty
    on ``device`` (other buffers meta): an init recipe run on it writes nothing real."""
    c = copy.copy(module)
    c.__dict__["_parameters"] = {
        k: None
        if p is None
        else nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for k, p in module._parameters.items()
    }
    c.__dict__["_buffers"] = {
        k: None if b is None else torch.empty_like(b, device=device if k in targets else "meta")
        for k, b in module._buffers.items()
    }
    c.__dict__["_modules"] = {
        k: None if m is None else _shadow(m, device, set()) for k, m in module._modules.items()
    }
    return c


def _hf_ancestor(root: nn.Module, owner_name: str) -> Any:
    """The innermost Hugging Face ``PreTrainedModel`` containing ``owner_name``, or None."""
    hf = sys.modules.get("transformers.modeling_utils")
    base = getattr(hf, "PreTrainedModel", None)
    if base is None:
        return None
    found, mod = None, root
    parts = owner_name.split(".") if owner_name else []
    for i in range(len(parts) + 1):
        if isinstance(mod, base):
            found = mod
        if i < len(parts):
            mod = getattr(mod, parts[i])
    return found


def _get_attr(module: nn.Module, dotted: str) -> torch.Tensor:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """Tensors anywhere in a module output (pytrees, Mappings such as HF ModelOutput)."""
    found: list[torch.Tensor] = []
    stack = [out]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif not optree.tree_structure(x).is_leaf():
            stack.extend(optree.tree_leaves(x))
    return found


def _keep_in_force_during_backward(out: Any, in_force: Callable[[], Any]) -> None:
    """Re-applies the passed params when backward reaches the outputs; restores at its end.

    A checkpoint region inside the module recomputes during backward, reading module
    attributes; without this it would see the module's own parameters. The first output
    node that backward reaches enters the reparametrization; an engine callback leaves it
    when that backward pass finishes.
    """
    nodes = {t.grad_fn for t in _output_tensors(out) if t.grad_fn is not None}
    if not nodes:
        return
    active: list[contextlib.AbstractContextManager] = []

    def leave() -> None:
        if active:
            active.pop().__exit__(None, None, None)

    def pre_hook(grad_outputs: tuple) -> None:
        if active:
            return
        ctx = in_force()
        ctx.__enter__()
        active.append(ctx)
        torch.autograd.Variable._execution_engine.queue_callback(leave)

    for node in nodes:
        node.register_prehook(pre_hook)


# --------------------------------------------------------------------------------------
# value_and_grad / grad
# --------------------------------------------------------------------------------------


def _normalize_argnums(argnums: int | Sequence[int], api: str) -> tuple[tuple[int, ...], bool]:
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (argnums,), False
    if isinstance(argnums, Sequence) and all(
        isinstance(a, int) and not isinstance(a, bool) for a in argnums
    ):
        if len(set(argnums)) != len(argnums) or not argnums:
            raise ValueError(f"{api}: argnums must be distinct and non-empty, got {argnums!r}.")
        return tuple(argnums), True
    raise TypeError(f"{api}: argnums must be an int or a tuple of ints, got {argnums!r}.")


def _prepare(arg: _PyTree, argnum: int, api: str) -> tuple[list[torch.Tensor], Any]:
    """Fresh leaf aliases (sharing storage, requires_grad) for one differentiated argument."""
    accessors, leaves, treedef = optree.tree_flatten_with_accessor(arg)
    out = []
    for acc, leaf in zip(accessors, leaves):
        if not _tree.is_floating(leaf):
            what = _tree.describe(leaf)
            raise TypeError(
                f"{api}: argument {argnum} has a non-float leaf at {_tree.keystr(acc)} "
                f"({what}); only floating-point tensors can be differentiated. Move it to "
                "another argument or to the batch, or pass argnums= for the float ones."
            )
        out.append(_context.tap(leaf, leaf.detach().requires_grad_(True)))
    return out, treedef


def value_and_grad(
    fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Returns a function computing ``fn``'s value and its gradient w.r.t. ``argnums``.

    Gradients come from ``torch.autograd.grad`` on fresh aliases of the differentiated
    leaves, so the caller's tensors are never mutated, never get ``.grad`` and need not
    require grad. Grads have exactly the pytree structure of the differentiated arguments;
    a leaf the value does not depend on gets zeros.

    The returned function takes the keyword-only ``loss_scale``: an ``fs.LossScale``, or a
    number ``s`` meaning ``fs.StaticLossScale(s)`` (as ``fs.train_step``'s); it then
    differentiates ``loss_scale.scale(loss)`` and returns the unscaled loss and
    ``loss_scale.unscale(grads)``.

    Args:
        fn: a function returning a scalar floating tensor, or ``(scalar, aux)`` with
            ``has_aux=True``. Not an ``nn.Module``: differentiate ``fs.functional(model)``'s
            ``apply`` instead.
        argnums: which positional argument(s) to differentiate; a tuple gives a tuple of
            grads.
        has_aux: ``fn`` returns ``(value, aux)``; aux is returned detached.

    Returns:
        ``g(*args, loss_scale=None, **kwargs) -> (value, grads)`` or
        ``((value, aux), grads)``; ``value`` is detached.

    Raises:
        TypeError: ``fn`` is an ``nn.Module``; a differentiated leaf is not a floating
            tensor (the message names its path); ``fn`` does not return a scalar floating
            tensor; ``loss_scale`` is neither a number nor a loss scale.

    Example:
        >>> import torch, fsharding as fs
        >>> f = lambda p, x: (p["w"] * x).sum()
        >>> loss, g = fs.value_and_grad(f)({"w": torch.ones(3)}, torch.arange(3.0))
        >>> g["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    _check_not_module(fn, "fs.value_and_grad")
    nums, multiple = _normalize_argnums(argnums, "fs.value_and_grad")

    @functools.wraps(fn)
    def value_and_grad_fn(*args: Any, loss_scale: Any = None, **kwargs: Any) -> Any:
        loss_scale = as_loss_scale(loss_scale, "fs.value_and_grad")
        if max(nums) >= len(args) or min(nums) < -len(args):
            raise TypeError(
                f"fs.value_and_grad: argnums={argnums!r} but the function was called with "
                f"{len(args)} positional argument(s); pass the differentiated arguments "
                "positionally."
            )
        args = list(args)
        prepared = []
        for n in nums:
            leaves, treedef = _prepare(args[n], n, "fs.value_and_grad")
            args[n] = optree.tree_unflatten(treedef, leaves)
            prepared.append((leaves, treedef))
        with torch.enable_grad():
            out = fn(*args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "fs.value_and_grad: has_aux=True requires fn to return a pair "
                        f"(value, aux), got {type(out).__name__}."
                    )
                value, aux = out
            else:
                value, aux = out, None
            _check_scalar(value)
            target = loss_scale.scale(value) if loss_scale is not None else value
            flat = [leaf for leaves, _ in prepared for leaf in leaves]
            if target.requires_grad and flat:
                grads_flat = torch.autograd.grad(target, flat, allow_unused=True)
            else:
                grads_flat = (None,) * len(flat)
        grads_flat = [torch.zeros_like(x) if g is None else g for x, g in zip(flat, grads_flat)]
        grads, i = [], 0
        for leaves, treedef in prepared:
            grads.append(optree.tree_unflatten(treedef, grads_flat[i : i + len(leaves)]))
            i += len(leaves)
        grads_out = tuple(grads) if multiple else grads[0]
        if loss_scale is not None:
            grads_out = loss_scale.unscale(grads_out)
        value = value.detach()
        if has_aux:
            aux = optree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, aux)
            return (value, aux), grads_out
        return value, grads_out

    return value_and_grad_fn


def _check_not_module(fn: Any, api: str) -> None:
    if isinstance(fn, nn.Module):
        raise TypeError(
            f"{api}: fn is an nn.Module ({type(fn).__name__}), whose parameters are hidden "
            "in it; differentiate a function of explicit params: `apply, params = "
            f"fs.functional(model)`, then `{api}(lambda p, x: loss(apply(p, x)))(params, "
            "x)`."
        )


def _check_scalar(value: Any) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not _tree.is_floating(value):
        got = _tree.describe(value, shape=True)
        raise TypeError(
            f"fs.value_and_grad: fn must return a scalar floating tensor, got {got}. Reduce "
            "the output (e.g. .mean()), or return (loss, aux) with has_aux=True."
        )


def grad(
    fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Returns a function computing the gradient of ``fn`` (see :func:`value_and_grad`).

    Returns:
        ``g(*args, loss_scale=None, **kwargs) -> grads``, or ``(grads, aux)`` with
        ``has_aux=True`` (JAX's convention).

    Example:
        >>> import torch, fsharding as fs
        >>> fs.grad(lambda x: (x ** 2).sum())(torch.tensor([1.0, 2.0])).tolist()
        [2.0, 4.0]
    """
    _check_not_module(fn, "fs.grad")
    vg = value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fn)
    def grad_fn(*args: Any, loss_scale: Any = None, **kwargs: Any) -> Any:
        out, grads = vg(*args, loss_scale=loss_scale, **kwargs)
        if has_aux:
            return grads, out[1]
        return grads

    return grad_fn
