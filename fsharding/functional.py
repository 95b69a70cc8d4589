"""The functional core: modules as pure functions of explicit params, and their gradients.

``fs.functional(module)`` turns any ``nn.Module`` into ``apply(params, *args)`` over a
params dict; ``fs.value_and_grad`` / ``fs.grad`` differentiate any function of pytrees with
``torch.autograd.grad`` (never ``torch.func.grad``, which refuses the saved-tensor hooks that
remat, offload and collectives rely on).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import optree
import torch
from torch import nn
from torch.nn.utils import stateless

from fsharding import tree as _tree
from fsharding.transforms import gather as _gather
from fsharding.transforms import grad_taps as _taps
from fsharding.transforms import region_state as _region_state

__all__ = ["functional", "value_and_grad", "grad"]

PyTree = Any
Transform = Callable[[Callable[..., Any]], Callable[..., Any]]
WrapSpec = Mapping[type, Transform] | Callable[[str, nn.Module], Transform | None] | None


# --------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------


def functional(
    module: nn.Module,
    *,
    buffers: Literal["frozen", "state"] = "frozen",
    wrap: WrapSpec = None,
) -> (
    tuple[Callable[..., Any], dict[str, torch.Tensor]]
    | tuple[Callable[..., Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]
):
    """Turns ``module`` into a pure function of an explicit params dict.

    ``params`` is keyed as ``module.named_parameters()`` (tied weights appear once) and its
    values are ``p.detach()``: they share storage with the module but never carry ``.grad``.
    ``apply(params, *args, **kwargs)`` runs the module through ``functional_call`` with the
    passed params in force — also during backward, so a checkpoint *inside* the module (a
    closure over module attributes, Hugging Face ``gradient_checkpointing_enable()``)
    recomputes with the passed params rather than the module's own (torch's plain
    ``functional_call`` silently gets this wrong once the two differ).

    Args:
        module: any ``nn.Module``. It is not modified; its own parameters are never written.
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
            a selected one is not selected again by a mapping (the outer one wins).

    Returns:
        ``(apply, params)``, or ``(apply, params, state)`` with ``buffers="state"``.

    Raises:
        ValueError: ``buffers`` is not ``"frozen"`` or ``"state"``, or ``wrap`` is malformed.

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


def _select_wrapped(module: nn.Module, wrap: WrapSpec) -> dict[str, tuple[nn.Module, Transform]]:
    """Qualified name -> (submodule, transform) for the submodules ``wrap`` selects."""
    if wrap is None:
        return {}
    out: dict[str, tuple[nn.Module, Transform]] = {}
    if isinstance(wrap, Mapping):
        for cls, t in wrap.items():
            if not isinstance(cls, type) or not callable(t):
                raise ValueError(
                    "fs.functional: wrap must map module classes to transforms "
                    f"(e.g. {{Block: fs.remat(policy=...)}}), got {cls!r}: {t!r}."
                )
        for name, sub in module.named_modules():
            if any(name.startswith(p + ".") for p in out) or name == "":
                continue
            t = next((t for cls, t in wrap.items() if isinstance(sub, cls)), None)
            if t is not None:
                out[name] = (sub, t)
        return out
    if callable(wrap):
        for name, sub in module.named_modules():
            if name == "":
                continue
            t = wrap(name, sub)
            if t is not None:
                if not callable(t):
                    raise ValueError(
                        f"fs.functional: wrap({name!r}, ...) returned {t!r}, which is not a "
                        "transform; return a callable such as fs.remat(policy=...) or None."
                    )
                out[name] = (sub, t)
        return out
    raise ValueError(
        "fs.functional: wrap must be a mapping {ModuleClass: transform} or a callable "
        f"(name, submodule) -> transform | None, got {type(wrap).__name__}."
    )


class _Runner:
    """Runs a module with passed params and buffers in force, in forward and in backward."""

    def __init__(self, module: nn.Module, wrapped: dict[str, tuple[nn.Module, Transform]]):
        self.module = module
        self.wrapped = wrapped
        self.buffer_names = [n for n, _ in module.named_buffers()]
        self.param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
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
        unknown = [k for k in params if k not in self.param_names]
        if unknown:
            raise KeyError(
                f"apply: params has keys that are not parameters of "
                f"{type(self.module).__name__}: {unknown[:5]}. Pass the dict returned by "
                "fs.functional(module) (or a tree with the same keys)."
            )

    @contextlib.contextmanager
    def _in_force(self, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
        with stateless._reparametrize_module(self.module, tensors, tie_weights=True, strict=False):
            with self._patched_blocks():
                yield

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

    def _block_forward(self, name: str, sub: nn.Module, transform: Transform) -> Callable:
        names = self.block_param_names[name]
        cls_forward = type(sub).forward

        def block_apply(block_params: Mapping[str, torch.Tensor], *args: Any, **kw: Any) -> Any:
            with stateless._reparametrize_module(sub, dict(block_params), strict=False):
                return cls_forward(sub, *args, **kw)

        functools.update_wrapper(block_apply, cls_forward)
        transformed = transform(block_apply)

        def forward(*args: Any, **kw: Any) -> Any:
            block_params = {n: _get_attr(sub, n) for n in names}
            state = [*block_params.values(), *(b for _, b in sub.named_buffers())]
            with _region_state.known_state(state):  # what remat must keep from writing twice
                return transformed(block_params, *args, **kw)

        return forward

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor] | None,
        args: tuple,
        kwargs: dict,
    ) -> tuple[Any, dict[str, torch.Tensor] | None]:
        self._check_params(params)
        # fs.zero(stage=3, gather="blocks") passes shards: gather those no fs.gather block owns.
        tensors = _gather.gather_unowned(self, dict(params))
        if state is None:
            # Frozen buffers: pass copies so an in-place update (BatchNorm) can be detected
            # without ever touching the module's own buffers.
            bufs = {n: b for n, b in self.module.named_buffers()}
            frozen = {n: b.clone() for n, b in bufs.items()}
            versions = {n: b._version for n, b in frozen.items()}
            tensors.update(frozen)
        else:
            missing = [n for n in self.buffer_names if n not in state]
            if missing:
                raise KeyError(
                    f"apply: state is missing buffers {missing[:5]}; pass the state returned "
                    "by fs.functional(module, buffers='state') or by the previous apply."
                )
            new_state = {n: state[n].clone() for n in self.buffer_names}
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


def _prepare(arg: PyTree, argnum: int, api: str) -> tuple[list[torch.Tensor], Any]:
    """Fresh leaf aliases (sharing storage, requires_grad) for one differentiated argument."""
    accessors, leaves, treedef = optree.tree_flatten_with_accessor(arg)
    out = []
    for acc, leaf in zip(accessors, leaves):
        if not _tree.is_floating(leaf):
            what = (
                f"a {leaf.dtype} tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            )
            raise TypeError(
                f"{api}: argument {argnum} has a non-float leaf at {_tree.keystr(acc)} "
                f"({what}); only floating-point tensors can be differentiated. Move it to "
                "another argument or to the batch, or pass argnums= for the float ones."
            )
        out.append(_taps.tap(leaf, leaf.detach().requires_grad_(True)))
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

    The returned function takes the keyword-only ``loss_scale: fs.LossScale | None``: it
    then differentiates ``loss_scale.scale(loss)`` and returns the unscaled loss and
    ``loss_scale.unscale(grads)``.

    Args:
        fn: a function returning a scalar floating tensor, or ``(scalar, aux)`` with
            ``has_aux=True``.
        argnums: which positional argument(s) to differentiate; a tuple gives a tuple of
            grads.
        has_aux: ``fn`` returns ``(value, aux)``; aux is returned detached.

    Returns:
        ``g(*args, loss_scale=None, **kwargs) -> (value, grads)`` or
        ``((value, aux), grads)``; ``value`` is detached.

    Raises:
        TypeError: a differentiated leaf is not a floating tensor (the message names its
            path), or ``fn`` does not return a scalar floating tensor.

    Example:
        >>> import torch, fsharding as fs
        >>> f = lambda p, x: (p["w"] * x).sum()
        >>> loss, g = fs.value_and_grad(f)({"w": torch.ones(3)}, torch.arange(3.0))
        >>> g["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    nums, multiple = _normalize_argnums(argnums, "fs.value_and_grad")

    @functools.wraps(fn)
    def value_and_grad_fn(*args: Any, loss_scale: Any = None, **kwargs: Any) -> Any:
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


def _check_scalar(value: Any) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not _tree.is_floating(value):
        got = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
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
    vg = value_and_grad(fn, argnums=argnums, has_aux=has_aux)

    @functools.wraps(fn)
    def grad_fn(*args: Any, loss_scale: Any = None, **kwargs: Any) -> Any:
        out, grads = vg(*args, loss_scale=loss_scale, **kwargs)
        if has_aux:
            return grads, out[1]
        return grads

    return grad_fn
