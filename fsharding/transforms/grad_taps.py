"""Gradient taps: hand a param's gradient to a listener the moment autograd produces it.

``fs.value_and_grad`` differentiates fresh aliases of the leaves it is given. While a
:class:`Taps` is in force (:func:`tapping`), it attaches a tensor hook to the alias of every
leaf the taps name (by identity), so the listener sees each gradient during backward --
``fs.zero`` uses this to launch a bucket's reduction while backward goes on with earlier
layers (DDP's overlap, without owning the model). A tap only observes: the hook returns
nothing, so gradients are unchanged. Whether the grads the grad function finally returns
are the tapped ones is the listener's to check (accumulation, unscaling or a second
backward break that).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["Taps", "tap", "tapping"]

_ACTIVE: contextvars.ContextVar[Taps | None] = contextvars.ContextVar(
    "fsharding_grad_taps", default=None
)


class Taps:
    """Listeners by leaf: ``on_grad(i, grad)`` for ``leaves[i]``'s gradient."""

    def __init__(
        self, leaves: Sequence[torch.Tensor], on_grad: Callable[[int, torch.Tensor], None]
    ):
        self.leaves = list(leaves)  # held: the ids below stay theirs while the taps live
        self.index = {id(x): i for i, x in reversed(list(enumerate(self.leaves)))}
        self.on_grad = on_grad


def tap(original: object, fresh: torch.Tensor) -> torch.Tensor:
    """Called by ``fs.value_and_grad`` for each differentiated leaf and its fresh alias."""
    taps = _ACTIVE.get()
    if taps is not None:
        i = taps.index.get(id(original))
        if i is not None:
            on_grad = taps.on_grad
            fresh.register_hook(lambda g: on_grad(i, g))
    return fresh


@contextlib.contextmanager
def tapping(taps: Taps | None) -> Iterator[None]:
    """``taps`` in force for the ``fs.value_and_grad`` calls inside (None: none)."""
    token = _ACTIVE.set(taps)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
