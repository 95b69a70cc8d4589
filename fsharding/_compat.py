"""Workarounds for torch, the bottom layer every fsharding module may import.

Owns:

- :func:`top_saved_tensors_hooks`: a fallback for a torch API newer than the oldest torch
  fsharding supports (``torch>=2.6``);
- :func:`use_counts` / :func:`settle`: the gloo exit workaround. A CPU collective returns
  only once gloo's worker thread has let go of its tensors, or the process can die with
  SIGABRT at interpreter exit (see :func:`settle`). Every module that waits on a
  ``torch.distributed`` collective (the named-axis collectives, ZeRO's buckets, the
  optimizers' DTensor reductions) calls them;
- :func:`register_drain` / :func:`drain`: work to finish before a process leaves (an
  ``fs.save(..., async_=True)`` still writing). ``fs.launch``'s ranks run :func:`drain`
  after ``fn`` returns, before destroying their process group; it also runs at
  interpreter exit (``atexit``) for plain ``torchrun`` scripts;
- :func:`fsync_dir`: make a rename or a new file in a directory durable, where the
  platform has directory file descriptors (``fs.save``'s commit, ``fs.export``'s files).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "top_saved_tensors_hooks",
    "use_counts",
    "settle",
    "register_drain",
    "drain",
    "fsync_dir",
]

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


# --------------------------------------------------------------------------------------
# gloo: return from a collective only after its worker thread has dropped the work
# --------------------------------------------------------------------------------------

# How long settle() waits at most for a backend thread to drop a finished collective.
_SETTLE_S = 2.0
_SETTLE_WARNED = False
_HAS_USE_COUNT = hasattr(torch.Tensor, "_use_count")


def use_counts(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """The C++ use count of each CPU tensor of ``tensors`` now, for :func:`settle`.

    Take it just before a collective: :func:`settle` then waits for the counts to come back.

    Args:
        tensors: the tensors a collective is about to read or write.

    Returns:
        ``(tensor, use count)`` for each CPU tensor (empty under ``torch.compile`` or on a
        torch without ``Tensor._use_count``).
    """
    if not _HAS_USE_COUNT or _compiling():
        return []
    return [(t, t._use_count()) for t in tensors if t.device.type == "cpu"]


def settle(pending: Sequence[tuple[torch.Tensor, int]]) -> None:
    """Waits until a finished CPU collective's work object has let go of its tensors.

    Waits (releasing the GIL) until each ``(tensor, count)`` of ``pending`` has a C++ use
    count of at most ``count`` (1 for a tensor the collective returned), for at most
    ``_SETTLE_S`` seconds; warns once if it gives up.

    Why: gloo runs every collective on a worker thread, which drops the work (and its
    references to the input and output tensors) a little after the waiting thread has
    returned. On torch >= 2.9 a tensor seen by Python keeps its PyObject alive while other
    C++ references exist (c10/util/intrusive_ptr.h, "PyObject preservation"), so that last
    drop decrefs the PyObject, which takes the GIL on the worker thread. If the interpreter
    has begun finalizing by then (a script whose last statement is a collective, under
    torchrun), taking the GIL ends the thread inside the work's noexcept destructor:
    ``terminate called without an active exception``, SIGABRT at exit. After settle no work
    holds Python-visible tensors, so nothing is left for a worker thread to do at exit.
    CUDA tensors are skipped (NCCL's watchdog drops its works later; waiting for it would
    synchronise with the GPU).

    Args:
        pending: ``(tensor, count)`` pairs: from :func:`use_counts` for a collective's
            inputs, ``(out, 1)`` for a tensor it returned. Drop every ``Work`` object
            first (a live ``Work`` holds its tensors).
    """
    if not _HAS_USE_COUNT or _compiling():
        return
    pending = [(t, n) for t, n in pending if t.device.type == "cpu"]
    if all(t._use_count() <= n for t, n in pending):
        return
    deadline = time.monotonic() + _SETTLE_S
    delay = 0.0
    while time.monotonic() < deadline:
        time.sleep(delay)  # releases the GIL, which the worker's decref needs
        if all(t._use_count() <= n for t, n in pending):
            return
        delay = min(1e-3, max(1e-6, 2 * delay))
    global _SETTLE_WARNED
    if not _SETTLE_WARNED:  # a reference kept elsewhere (e.g. a Work object): say so once
        _SETTLE_WARNED = True
        warnings.warn(
            f"fsharding settle(): a collective's tensor was still referenced by another "
            f"owner after {_SETTLE_S:g} s (an fsharding bug: a Work object or buffer kept "
            "alive); continuing. Please report it.",
            RuntimeWarning,
            stacklevel=2,
        )


def _compiling() -> bool:
    """Under torch.compile the collectives are traced: nothing to wait for."""
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------
# work to finish before the process leaves
# --------------------------------------------------------------------------------------

_DRAINS: list[Callable[[], None]] = []


def register_drain(callback: Callable[[], None]) -> None:
    """Registers ``callback`` (no arguments) to run in :func:`drain`; once per callable.

    For work a process must finish before it exits or destroys its process group, e.g.
    a background checkpoint write whose collectives need every rank's group alive.

    Args:
        callback: waits for the pending work; must not raise for the work's own failure
            (that belongs to whoever started the work, e.g. a future's ``result()``).
    """
    if callback not in _DRAINS:
        _DRAINS.append(callback)


def drain() -> None:
    """Runs every :func:`register_drain` callback, in registration order.

    ``fs.launch``'s ranks call it when ``fn`` returns, before the group is destroyed; it
    runs at interpreter exit too (after Python has joined non-daemon threads, so there it
    only finishes what such a join left). A callback that raises is reported as a warning
    and the others still run.
    """
    for callback in list(_DRAINS):
        try:
            callback()
        except Exception as e:  # noqa: BLE001 - every callback runs
            warnings.warn(
                f"fsharding drain(): {getattr(callback, '__qualname__', callback)} raised "
                f"{type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=2,
            )


atexit.register(drain)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` the directory ``path`` (its entries: a rename, a new file), best effort: a
    platform without directory file descriptors, or a failing fsync, is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
