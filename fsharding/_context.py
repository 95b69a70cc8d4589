"""Every ambient channel of fsharding, declared in one place.

Layers talk to each other through a few :class:`contextvars.ContextVar` s: a value set by an
outer transform for the calls below it (the mesh ``fs.shard`` binds, the sharding
``fs.zero`` gathers with, the remat regions running, a ``fs.memory_report`` measuring). They
are invisible in the import graph, so they are all declared here, with who sets and who reads
each; the modules that own a concept keep the functions that use them. This module imports
nothing of fsharding: any layer may use it.

Gradient taps (below the declarations): hand a param's gradient to a listener the moment
autograd produces it.

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
from typing import Any

import torch

__all__ = ["Taps", "tap", "tapping"]

# --------------------------------------------------------------------------------------
# the channels (name: value type -- set by; read by)
# --------------------------------------------------------------------------------------

# Taps | None -- fs.zero's overlap (parallel/zero, parallel/_overlap); read by tap() below,
# which fs.value_and_grad calls for every differentiated leaf.
GRAD_TAPS: contextvars.ContextVar[Any] = contextvars.ContextVar("fsharding_grad_taps", default=None)

# Mesh | None -- fs.shard binds its mesh; read by the collectives (parallel/collectives).
MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("fsharding_mesh", default=None)

# Sharding | None -- fs.zero(stage=3) and fs.gather's sharded call (parallel/gather); read
# by fs.gather blocks and fs.functional's apply entry (params no gather block owns).
SHARDING: contextvars.ContextVar[Any] = contextvars.ContextVar("fsharding_sharding", default=None)

# LiveBytes | None -- fs.memory_report through fs.zero; read by parallel/gather (bytes of
# gathered params alive).
GATHERED_TRACKER: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fsharding_gathered_tracker", default=None
)

# (tensors, module | None) | None -- set by fs.functional's wrapped blocks (functional) to
# the state the block may write: its params and buffers, plus the plain tensor attributes
# of module's modules; read by fs.remat's recomputation guard (transforms/remat), which
# leaves its per-op guard out when the forward wrote none of it.
REGION_STATE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fsharding_region_state", default=None
)

# tuple[_Frame, ...] -- the fs.remat regions running on this thread, innermost last
# (set by transforms/remat); non-empty: a region runs, and the transforms that install
# saved-tensor hooks step aside (fs.offload, parallel/gather's reshard).
REMAT_FRAMES: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "fsharding_remat_frames", default=()
)

# recorder | None -- set by fs.print_saved_activations (introspect) while it measures saved
# activations; read by transforms/remat.
SAVED_RECORDER: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fsharding_saved_recorder", default=None
)

# list | None -- records of what fs.offload moved (source data_ptr, nbytes, path): tests and
# introspection (transforms/offload).
OFFLOAD_RECORD: contextvars.ContextVar[Any] = contextvars.ContextVar("fs_offload_record")

# Callable[[list[float]], None] | None -- fs.zero's hook: the outermost fs.accumulate with
# weights reports them before any microbatch runs (transforms/accumulate).
ACCUMULATE_REPORT: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fs_accumulate_report_weights", default=None
)

# _Measure | None -- fs.memory_report while it measures a step (memory); read by fs.zero.
MEMORY_MEASURE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fsharding_memory_measure", default=None
)

# Callables set by fs.zero for the optimizer (optim/base): the global norm of sharded
# leaves, per-leaf norms of sharded leaves, and an all-reduce for a decision every rank must
# take alike (apply_if_finite's flag).
SHARDED_NORM: contextvars.ContextVar[Any] = contextvars.ContextVar("fs_sharded_norm", default=None)
SHARDED_LEAF_NORMS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fs_sharded_leaf_norms", default=None
)
REDUCE_ALL: contextvars.ContextVar[Any] = contextvars.ContextVar("fs_reduce_all", default=None)

# bool -- optim.apply_updates_ / Step.step(donate=True): the update may write into params
# (optim/base).
DONATING: contextvars.ContextVar[bool] = contextvars.ContextVar("fs_donating", default=False)

# --------------------------------------------------------------------------------------
# gradient taps
# --------------------------------------------------------------------------------------


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
    taps = GRAD_TAPS.get()
    if taps is not None:
        i = taps.index.get(id(original))
        if i is not None:
            on_grad = taps.on_grad
            fresh.register_hook(lambda g: on_grad(i, g))
    return fresh


@contextlib.contextmanager
def tapping(taps: Taps | None) -> Iterator[None]:
    """``taps`` in force for the ``fs.value_and_grad`` calls inside (None: none)."""
    token = GRAD_TAPS.set(taps)
    try:
        yield
    finally:
        GRAD_TAPS.reset(token)
