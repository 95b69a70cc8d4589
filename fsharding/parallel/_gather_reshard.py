"""``fs.gather(block, reshard_after_forward=True)``: the block's full params are not kept
for backward but gathered again when backward reaches the block (FSDP2's default).

Saved-tensor hooks installed around the block keep each saved view of a gathered full param
as a reference (index, size, stride, offset); its first unpack in backward all-gathers the
block's shards once more (one bucketed collective), later unpacks of the same block reuse
that copy, and it is dropped when every reference has been unpacked. Saved tensors that are
not gathered params go to the hook that was in force outside the block (``fs.offload``,
``fs.memory_report``), so those keep working. Inside a remat region nothing is installed
(checkpoint's hook must stay innermost, and the region saves no params anyway).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fsharding._compat import top_saved_tensors_hooks
from fsharding.parallel import _buckets as _lay
from fsharding.parallel.collectives import settle

if TYPE_CHECKING:
    from fsharding.parallel.gather import Sharding, _Plan

__all__ = ["PREFETCH", "Reshard"]


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


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
# per rank) for little overlap on CPU cores the compute already uses.
PREFETCH: bool | None = None


def _prefetches(group: Any) -> bool:
    if PREFETCH is not None:
        return PREFETCH
    import torch.distributed as dist

    return dist.get_backend(group) != "gloo"


class Reshard:
    """``gather(reshard_after_forward=True)``: saved-tensor hooks that keep views of the
    block's gathered full params as references and all-gather them again (once, for all of
    the block's params) when backward first unpacks one; the copy is dropped when backward
    has unpacked every reference. Other saved tensors go to the hook in force outside
    (``fs.offload``, ``fs.memory_report``), or are kept as usual.

    Backward prefetch (FSDP2's; not on gloo, see ``PREFETCH``): when a block re-gathers,
    the all-gather of the block that ran before it in forward (next in backward) is launched
    without waiting, so it overlaps this block's backward; at most two blocks' full params
    exist at once. Every rank runs the same graph, so every rank launches the same
    collectives in the same order.
    """

    def __init__(self, outer: tuple[Callable, Callable] | None, prev: Any):
        self.outer = outer
        self.prev = prev  # weakref to the reshard of the block before, or None
        self.index: dict[tuple[str, int], tuple[int, torch.dtype]] = {}
        self.plan: _Plan | None = None
        self.shards: list[torch.Tensor] = []
        self.cache: list[torch.Tensor] | None = None
        self.pending: list | None = None  # a launched (prefetched) all-gather
        self.packed = 0
        self.left = 0

    @staticmethod
    def wanted(s: Sharding) -> Reshard | None:
        """A reshard for this call, or None where it has no effect (stage 2, no grad, or
        inside a checkpoint region, whose hook must stay innermost)."""
        if s.fulls is not None or not torch.is_grad_enabled():
            return None
        from fsharding.transforms import remat as _remat

        if _remat._in_remat():
            return None
        top = top_saved_tensors_hooks()
        name = getattr(top[0], "__qualname__", "") if top is not None else ""
        if name.startswith(("_checkpoint_hook.", "_recomputation_hook.")):
            return None
        r = Reshard(top, s.last_reshard)
        s.last_reshard = weakref.ref(r)
        return r

    def learn(self, plan: _Plan, shards: list[torch.Tensor], fulls: tuple) -> None:
        if plan.fulls is not None or self.plan is not None:
            return
        self.plan, self.shards = plan, [t.detach() for t in shards]
        self.index = {_key(f): (i, f.dtype) for i, f in enumerate(fulls)}

    def pack(self, t: torch.Tensor) -> Any:
        try:
            hit = self.index.get(_key(t))
        except (RuntimeError, NotImplementedError):  # no storage (tensor subclasses)
            hit = None
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
                    _lay._C.wait_tensor(out)
                # and let gloo's worker drop it now, not during interpreter exit
                settle([(out, 1) for _, out in pending if out.device.type == "cpu"])
