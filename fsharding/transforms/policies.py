"""Remat policies: which values a checkpointed region saves, recomputes or offloads.

Owns the ``fs.policies`` namespace (this module is it): the built-in policies, the
``Offloadable`` answer, and the op ``fs.checkpoint_name`` tags a value with (read by
:func:`name_of`). ``fs.remat`` asks the policies and checks its ``policy=`` argument.

JAX's names and meanings (``jax.checkpoint_policies``). A policy is a small pure callable
``policy(op, *args, **kwargs)`` asked once per aten op that runs inside an ``fs.remat``
region (``op`` is a ``torch._ops.OpOverload`` such as ``torch.ops.aten.mm.default``, the
arguments are the op's own). It answers in one vocabulary shared by remat and offload:

* ``True`` — save the op's output for backward (kept on its device);
* ``False`` — recompute it in backward (the default for anything not named);
* :class:`Offloadable` ``(src, dst)`` — save it, but keep it on ``dst`` (host memory)
  until backward.

A value tagged with :func:`fsharding.checkpoint_name` reaches the policy as the op
``torch.ops.fsharding.checkpoint_name.default`` with arguments ``(x, name)``
(:func:`name_of` reads the name). Policies never see parameters or the region's inputs:
those are the region's inputs and are always kept.

Eager-mode note: PyTorch's selective checkpointing re-runs the region's Python code in
backward and skips only the ops whose outputs were saved. So ``dots_saveable`` skips the
matmuls (the expensive part) while the cheap ops around them are recomputed, and saving a
*named* value keeps it in memory (what a memory budget is about) while the code that
produced it still runs again. Under ``torch.compile`` the partitioner drops that code.

A saved value must not be modified in place later in the region (``F.dropout(h,
inplace=True)`` or ``ReLU(inplace=True)`` right after a saved matmul): backward then raises
torch's "Tensor cached during selective activation checkpoint has been mutated". Allowing it
(``allow_cache_entry_mutation=True``) would recompute from the modified value and give wrong
gradients without an error, so fsharding never does; use the out-of-place op.

Example:
    >>> import torch, fsharding as fs
    >>> fs.policies.dots_saveable(torch.ops.aten.mm.default)
    True
    >>> p = fs.policies.save_only_these_names("attn_out")
    >>> p(torch.ops.fsharding.checkpoint_name.default, torch.ones(1), "attn_out")
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "Offloadable",
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "save_only_these_names",
    "save_any_names_but_these",
    "save_and_offload_only_these_names",
    "name_of",
]


# The marker op fs.checkpoint_name runs inside a remat region whose policy reads names: a
# copy of ``x`` in value, the identity in gradient, visible to selective checkpointing as
# ``torch.ops.fsharding.checkpoint_name.default(x, name)``. (A custom op may not return an
# alias of its input, hence the copy; outside such regions checkpoint_name returns ``x``.)
@torch.library.custom_op("fsharding::checkpoint_name", mutates_args=())
def _checkpoint_name_op(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.clone()


@_checkpoint_name_op.register_fake
def _(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


_checkpoint_name_op.register_autograd(lambda ctx, grad: (grad, None))
_NAME_OP = torch.ops.fsharding.checkpoint_name.default


@dataclasses.dataclass(frozen=True)
class Offloadable:
    """A policy answer: save the value, but on ``dst`` until backward (JAX's ``Offloadable``).

    Attributes:
        src: where the value is computed; ``"device"``.
        dst: where it waits for backward; ``"cpu"`` (pinned host memory from CUDA).
    """

    src: str = "device"
    dst: str = "cpu"

    def __post_init__(self) -> None:
        if self.src != "device":
            raise ValueError(
                f"fs.policies.Offloadable: src must be 'device', got {self.src!r}; values are "
                "offloaded from the device they are computed on."
            )
        if self.dst != "cpu":
            raise ValueError(
                f"fs.policies.Offloadable: dst must be 'cpu', got {self.dst!r}; to keep saved "
                "values in a directory, use fs.offload(fs.remat(f), to=directory)."
            )


_Decision = bool | Offloadable


def name_of(op: Any, *args: Any) -> str | None:
    """The name of a value tagged by ``fs.checkpoint_name``, or None for any other op.

    Example:
        >>> import torch, fsharding as fs
        >>> fs.policies.name_of(torch.ops.fsharding.checkpoint_name.default, torch.ones(1), "h")
        'h'
        >>> x = torch.ones(1, 1)
        >>> fs.policies.name_of(torch.ops.aten.mm.default, x, x) is None
        True
    """
    return args[1] if op is _NAME_OP and len(args) > 1 else None


def _qualname(op: Any) -> str:
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else ""


# --------------------------------------------------------------------------------------
# op-based policies
# --------------------------------------------------------------------------------------

# Dots without batch dims (JAX: dot_general with no batch dimensions). A linear or matmul
# of a [B, T, D] input by a weight reaches the dispatcher as mm/addmm on a flattened view:
# its leading dims are free dims, not batch dims, exactly as in JAX, so it is saved.
_DOTS_NO_BATCH = frozenset(
    f"aten::{n}" for n in ("mm", "addmm", "mv", "addmv", "dot", "vdot", "_scaled_mm")
)
# Plus batched dots (bmm/baddbmm: attention scores), fused attention and convolutions.
_DOTS = _DOTS_NO_BATCH | {f"aten::{n}" for n in ("bmm", "baddbmm", "convolution")}
_SDPA_PREFIX = "aten::_scaled_dot_product_"


def everything_saveable(*_: Any, **__: Any) -> bool:
    """Save everything: the plain computation. ``fs.remat`` with it just calls ``fn``.

    Example:
        >>> import torch, fsharding as fs
        >>> fs.policies.everything_saveable(torch.ops.aten.sin.default)
        True
    """
    return True


def nothing_saveable(*_: Any, **__: Any) -> bool:
    """Save nothing but the region's inputs; recompute the rest (``fs.remat``'s default).

    Example:
        >>> import torch, fsharding as fs
        >>> fs.policies.nothing_saveable(torch.ops.aten.mm.default)
        False
    """
    return False


def dots_saveable(op: Any, *_: Any, **__: Any) -> bool:
    """Save matmul, fused-attention and convolution outputs; recompute everything else.

    Saved ops: ``mm``, ``addmm``, ``mv``, ``addmv``, ``dot``, ``vdot``, ``_scaled_mm``,
    ``bmm``, ``baddbmm``, every ``_scaled_dot_product_*`` attention op (its output and
    logsumexp) and ``convolution`` (JAX: ``dot_general`` and ``conv_general_dilated``).

    Example:
        >>> import torch, fsharding as fs
        >>> p = fs.policies.dots_saveable
        >>> p(torch.ops.aten.bmm.default), p(torch.ops.aten.gelu.default)
        (True, False)
    """
    name = _qualname(op)
    return (name in _DOTS or name.startswith(_SDPA_PREFIX)) and _functional(op)


def dots_with_no_batch_dims_saveable(op: Any, *_: Any, **__: Any) -> bool:
    """Save matmuls without batch dims (``mm``, ``addmm``, ``mv``, ``addmv``, ``dot``).

    JAX's heuristic for transformers: the projections are saved, the batched attention
    products (``bmm``, ``baddbmm``, fused attention) are recomputed. A linear layer on a
    ``[batch, seq, features]`` input counts as having no batch dims: PyTorch runs it as
    ``addmm`` on a flattened view, and in JAX its leading dims are free dims too.

    Example:
        >>> import torch, fsharding as fs
        >>> p = fs.policies.dots_with_no_batch_dims_saveable
        >>> p(torch.ops.aten.addmm.default), p(torch.ops.aten.bmm.default)
        (True, False)
    """
    return _qualname(op) in _DOTS_NO_BATCH and _functional(op)


def _functional(op: Any) -> bool:
    """Not an ``out=`` or in-place overload: its output is a fresh value worth saving (an
    ``out=`` buffer, e.g. inside torch.compile'd code, belongs to its caller)."""
    return not op._schema.is_mutable


# --------------------------------------------------------------------------------------
# name-based policies
# --------------------------------------------------------------------------------------


def _names(names: Iterable[Any], api: str, arg: str) -> frozenset[str]:
    if isinstance(names, str):
        raise TypeError(
            f"{api}: {arg} must be a collection of names, got the string {names!r}; pass "
            f"[{names!r}] for a single name."
        )
    out = frozenset(names)
    bad = [n for n in out if not isinstance(n, str)]
    if bad:
        raise TypeError(
            f"{api}: names must be strings (as given to fs.checkpoint_name), got {bad[0]!r} "
            f"({type(bad[0]).__name__}) in {arg}."
        )
    return out


@dataclasses.dataclass(frozen=True)
class SaveOnlyTheseNames:
    """Policy of :func:`save_only_these_names`."""

    names: frozenset[str]

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> bool:
        return name_of(op, *args) in self.names


@dataclasses.dataclass(frozen=True)
class SaveAnyNamesButThese:
    """Policy of :func:`save_any_names_but_these`."""

    names: frozenset[str]

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> bool:
        name = name_of(op, *args)
        return name is not None and name not in self.names


@dataclasses.dataclass(frozen=True)
class SaveAndOffloadOnlyTheseNames:
    """Policy of :func:`save_and_offload_only_these_names`."""

    names_which_can_be_saved: frozenset[str]
    names_which_can_be_offloaded: frozenset[str]
    offload_src: str = "device"
    offload_dst: str = "cpu"

    def __post_init__(self) -> None:
        both = self.names_which_can_be_saved & self.names_which_can_be_offloaded
        if both:
            raise ValueError(
                "fs.policies.save_and_offload_only_these_names: names_which_can_be_saved and "
                f"names_which_can_be_offloaded must not overlap, got {sorted(both)} in both; "
                "list each name in one of them."
            )
        # Validates src/dst with Offloadable's messages.
        object.__setattr__(self, "_offload", Offloadable(self.offload_src, self.offload_dst))

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> _Decision:
        name = name_of(op, *args)
        if name is None:
            return False
        if name in self.names_which_can_be_saved:
            return True
        if name in self.names_which_can_be_offloaded:
            return self._offload  # type: ignore[attr-defined]
        return False


def save_only_these_names(*names: str) -> SaveOnlyTheseNames:
    """Save only the values tagged with one of ``names``; recompute everything else.

    Example:
        >>> import torch, fsharding as fs
        >>> p = fs.policies.save_only_these_names("q", "k")
        >>> p(torch.ops.fsharding.checkpoint_name.default, torch.ones(1), "v")
        False
    """
    return SaveOnlyTheseNames(_names(names, "fs.policies.save_only_these_names", "names"))


def save_any_names_but_these(*names: str) -> SaveAnyNamesButThese:
    """Save every named value except those tagged with one of ``names``.

    Example:
        >>> import torch, fsharding as fs
        >>> p = fs.policies.save_any_names_but_these("big")
        >>> p(torch.ops.fsharding.checkpoint_name.default, torch.ones(1), "small")
        True
    """
    return SaveAnyNamesButThese(_names(names, "fs.policies.save_any_names_but_these", "names"))


def save_and_offload_only_these_names(
    *,
    names_which_can_be_saved: Iterable[str],
    names_which_can_be_offloaded: Iterable[str],
    offload_src: str = "device",
    offload_dst: str = "cpu",
) -> SaveAndOffloadOnlyTheseNames:
    """Save some named values on the device, offload others to host memory, recompute the rest.

    An offloaded value is copied to ``offload_dst`` (pinned CPU memory from CUDA) as soon as
    it is computed, its device copy is freed, and it is copied back when backward
    recomputes the region.

    Raises:
        ValueError: a name is in both sets, or ``offload_src``/``offload_dst`` is not
            ``"device"``/``"cpu"``.

    Example:
        >>> import torch, fsharding as fs
        >>> p = fs.policies.save_and_offload_only_these_names(
        ...     names_which_can_be_saved=["a"], names_which_can_be_offloaded=["b"])
        >>> p(torch.ops.fsharding.checkpoint_name.default, torch.ones(1), "b")
        Offloadable(src='device', dst='cpu')
    """
    api = "fs.policies.save_and_offload_only_these_names"
    return SaveAndOffloadOnlyTheseNames(
        _names(names_which_can_be_saved, api, "names_which_can_be_saved"),
        _names(names_which_can_be_offloaded, api, "names_which_can_be_offloaded"),
        offload_src,
        offload_dst,
    )
