"""Fallbacks for torch APIs newer than the oldest torch fsharding supports (``torch>=2.6``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["top_saved_tensors_hooks"]

_TOP = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def top_saved_tensors_hooks() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The innermost saved-tensor hooks in force on this thread (pack, unpack), or None."""
    if _TOP is not None:
        return _TOP(True)
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


_LOCAL = threading.local()

if _TOP is None:
    # torch 2.6 cannot read the hook stack (no _top_saved_tensors_default_hooks): mirror what
    # saved_tensors_hooks (and checkpoint's hooks, its subclasses) push, per thread.
    _hooks = torch.autograd.graph.saved_tensors_hooks
    _enter, _exit = _hooks.__enter__, _hooks.__exit__

    def _tracked_enter(self: Any) -> None:
        _enter(self)
        if not hasattr(_LOCAL, "stack"):
            _LOCAL.stack = []
        _LOCAL.stack.append((self.pack_hook, self.unpack_hook))

    def _tracked_exit(self: Any, *args: Any) -> None:
        _exit(self, *args)
        stack = getattr(_LOCAL, "stack", None)
        if stack:
            stack.pop()

    _hooks.__enter__ = _tracked_enter  # type: ignore[method-assign]
    _hooks.__exit__ = _tracked_exit  # type: ignore[method-assign]
