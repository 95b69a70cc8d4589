"""What backward keeps: ``fs.print_saved_activations`` (JAX's ``print_saved_residuals``).

Owns the saved-activation report (``fs.saved_activations``, ``fs.print_saved_activations``)
and its recorder, which ``fs.remat`` regions report to through
``_context.SAVED_RECORDER``.

``saved_activations(fn, *args, **kwargs)`` runs ``fn`` forward once with every floating
argument leaf differentiable and reports each storage backward would keep:

* **saved** — packed by autograd's saved-tensor hooks outside any remat region, or held in
  a selective-checkpoint cache (a remat policy saved it; such caches bypass the hooks);
* **offloaded** — a remat policy answered ``Offloadable``: kept in host memory;
* **recomputed** — what autograd would save inside a remat region; checkpoint drops it and
  backward recomputes it.

Sizes are storage bytes, each storage counted once (a view keeps its whole storage). The
leaves of the first positional argument are the parameters (fsharding's ``fn(params,
*rest)`` convention, as in ``fs.value_and_grad``'s default ``argnums=0``), as are tensors
the function closes over that require grad (``nn.Parameter``): they are listed but
excluded from the totals. Other arguments count (a remat region's inputs are what it
keeps). This is the measurement ANCHORS.md uses: unique storages packed during a forward,
parameters excluded, plus tensors held in selective-checkpoint caches.

Example:
    >>> import torch, fsharding as fs
    >>> f = lambda w, x: torch.tanh(x @ w).sum()
    >>> report = fs.saved_activations(f, torch.ones(3, 3), torch.ones(4, 3))
    >>> report.saved_bytes  # x (for w's grad) and tanh's output, 4 x 3 float32 each
    96
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fsharding import _context
from fsharding import tree as _tree
from fsharding.transforms import policies as _policies

__all__ = ["SavedTensor", "SavedActivations", "saved_activations", "print_saved_activations"]

_RANK = {"saved": 0, "offloaded": 1, "recomputed": 2}


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One storage backward keeps (or would keep, before remat).

    Attributes:
        op: the op that produced the storage (``mm``, ``checkpoint_name[h]``), the
            argument path (``args[0]['w']``) for an argument, ``Parameter`` for a parameter
            the function closes over, ``(external)`` for another tensor made before it ran.
        shape: shape of the first tensor saved from this storage.
        dtype: its dtype.
        nbytes: bytes of the storage.
        status: ``"saved"``, ``"offloaded"`` or ``"recomputed"``.
        kind: ``"param"``, ``"input"`` (another argument) or ``"activation"``.
    """

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    status: str
    kind: str


@dataclasses.dataclass(frozen=True)
class SavedActivations:
    """The report of :func:`saved_activations`; ``str(report)`` is the printed table.

    Attributes:
        entries: one :class:`SavedTensor` per storage, in the order first seen.
        saved_bytes: bytes kept on their device for backward, parameters excluded.
        offloaded_bytes: bytes kept in host memory by remat policies.
        recomputed_bytes: bytes remat regions recompute instead of saving.
        param_bytes: bytes of parameters backward uses (not in the totals above).
    """

    entries: tuple[SavedTensor, ...]
    saved_bytes: int
    offloaded_bytes: int
    recomputed_bytes: int
    param_bytes: int

    def __str__(self) -> str:
        rows = [("op", "shape", "dtype", "bytes", "status", "kind")]
        for e in self.entries:
            dtype = str(e.dtype).removeprefix("torch.")
            rows.append((e.op, str(tuple(e.shape)), dtype, _fmt(e.nbytes), e.status, e.kind))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"saved {_fmt(self.saved_bytes)}, offloaded {_fmt(self.offloaded_bytes)}, "
            f"recomputed {_fmt(self.recomputed_bytes)}; parameters {_fmt(self.param_bytes)} "
            "(not counted)"
        )
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _op_name(func: Any, args: tuple) -> str:
    name = _policies.name_of(func, *args)
    if name is not None:
        return f"checkpoint_name[{name}]"
    return func._schema.name.removeprefix("aten::")


class _Producers(TorchDispatchMode):
    """Outermost mode: which op allocated each storage (the latest one at that address)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_key: dict[Any, str] = {}  # storage key -> op

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        if not isinstance(func, torch._ops.OpOverload):
            return out  # e.g. a compiled region run as one operator
        if not any(r.alias_info is not None for r in func._schema.returns):
            name = _op_name(func, args)
            for t in optree.tree_leaves(out):
                key = _tree.storage_key(t)
                if key is not None:
                    self.by_key[key] = name
        return out


class _Recorder:
    """Collects storages by status; remat regions report to it through
    ``_context.SAVED_RECORDER``."""

    def __init__(self, arguments: dict[Any, tuple[str, str]], producers: _Producers):
        self.arguments = arguments  # storage key -> (path, kind)
        self.producers = producers
        self.entries: dict[Any, dict[str, Any]] = {}  # storage key -> entry
        self.keep: list[Any] = []

    def _record(self, t: Any, status: str, op: str | None = None) -> None:
        key = _tree.storage_key(t)
        if key is None:  # not a tensor, meta, or empty (no storage to keep)
            return
        self.keep.append(t)
        old = self.entries.get(key)
        if old is not None:
            if _RANK[status] < _RANK[old["status"]]:
                old["status"] = status
            return
        base = t if t._base is None else t._base
        if key in self.arguments:
            op, kind = self.arguments[key]
        elif isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad):
            op, kind = type(base).__name__, "param"  # a parameter the function closes over
        else:
            op, kind = op or self.producers.by_key.get(key, "(external)"), "activation"
        self.entries[key] = dict(
            op=op,
            shape=tuple(t.shape),
            dtype=t.dtype,
            nbytes=t.untyped_storage().nbytes(),
            status=status,
            kind=kind,
        )

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t, "saved")
        return t

    def pack_in_region(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t, "recomputed")
        return t

    def cached(self, func: Any, out: Any) -> None:
        for t in optree.tree_leaves(out):
            self._record(t, "saved")

    def offloaded(self, func: Any, out: Any, host: Any) -> None:
        for t in optree.tree_leaves(out):
            self._record(t, "offloaded")

    def report(self) -> SavedActivations:
        entries = tuple(SavedTensor(**e) for e in self.entries.values())

        def total(status: str) -> int:
            return sum(e.nbytes for e in entries if e.status == status and e.kind != "param")

        return SavedActivations(
            entries=entries,
            saved_bytes=total("saved"),
            offloaded_bytes=total("offloaded"),
            recomputed_bytes=total("recomputed"),
            param_bytes=sum(e.nbytes for e in entries if e.kind == "param"),
        )


def saved_activations(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SavedActivations:
    """Runs ``fn(*args, **kwargs)`` forward and reports what its backward would keep.

    Every floating tensor leaf of ``args`` and ``kwargs`` is made differentiable (a fresh
    alias; the caller's tensors are untouched). The leaves of ``args[0]`` are the
    parameters. ``fn`` runs once, forward only; its output is dropped.

    Args:
        fn: the function to measure, e.g. a loss ``fn(params, batch)`` or a remat'd block.
        *args: its positional arguments; ``args[0]`` holds the parameters.
        **kwargs: its keyword arguments.

    Returns:
        A :class:`SavedActivations` report (``saved_bytes``, ``offloaded_bytes``, ...).

    Example:
        >>> import torch, fsharding as fs
        >>> block = lambda w, x: torch.tanh(torch.tanh(x @ w) @ w).sum()
        >>> w, x = torch.ones(8, 8), torch.ones(16, 8)
        >>> fs.saved_activations(block, w, x).saved_bytes
        1536
        >>> fs.saved_activations(fs.remat(block), w, x).saved_bytes  # only x is kept
        512
    """
    if not callable(fn):
        raise TypeError(
            f"fs.saved_activations: fn must be callable, got {type(fn).__name__}; pass the "
            "function first, then its arguments."
        )
    accessors, leaves, treedef = optree.tree_flatten_with_accessor((args, kwargs))
    arguments: dict[Any, tuple[str, str]] = {}  # storage key -> (path, kind)
    fresh = []
    for acc, leaf in zip(accessors, leaves):
        key = _tree.storage_key(leaf)
        if key is not None:
            is_param = isinstance(leaf, nn.Parameter) or acc[0].entry == acc[1].entry == 0
            arguments.setdefault(key, (_path(acc), "param" if is_param else "input"))
        if _tree.is_floating(leaf) and leaf.device.type != "meta":
            leaf = leaf.detach().requires_grad_(True)
        fresh.append(leaf)
    a, k = optree.tree_unflatten(treedef, fresh)
    producers = _Producers()
    recorder = _Recorder(arguments, producers)
    token = _context.SAVED_RECORDER.set(recorder)
    try:
        with torch.enable_grad(), producers:
            with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
                out = fn(*a, **k)
        report = recorder.report()
    finally:
        _context.SAVED_RECORDER.reset(token)
    del out
    return report


def _path(accessor: optree.PyTreeAccessor) -> str:
    """``args[1]['x']`` / ``kwargs['mask']`` for a leaf of ``(args, kwargs)``."""
    head, rest = accessor[:2], accessor[2:]
    root = f"args[{head[1].entry}]" if head[0].entry == 0 else f"kwargs[{head[1].entry!r}]"
    return root + rest.codify("")


def print_saved_activations(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SavedActivations:
    """Prints what backward keeps for ``fn(*args, **kwargs)`` and returns the report.

    One line per storage: producing op, shape, dtype, bytes, status (saved / offloaded /
    recomputed) and kind (param / input / activation), then the totals. See
    :func:`saved_activations` for what is measured.

    Example:
        >>> import torch, fsharding as fs
        >>> r = fs.print_saved_activations(lambda w, x: torch.tanh(x @ w).sum(),
        ...                                torch.ones(2, 2), torch.ones(3, 2))
        op       shape   dtype    bytes  status  kind
        ---------------------------------------------
        args[0]  (2, 2)  float32  16 B   saved   param
        args[1]  (3, 2)  float32  24 B   saved   input
        tanh     (3, 2)  float32  24 B   saved   activation
        saved 48 B, offloaded 0 B, recomputed 0 B; parameters 16 B (not counted)
    """
    report = saved_activations(fn, *args, **kwargs)
    print(report)
    return report
