"""The state a remat region may write, where its caller knows it.

``fs.remat`` keeps a recomputation from updating state a second time (BatchNorm running
stats, counters, caches) with a dispatch mode over the recomputed ops, which costs a Python
call per op. For an arbitrary function the state is whatever it can reach, so full remat
always pays it. ``fs.functional(model, wrap=...)`` knows better: a wrapped block's state is
its params, its buffers and the plain tensors its modules hold as attributes (a counter, a
cache; directly or in a list, tuple or dict attribute). It runs the block under
:func:`known_state`; ``remat`` then compares those tensors' version counters before and
after the forward and leaves the guard out when none changed. Selective policies see every
forward op anyway: their guard stays on after a forward that ran any in-place op, so a
write to any other outside tensor (a global, a closure) is redirected too. Full remat
cannot see such a write without paying the per-op cost in the forward: a block that writes
a tensor reachable neither from its modules nor through its arguments (a module-level
global, a closed-over tensor) must hold it as a module attribute or buffer, or be wrapped
with a selective policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import checkpoint as _ckpt

from fsharding import _context

__all__ = ["known_state", "current"]

_STATE = _context.REGION_STATE


@contextlib.contextmanager
def known_state(tensors: Iterable[torch.Tensor], module: nn.Module | None = None) -> Iterator[None]:
    """Within this block, the regions that start may write no outside tensor but ``tensors``
    and the plain tensor attributes of ``module``'s modules (found when a region starts)."""
    token = _STATE.set((tuple(tensors), module))
    try:
        yield
    finally:
        _STATE.reset(token)


def current() -> tuple[torch.Tensor, ...] | None:
    """The tensors of the innermost :func:`known_state` (its module's attribute tensors
    included, as they are now), or None (unknown: anything)."""
    known = _STATE.get()
    if known is None:
        return None
    tensors, module = known
    if module is None:
        return tensors
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


# What an op writes (for remat's recompute-time state guard)

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
    its outputs are fresh storages (no output aliases an input); ``_PASS`` for the rest."""
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


def _storage_key(t: Any) -> int | None:
    """The address of ``t``'s storage (without building a storage object), or None."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.data_ptr() - t.storage_offset() * t.element_size()
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
        return None


_SEEDED = torch.Tag.nondeterministic_seeded


def consumes_rng(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` draws from the RNG here: seeded ops (dropout, ``rand_like``, ...);
    attention kernels only with ``dropout_p > 0`` (on CUDA one fused op draws the masks)."""
    if not isinstance(func, torch._ops.OpOverload) or _SEEDED not in func.tags:
        return False
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            p = args[i] if i < len(args) else kwargs.get("dropout_p", a.default_value)
            return bool(p)
    return True
