"""Replay of the mutable arguments a block updates (Hugging Face KV caches) for recomputation.

A Hugging Face layer called with ``use_cache=True`` gets a ``Cache`` object and updates it
(``cache.update(k, v)``). A recomputation (``fs.remat``) runs the layer a second time: it
must see the cache as the layer saw it, and must not update it again. :func:`protect`
replaces each ``Cache`` argument of a call by a :class:`Replay` before the region starts;
:func:`resolve`, run by the region each time it runs, hands the first run (the forward) the
object itself and every later run (a recomputation) a copy of its structure as it was when
the region started.

Used by ``fs.remat`` (a region's arguments) and ``fs.functional(wrap=...)`` (a wrapped
block's arguments, for any transform that re-runs the block). This module imports nothing
of fsharding, and ``transformers`` only if the caller already did (no ``Cache`` can exist
before).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch

__all__ = ["Replay", "protect", "resolve"]


class Replay:
    """A mutable argument (a Hugging Face KV ``Cache``) that a block updates: the block's
    first run (the forward) gets the object itself, every later run (a remat
    recomputation) a copy of its structure as it was when the block started, so the object
    is updated once and the recomputation computes what the forward did.

    The copy shares the tensors (copying a KV cache per block would cost its size each
    time). That is right for caches whose update *replaces* tensors (``DynamicCache``'s
    ``torch.cat``), not for those that write them in place (``StaticCache``'s
    ``index_copy_``, sliding-window layers' ``copy_``): their entry state is gone. The
    tensors' version counters are recorded at entry, and a recomputation that would read a
    tensor written since raises (it would silently compute other grads)."""

    __slots__ = ("obj", "entry", "versions", "ran")

    def __init__(self, obj: Any) -> None:
        seen: list[tuple[torch.Tensor, int, str]] = []
        self.obj, self.entry, self.ran = obj, _copy_structure(obj, seen=seen), False
        self.versions = seen

    def get(self) -> Any:
        """The object on the first call, a copy of its entry structure on every later one."""
        if not self.ran:
            self.ran = True
            return self.obj
        for t, v, where in self.versions:
            if t._version != v:
                raise RuntimeError(
                    f"fs.remat: a recomputation of a block needs the "
                    f"{type(self.obj).__name__} KV cache as the block saw it, but a tensor of "
                    f"its {where} was updated in place since (by the block's forward or a "
                    "later one), so that state is gone and the recomputed grads would be "
                    "wrong. Use a cache that replaces its tensors (a transformers "
                    "DynamicCache), or use_cache=False for training, or do not remat the "
                    "blocks that update this cache."
                )
        return _copy_structure(self.entry)


def protect(args: tuple, kw: dict) -> tuple[tuple, dict]:
    """``args`` and ``kw`` with each top-level Hugging Face ``Cache`` wrapped in a
    :class:`Replay` (the same objects when there is none)."""
    cu = sys.modules.get("transformers.cache_utils")
    cache = getattr(cu, "Cache", None)
    if cache is None:
        return args, kw
    if any(isinstance(a, cache) for a in args):
        args = tuple(Replay(a) if isinstance(a, cache) else a for a in args)
    if any(isinstance(v, cache) for v in kw.values()):
        kw = {k: Replay(v) if isinstance(v, cache) else v for k, v in kw.items()}
    return args, kw


def resolve(args: tuple, kw: dict) -> tuple[tuple, dict]:
    """``args`` and ``kw`` with each top-level :class:`Replay` replaced by what this run
    gets (:meth:`Replay.get`); the same objects when there is none."""
    if any(type(a) is Replay for a in args):
        args = tuple(a.get() if type(a) is Replay else a for a in args)
    if any(type(v) is Replay for v in kw.values()):
        kw = {k: v.get() if type(v) is Replay else v for k, v in kw.items()}
    return args, kw


def _copy_structure(
    x: Any,
    memo: dict[int, Any] | None = None,
    home: str = "",
    seen: list[tuple[torch.Tensor, int, str]] | None = None,
    where: str = "",
) -> Any:
    """A copy of ``x``'s containers and of the objects defined in its class's module (a
    cache's layers), sharing every tensor and every other object. ``seen`` collects the
    shared tensors as ``(tensor, version, owner class name)``."""
    if memo is None:
        memo = {}
        home = type(x).__module__
        where = type(x).__name__
    if isinstance(x, torch.Tensor):
        if seen is not None and not x.is_inference():
            seen.append((x, x._version, where))
        return x
    if id(x) in memo:
        return memo[id(x)]
    if type(x) in (list, dict):
        y = copy.copy(x)
        memo[id(x)] = y
        items = enumerate(x) if type(x) is list else x.items()
        for k, v in list(items):
            y[k] = _copy_structure(v, memo, home, seen, where)
        return y
    if type(x) is tuple:
        return tuple(_copy_structure(v, memo, home, seen, where) for v in x)
    if type(x).__module__ == home and hasattr(x, "__dict__") and not isinstance(x, type):
        y = copy.copy(x)
        memo[id(x)] = y
        for k, v in vars(x).items():
            y.__dict__[k] = _copy_structure(v, memo, home, seen, type(x).__name__)
        return y
    return x
