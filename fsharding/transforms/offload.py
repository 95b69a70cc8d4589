"""Offload: keep what ``fn`` saves for backward, or an optimizer's state, on CPU or on disk.

This module owns ``fs.offload`` (its arguments and dispatch) and the offload of a
function's saved activations (saved-tensor hooks, host copies, files); on an
``optim.GradientTransformation`` it returns ``optim/offload``'s offloaded optimizer.

``fs.offload(f, to=...)`` runs ``f`` under ``torch.autograd.graph.saved_tensors_hooks``: each
tensor autograd saves for backward during ``f`` is moved to ``to`` when it is saved and
brought back when backward needs it.

* ``to="cpu"``: a CPU copy (pinned memory when the tensor is on CUDA). The copy is always a
  distinct storage — also on a CPU-only machine — so the original memory is freed as soon as
  nothing else holds it.
* ``to=<directory>``: one temporary file per storage in that directory, raw bytes, read back
  exactly (bit-identical gradients). A file is removed when the last saved tensor using it is
  released: after backward (autograd frees saved tensors as it goes), when the graph is freed
  without backward, and at once when ``f`` raises.

What is never copied: parameters (autograd leaves that require grad, and views of them) and
every tensor ``f`` receives as an autograd leaf (params, the batch): those stay alive outside
``f`` anyway, so copying them would add memory rather than move it. What ``f`` computes —
activations, and non-leaf inputs such as a previous block's output — is offloaded. Each
storage is offloaded once per version however many saved tensors view it (torch would pack
a tensor saved by two ops twice).

Composition (see DESIGN.md): ``offload(remat(f))`` keeps only the remat region's inputs, on
``to`` (DeepSpeed's cpu_checkpointing: checkpoint saves its inputs through the saved-tensor
hooks). Inside ``remat`` an ``offload`` does nothing: the region is recomputed, and an inner
hook would shadow checkpoint's (torch runs only the innermost hook) and silently turn the
recompute off. A selective remat policy's cached outputs bypass the hooks; to offload what a
policy saves use ``fs.policies.save_and_offload_only_these_names``.

On an ``optim.GradientTransformation`` the state lives on ``to`` and the update runs there;
see ``fsharding.optim.offload``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar, overload

import optree
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fsharding import _context
from fsharding._compat import top_saved_tensors_hooks
from fsharding.optim.base import GradientTransformation
from fsharding.optim.offload import offload_optimizer
from fsharding.transforms import remat as _remat

__all__ = ["offload"]

_F = TypeVar("_F", bound=Callable[..., Any])
_PathLike = str | os.PathLike


@overload
def offload(
    fn_or_optimizer: None = None, /, *, to: _PathLike = "cpu", chunk_bytes: int = ...
) -> Callable[[_F], _F]: ...
@overload
def offload(
    fn_or_optimizer: GradientTransformation, /, *, to: _PathLike = "cpu", chunk_bytes: int = ...
) -> GradientTransformation: ...
@overload
def offload(fn_or_optimizer: _F, /, *, to: _PathLike = "cpu", chunk_bytes: int = ...) -> _F: ...


def offload(
    fn_or_optimizer: Any = None, /, *, to: _PathLike = "cpu", chunk_bytes: int = 64 * 2**20
) -> Any:
    """Keeps ``fn``'s saved activations, or an optimizer's state, on CPU or on disk.

    Args:
        fn_or_optimizer: a function (its saved-for-backward tensors are offloaded) or an
            ``optim.GradientTransformation`` (its state lives on ``to`` and its update runs
            there). ``None`` returns a decorator.
        to: ``"cpu"`` or a ``str``/``os.PathLike`` naming an existing directory.
        chunk_bytes: for an optimizer offloaded to disk, the most bytes of optimizer state
            read into memory at once (state is streamed: read, update, write back, drop).
            Unused for functions and for ``to="cpu"``.

    Returns:
        The offloaded function (same values and gradients, bitwise), or the offloaded
        ``GradientTransformation`` (same updates, bitwise, for element-wise optimizers).

    Raises:
        TypeError: ``to`` or ``chunk_bytes`` has a wrong type, or the argument is neither
            callable nor a ``GradientTransformation``.
        ValueError: ``to`` is not ``"cpu"`` nor an existing directory, or ``chunk_bytes <= 0``.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.offload(lambda w, x: (x @ w).tanh().sum(), to="cpu")
        >>> w, x = torch.ones(3, 2), torch.ones(4, 3)
        >>> fs.grad(f)(w, x).shape
        torch.Size([3, 2])
    """
    target = _check_to(to)
    _check_chunk_bytes(chunk_bytes)
    if fn_or_optimizer is None:
        return functools.partial(offload, to=to, chunk_bytes=chunk_bytes)
    if isinstance(fn_or_optimizer, GradientTransformation):
        return offload_optimizer(fn_or_optimizer, target, chunk_bytes)
    if not callable(fn_or_optimizer):
        raise TypeError(
            "fs.offload: the first argument must be a function or an "
            f"optim.GradientTransformation, got {type(fn_or_optimizer).__name__}. Use "
            "fs.offload(f, to=...), @fs.offload(to=...) or fs.offload(optim.adamw(...), to=...)."
        )
    return _offload_fn(fn_or_optimizer, target)


def _check_to(to: Any) -> str:
    """``"cpu"`` or the absolute path of an existing directory."""
    if isinstance(to, str) and to == "cpu":
        return "cpu"
    if isinstance(to, (str, os.PathLike)):
        path = os.fspath(to)
        if isinstance(path, str) and os.path.isdir(path):
            return os.path.abspath(path)
        raise ValueError(
            f"fs.offload: to={to!r} is neither 'cpu' nor an existing directory. Pass "
            "to='cpu', or create the directory first (os.makedirs(path, exist_ok=True)) and "
            "pass its path."
        )
    raise TypeError(
        f"fs.offload: to must be 'cpu' or a str/os.PathLike naming an existing directory, "
        f"got {to!r} of type {type(to).__name__}."
    )


def _check_chunk_bytes(chunk_bytes: Any) -> None:
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool):
        raise TypeError(
            f"fs.offload: chunk_bytes must be an int number of bytes, got {chunk_bytes!r} of "
            f"type {type(chunk_bytes).__name__} (e.g. chunk_bytes=64 * 2**20)."
        )
    if chunk_bytes <= 0:
        raise ValueError(
            f"fs.offload: chunk_bytes must be > 0, got {chunk_bytes}; pass a positive size "
            "such as 64 * 2**20 (64 MiB)."
        )


# --------------------------------------------------------------------------------------
# offloading a function
# --------------------------------------------------------------------------------------

_CHECKPOINT_HOOKS = ("_checkpoint_hook.", "_recomputation_hook.")


def _inside_remat() -> bool:
    """True inside a remat region (its forward or its recomputation), or wherever torch's
    checkpoint hook is the innermost saved-tensor hook (``torch.utils.checkpoint`` called
    directly, e.g. Hugging Face gradient checkpointing): offloading there would shadow it."""
    if _remat.in_remat():
        return True
    top = top_saved_tensors_hooks()
    return top is not None and getattr(top[0], "__qualname__", "").startswith(_CHECKPOINT_HOOKS)


def _offload_fn(fn: _F, target: str) -> _F:
    @functools.wraps(fn)
    def offloaded(*args: Any, **kwargs: Any) -> Any:
        if _inside_remat():
            return fn(*args, **kwargs)
        packer = _Packer(target, optree.tree_leaves((args, kwargs)))
        try:
            with torch.autograd.graph.saved_tensors_hooks(packer.pack, _unpack):
                return fn(*args, **kwargs)
        except BaseException:
            packer.discard()
            raise
        finally:
            packer.close()

    return offloaded  # type: ignore[return-value]


# Records of what was offloaded (tests and introspection): (source data_ptr, nbytes, path).
_RECORD = _context.OFFLOAD_RECORD


@contextlib.contextmanager
def _recording() -> Iterator[list[tuple[int, int, str | None]]]:
    """Collects ``(source data_ptr, nbytes, file or None)`` per storage offloaded within."""
    log: list[tuple[int, int, str | None]] = []
    token = _RECORD.set(log)
    try:
        yield log
    finally:
        _RECORD.reset(token)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Entry:
    """One offloaded storage (a host copy or a file), shared by every saved view of it.

    It lives as long as some saved tensor (a :class:`_Handle`) refers to it; its file is
    removed when it dies (a finalizer) or when the forward raised (:meth:`discard`).
    """

    def __init__(self, storage: torch.UntypedStorage, target: str):
        self.device = storage.device
        self.nbytes = storage.nbytes()
        self.handles = 0
        self.unpacked = 0
        self.cache: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self.path: str | None = None
        self.discarded = False
        src = _bytes_of(storage)
        cuda = src.device.type == "cuda"
        if target == "cpu":
            self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=cuda)
            self.host.copy_(src, non_blocking=cuda)
            return
        host = src.cpu() if src.device.type != "cpu" else src
        fd, self.path = tempfile.mkstemp(prefix="fs-offload-", suffix=".bin", dir=target)
        self._finalizer = weakref.finalize(self, _remove, self.path)
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(host.numpy()))

    def load(self) -> torch.Tensor:
        """The storage's bytes on its original device (uint8, 1-D)."""
        if self.discarded:
            raise RuntimeError(
                "fs.offload: a saved tensor was unpacked after its offloaded copy was "
                "discarded because the forward pass raised; rerun the forward pass."
            )
        if self.cache is not None:
            return self.cache
        cuda = self.device.type == "cuda"
        if self.host is not None:
            data = self.host
        else:
            data = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=cuda)
            with open(self.path, "rb") as f:  # type: ignore[arg-type]
                if f.readinto(memoryview(data.numpy())) != self.nbytes:
                    raise RuntimeError(f"fs.offload: offload file {self.path} was truncated.")
        if data.device != self.device:
            data = data.to(self.device, non_blocking=cuda)
        return data

    def discard(self) -> None:
        self.discarded = True
        self.host = self.cache = None
        if self.path is not None:
            self._finalizer()


class _Handle(NamedTuple):
    """What autograd keeps for one offloaded saved tensor: its entry and its view."""

    entry: _Entry
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]


def _unpack(packed: Any) -> torch.Tensor:
    if not isinstance(packed, _Handle):
        return packed
    entry = packed.entry
    data = entry.load()
    entry.unpacked += 1
    # Keep a reloaded storage for its other views until each view was unpacked once.
    entry.cache = data if entry.unpacked % entry.handles and data is not entry.host else None
    out = torch.empty(0, dtype=packed.dtype, device=entry.device)
    return out.set_(data.untyped_storage(), packed.offset, packed.size, packed.stride)


class _Packer:
    """The pack hook of one call of an offloaded function."""

    def __init__(self, target: str, inputs: list[Any]):
        self.target = target
        # Storages ``fn`` received as autograd leaves (params, the batch): never copied.
        self.keep = {
            StorageWeakRef(x.untyped_storage())
            for x in inputs
            if _offloadable(x) and x.grad_fn is None
        }
        # Keyed by StorageWeakRef, not tree.storage_key: an activation saved here may be freed
        # before the forward ends and its address reused by a later one (also at version 0);
        # a weak storage ref keeps the storage's identity from being reused while it is a key.
        self.entries: dict[tuple[StorageWeakRef, int], weakref.ref[_Entry]] = {}
        self.record = _RECORD.get(None)

    def pack(self, t: torch.Tensor) -> Any:
        if not _offloadable(t) or _is_param(t):
            return t
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref in self.keep or storage.nbytes() == 0:
            return t
        # A storage is copied once per version (views share the version counter).
        key = (ref, t._version)
        found = self.entries.get(key)
        entry = found() if found is not None else None
        if entry is None:
            entry = _Entry(storage, self.target)
            self.entries[key] = weakref.ref(entry)
            if self.record is not None:
                self.record.append((storage.data_ptr(), entry.nbytes, entry.path))
        entry.handles += 1
        return _Handle(entry, t.dtype, t.storage_offset(), t.size(), t.stride())

    def discard(self) -> None:
        """The forward raised: drop every copy and file made so far."""
        for ref in self.entries.values():
            entry = ref()
            if entry is not None:
                entry.discard()

    def close(self) -> None:
        self.entries = {}
        self.keep = set()


def _offloadable(x: Any) -> bool:
    return (
        type(x) in (torch.Tensor, torch.nn.Parameter)
        and x.layout == torch.strided
        and x.device.type != "meta"
    )


def _is_param(t: torch.Tensor) -> bool:
    """An autograd leaf that requires grad, or a view of one (``w.t()`` saved by linear)."""
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad
