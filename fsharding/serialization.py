"""Training state on disk: ``fs.save``, ``fs.load``, ``fs.latest`` and ``fs.CheckpointError``
(and ``fs.export``, re-exported from ``_export``: params as safetensors for other tools).

This module owns checkpoints of any training-state pytree (params, optimizer state such as
``optim``'s ``ScaleByAdamState``, ``fs.TrainState`` with its loss scale, schedule counts,
``torch.Generator`` states as uint8 tensors, strings, bools and ``None``). Tensors go
through torch.distributed.checkpoint (DCP), shard per rank: a ``DTensor`` leaf (``fs.zero``
stages 1-3 store ``Shard(0)`` on the dp mesh) is written by the ranks that hold its shards,
a plain tensor once (it is taken as replicated: the lowest rank holding its key writes it,
after every holder's bytes were compared by digest -- ranks holding different values under
one key, e.g. per-rank RNG states, raise and are told to use per-rank keys). Everything
else is written by fsharding itself, as JSON.

On-disk layout (format version 1) -- a checkpoint is a directory::

    <path>/
        fsharding.json   {"format": "fsharding-checkpoint", "version": 1, "step": int | null,
                          "time_ns": commit time, "world_size": ..., "torch": ...,
                          "leaves": {key: {"kind": "tensor", "dtype": "float32",
                                           "shape": [..]}
                                     | {"kind": "int" | "float" | "bool" | "str",
                                        "value": ...}}}
        .metadata        DCP's metadata (pickle), written with ``checkpoint_id`` cleared
        __<rank>_0.distcp   DCP's data, one file per rank that wrote shards

A leaf's key is its pytree path in JAX's ``keystr`` form (``.opt[1][0].mu['w']``), so any
tree with the same key paths loads it (``fs.zero``'s state has exactly
``fs.train_step``'s paths, so a ZeRO-3 checkpoint loads into one process). ``None`` is an
empty node (no key). ``fsharding.json`` is the commit marker and is written last.

Atomic commit: every rank writes into a temporary sibling ``<parent>/.<name>.partial-<id>``;
after DCP's last collective (all ranks' data written) rank 0 writes ``fsharding.json``,
fsyncs it and renames the directory to ``<path>``, then tells every rank the outcome. So
``<path>`` exists only when complete, a rank killed mid-save leaves a hidden partial
directory (never read, removable) and earlier checkpoints untouched. ``save`` refuses an
existing ``<path>``: give each checkpoint its own name, e.g. ``ckpt/step-000100``.
:func:`latest` lists the non-hidden subdirectories of a directory holding a readable
``fsharding.json`` and returns the one with the largest ``(step, time_ns)`` (a checkpoint
saved without ``step=`` counts as step -1: ordered by commit time among its kind).

``async_=True`` copies every tensor to CPU before returning (so later in-place updates,
e.g. ``donate=True`` steps, cannot reach the checkpoint), then writes and commits in a
background thread. That thread's collectives run on a separate gloo process group created
for checkpoints, never on the training's group, so a step's collectives and the write
overlap without interleaving. One save is in flight at a time: the next ``save`` (or
``load``) waits for the previous one first, and so does the process before it leaves
(``fs.launch``'s ranks after ``fn`` returns, a plain script at exit: ``_compat.drain``).

Safety: loading never runs code from a file. DCP reads ``.metadata`` with
``pickle.load`` and byte entries with ``torch.load(weights_only=False)``; here
``.metadata`` goes through a restricted unpickler whose allow-list is exactly what DCP's
metadata holds -- ``torch.distributed.checkpoint.metadata``'s ``Metadata``,
``MetadataIndex``, ``StorageMeta``, ``TensorProperties``, ``TensorStorageMetadata``,
``ChunkStorageMetadata``, ``_MEM_FORMAT_ENCODING``; ``filesystem._StorageInfo``;
``torch.Size``; ``torch.<dtype>`` attributes that are dtypes; ``torch.serialization.
_get_layout`` (looks a layout up by name); builtin containers and scalars need no entry
(no ``pathlib``: the path is cleared when writing). Each of these only stores values; any
other global (``os.system``, ``builtins.eval``, ...) raises :class:`CheckpointError`. The
metadata is then checked against ``fsharding.json`` (every field of the expected type, every
key a tensor of the recorded shape and dtype whose chunks tile it exactly, every storage a
plain file name of the checkpoint), tensors are read with ``torch.load(weights_only=True)``
by fsharding's own reader (each must have its chunk's dtype and shape), and no entry is
ever read as bytes. ``.metadata``, ``fsharding.json`` and data files are opened without
following symlinks and must be regular files (no FIFO: nothing blocks), and every slice
must lie inside its file. A tampered, truncated or foreign file (not an fsharding
checkpoint, or a newer format version) raises :class:`CheckpointError` naming the file.

Failures: a float leaf holding NaN or inf is refused (``allow_nonfinite=True`` to save it
anyway): fp16 overflow or a NaN loss never writes bad values into a checkpoint. Errors are
agreed between ranks before and after DCP's collectives, so when one rank fails every rank
raises (no hang), and a failed save leaves no ``<path>``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch
import torch.distributed as dist

from fsharding import _compat
from fsharding import tree as _tree
from fsharding._export import export

__all__ = ["CheckpointError", "save", "load", "latest", "export"]

_PyTree = Any

FORMAT = "fsharding-checkpoint"
VERSION = 1
INDEX = "fsharding.json"
_PARTIAL = ".partial-"
_VALUE_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


class CheckpointError(Exception):
    """A checkpoint could not be saved or loaded; the message names the file or pytree path.

    Example:
        >>> import fsharding as fs
        >>> issubclass(fs.CheckpointError, Exception)
        True
    """


# --------------------------------------------------------------------------------------
# ranks agreeing
# --------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(api: str, err: str | None, payload: Any, group: Any = None) -> list[Any]:
    """Every rank's ``payload``; raises on every rank when any rank has an error."""
    if not (dist.is_available() and dist.is_initialized()):
        if err:
            raise CheckpointError(err)
        return [payload]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, (err, payload), group=group)
    if err:
        raise CheckpointError(err)
    for rank, (e, _) in enumerate(out):
        if e:
            raise CheckpointError(f"{api}: rank {rank} failed: {e}")
    return [p for _, p in out]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences DCP's warning that a process without a group saves or loads alone (only
    on the main thread: ``catch_warnings`` restores process-wide filters on exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_error(api: str, path: str, e: BaseException) -> CheckpointError:
    """DCP's ``CheckpointException`` (a BaseException) as a CheckpointError."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, pair in sorted(failures.items()):
            exc = pair[0] if isinstance(pair, tuple) else pair
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        detail = "; ".join(parts)
    else:
        detail = f"{type(e).__name__}: {e}"
    return CheckpointError(f"{api}: {path}: {detail}")


# --------------------------------------------------------------------------------------
# the tree's leaves
# --------------------------------------------------------------------------------------


def _spec(x: Any) -> dict[str, Any]:
    if isinstance(x, torch.Tensor):
        return {"kind": "tensor", "dtype": str(x.dtype).removeprefix("torch."),
                "shape": list(x.shape)}  # fmt: skip
    return {"kind": _VALUE_KINDS[type(x)], "value": x}


def _check_leaf(path: str, x: Any, allow_nonfinite: bool) -> str | None:
    if isinstance(x, torch.Tensor):
        if x.is_meta or (_tree.is_dtensor(x) and x.to_local().is_meta):
            return f"fs.save: tree leaf {path} is a meta tensor (no values); save real tensors."
        return None
    if type(x) not in _VALUE_KINDS:
        return (
            f"fs.save: tree leaf {path} is {_tree.describe(x)}; a checkpoint holds tensors, "
            "DTensors, bool, int, float, str and None. Convert it (e.g. a generator's "
            "state: gen.get_state(), a uint8 tensor)."
        )
    if type(x) is float and not allow_nonfinite and not math.isfinite(x):
        return (
            f"fs.save: tree leaf {path} is {x!r}; a checkpoint refuses non-finite values "
            "(a NaN loss or fp16 overflow). Pass allow_nonfinite=True to save it anyway."
        )
    return None


def _check_tree(pairs: list[tuple[str, Any]], allow_nonfinite: bool) -> str | None:
    for path, x in pairs:
        err = _check_leaf(path, x, allow_nonfinite)
        if err:
            return err
    if allow_nonfinite:
        return None
    floats = [(p, x) for p, x in pairs if _tree.is_floating(x)]
    if floats and not bool(_tree.all_finite([x for _, x in floats])):
        for path, x in floats:
            if not bool(_tree.all_finite(x)):
                return (
                    f"fs.save: tree leaf {path} holds NaN or inf; a checkpoint refuses "
                    "non-finite values (a NaN loss or fp16 overflow). Pass "
                    "allow_nonfinite=True to save it anyway."
                )
    return None


def _merge(api: str, indexes: list[dict[str, dict[str, Any]]]) -> tuple[dict, str | None]:
    """One index from every rank's: a key on several ranks must agree (it is replicated)."""
    merged: dict[str, dict[str, Any]] = {}
    owner: dict[str, int] = {}
    for rank, index in enumerate(indexes):
        for key, spec in index.items():
            if key in merged and merged[key] != spec:
                return merged, (
                    f"{api}: tree leaf {key} differs between rank {owner[key]} "
                    f"({merged[key]}) and rank {rank} ({spec}); a key on several ranks is "
                    "taken as replicated. Save per-rank values under per-rank keys, e.g. "
                    '{"rng": {f"rank{r}": ...}}.'
                )
            merged.setdefault(key, spec)
            owner.setdefault(key, rank)
    return merged, None


# --------------------------------------------------------------------------------------
# DCP with a safe reader and a writer that clears the path
# --------------------------------------------------------------------------------------

_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
              "TensorStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    """Finds only the allow-listed globals (module docstring); anything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _open_regular(file: str, api: str = "fs.load") -> tuple[Any, int]:
    """``file`` opened for binary reading and its size: never through a symlink, never a
    FIFO or device (opened non-blocking, then checked to be a regular file)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(file, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        why = " (a symlink: a checkpoint's files are its own)" if os.path.islink(file) else ""
        raise CheckpointError(f"{api}: {file} cannot be opened{why}: {e}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{api}: {file} is not a regular file (a FIFO, device or directory); a "
                "checkpoint holds regular files only."
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _ints(x: Any, n: int | None = None) -> bool:
    """``x`` is a tuple (torch.Size) of non-negative ints, of length ``n`` if given."""
    return (
        isinstance(x, tuple)
        and (n is None or len(x) == n)
        and all(type(v) is int and v >= 0 for v in x)
    )


def _tiling_error(size: tuple[int, ...], chunks: Any, chunk_cls: type) -> str | None:
    """Why ``chunks`` do not tile a tensor of ``size`` exactly (in bounds, no overlap,
    volumes summing to its numel), or None."""
    if not isinstance(chunks, list):
        return f"chunks are {type(chunks).__name__}, not a list"
    boxes = []
    total = 0
    for c in chunks:
        if type(c) is not chunk_cls:
            return f"a chunk is {type(c).__name__}"
        off, sz = getattr(c, "offsets", None), getattr(c, "sizes", None)
        if not (_ints(off, len(size)) and _ints(sz, len(size))):
            return f"a chunk has offsets {off!r} and sizes {sz!r} for a {len(size)}-dim tensor"
        if any(o + n > d for o, n, d in zip(off, sz, size)):
            return f"chunk at {tuple(off)} of size {tuple(sz)} exceeds {tuple(size)}"
        volume = math.prod(sz)
        total += volume
        if volume:
            boxes.append((off, sz))
    if total != math.prod(size):
        return f"chunks hold {total} elements, the tensor {math.prod(size)}"
    boxes.sort()
    for i, (a_off, a_sz) in enumerate(boxes):  # a sweep along dim 0 (Shard(0): linear)
        for b_off, b_sz in boxes[i + 1 :]:
            if size and b_off[0] >= a_off[0] + a_sz[0]:
                break
            if all(b < a + m and a < b + n for a, m, b, n in zip(a_off, a_sz, b_off, b_sz)):
                return f"chunks at {tuple(a_off)} and {tuple(b_off)} overlap"
    return None


def _read_metadata(path: str, index: dict[str, dict[str, Any]]) -> Any:
    file = os.path.join(path, ".metadata")
    f, _ = _open_regular(file)
    try:
        with f:
            md = _Unpickler(f).load()
    except Exception as e:
        raise CheckpointError(
            f"fs.load: {file} is not a valid checkpoint metadata file ({type(e).__name__}: "
            f"{e}); it may be truncated or tampered with."
        ) from None
    try:
        _check_metadata(md, index)
    except _Mismatch as e:
        raise CheckpointError(f"fs.load: {file} does not match {INDEX}: {e}.") from None
    except Exception as e:  # a field of an unexpected type that a check did not foresee
        raise CheckpointError(
            f"fs.load: {file} is malformed ({type(e).__name__}: {e}); it may be tampered with."
        ) from None
    return md


class _Mismatch(Exception):
    pass


def _check_metadata(md: Any, index: dict[str, dict[str, Any]]) -> None:
    """Raises _Mismatch unless ``md`` is DCP Metadata of exactly ``index``'s tensors, every
    field of its type, chunks tiling each tensor, storage entries plain slices of files."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    sd = getattr(md, "state_dict_metadata", None)
    if type(md) is not Metadata or not isinstance(sd, dict):
        raise _Mismatch("not DCP Metadata")
    tensors = {k for k, s in index.items() if s["kind"] == "tensor"}
    if not all(isinstance(k, str) for k in sd) or set(sd) != tensors:
        extra = sorted(str(k) for k in set(sd) ^ tensors)
        raise _Mismatch(f"its keys differ at {extra[:3]}")
    chunks_of: set[tuple[str, tuple[int, ...]]] = set()
    for key, m in sd.items():
        want = index[key]
        if type(m) is not TensorStorageMetadata:
            raise _Mismatch(f"{key} is stored as {type(m).__name__}, not a tensor")
        size, props = getattr(m, "size", None), getattr(m, "properties", None)
        dtype = getattr(props, "dtype", None)
        if not _ints(size) or type(props) is not TensorProperties:
            raise _Mismatch(f"{key} has size {size!r} and properties {type(props).__name__}")
        if list(size) != want["shape"] or str(dtype) != f"torch.{want['dtype']}":
            raise _Mismatch(f"{key} is {dtype} {list(size)}")
        why = _tiling_error(tuple(size), getattr(m, "chunks", None), ChunkStorageMetadata)
        if why:
            raise _Mismatch(f"{key}: {why}; the chunks must tile the tensor exactly")
        chunks_of.update((key, tuple(c.offsets)) for c in m.chunks)
    storage = getattr(md, "storage_data", None)
    if not isinstance(storage, dict):
        raise _Mismatch("no storage table")
    stored: set[tuple[str, tuple[int, ...]]] = set()
    for where, info in storage.items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        ok = (
            type(where) is MetadataIndex and isinstance(where.fqn, str)
            and _ints(where.offset) and type(info) is _StorageInfo
            and isinstance(rel, str) and rel == os.path.basename(rel)
            and rel not in ("", ".", "..")
            and type(offset) is int and type(length) is int and offset >= 0 and length >= 0
            and not getattr(info, "transform_descriptors", None)
        )  # fmt: skip
        if not ok:
            raise _Mismatch(f"storage entry {info!r} is not a plain file slice of the checkpoint")
        stored.add((where.fqn, tuple(where.offset)))
    missing = sorted(chunks_of - stored)
    if missing:
        raise _Mismatch(f"no storage entry for the chunk {missing[0]}")


def _dcp_classes() -> tuple[type, type, type, type]:
    """The DCP writer, reader and planners, subclassed (imported on first use: DCP costs)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.default_planner import (
        DefaultLoadPlanner,
        DefaultSavePlanner,
    )
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadItemType

    class Writer(FileSystemWriter):
        def storage_meta(self) -> Any:  # no path in the metadata: it is renamed anyway
            return StorageMeta(checkpoint_id=None, save_id=getattr(self, "save_id", ""))

    class Reader(FileSystemReader):
        """Returns the metadata read by the restricted unpickler; reads tensors only, with
        ``weights_only=True``, never bytes."""

        def __init__(self, path: str, metadata: Any) -> None:
            super().__init__(path)
            self._fs_metadata = metadata
            self._fs_dir = path
            # (key, chunk offsets) -> (sizes, dtype): what each stored entry must be
            self._fs_chunks = {
                (key, tuple(c.offsets)): (tuple(c.sizes), m.properties.dtype)
                for key, m in metadata.state_dict_metadata.items()
                for c in m.chunks
            }

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._fs_metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            per_file: dict[str, list[Any]] = {}
            for item in plan.items:
                rel = self.storage_data[item.storage_index].relative_path
                per_file.setdefault(rel, []).append(item)
            for rel, items in per_file.items():
                file = os.path.join(self._fs_dir, rel)
                f, size = _open_regular(file)
                with f:
                    for req in items:
                        info = self.storage_data[req.storage_index]
                        if info.offset + info.length > size:
                            raise CheckpointError(
                                f"fs.load: {file} is truncated or tampered with: an entry of "
                                f"{info.length} bytes at offset {info.offset} ends past its "
                                f"{size} bytes."
                            )
                        where = (req.storage_index.fqn, tuple(req.storage_index.offset))
                        _read_item(f, file, info, req, planner, self._fs_chunks[where])
            fut: torch.futures.Future[None] = torch.futures.Future()
            fut.set_result(None)
            return fut

    def _read_item(
        f: Any, file: str, info: Any, req: Any, planner: Any, chunk: tuple[Any, Any]
    ) -> None:
        if req.type != LoadItemType.TENSOR:
            raise CheckpointError(f"fs.load: {file}: entry {req.storage_index} is not a tensor")
        f.seek(info.offset)
        buf = f.read(info.length)
        if len(buf) != info.length:
            raise CheckpointError(
                f"fs.load: {file} is truncated ({len(buf)} of {info.length} bytes at offset "
                f"{info.offset})."
            )
        try:
            t = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"fs.load: {file} holds an entry that is not a plain tensor ({type(e).__name__}"
                f": {str(e).splitlines()[0] if str(e) else ''}); it may be tampered with."
            ) from None
        if type(t) is not torch.Tensor:
            raise CheckpointError(f"fs.load: {file} holds a {type(t).__name__}, not a tensor.")
        sizes, dtype = chunk
        if t.dtype != dtype or tuple(t.shape) != sizes:
            raise CheckpointError(
                f"fs.load: {file}: entry {req.storage_index.fqn} is a {t.dtype} tensor of shape "
                f"{tuple(t.shape)}, the metadata says {dtype} {sizes}; it may be tampered with."
            )
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            t = t.narrow(dim, start, length)
        target = planner.resolve_tensor(req).detach()
        if target.size() != t.size():
            raise CheckpointError(
                f"fs.load: {file}: entry {req.storage_index.fqn} has shape {tuple(t.shape)}, "
                f"the metadata says {tuple(target.shape)}."
            )
        target.copy_(t)
        planner.commit_tensor(req, target)

    class LoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise CheckpointError("fs.load: a checkpoint never holds byte entries")

    _CLASSES = (Writer, Reader, DefaultSavePlanner, LoadPlanner)
    return _CLASSES


_CLASSES: tuple[type, type, type, type] | None = None


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------

_lock = threading.Lock()
_pending: concurrent.futures.Future[str] | None = None
# (the default group's id, the side group) of background saves; see _side_group
_side_groups: dict[int, Any] = {}


def _wait_pending() -> None:
    """Waits for the async save in flight, if any (its outcome stays in its future)."""
    global _pending
    with _lock:
        fut, _pending = _pending, None
    if fut is not None:
        concurrent.futures.wait([fut])


# fs.launch's ranks (after fn) and the interpreter at exit wait for a save in flight
_compat.register_drain(_wait_pending)


def _registered(group: Any) -> bool:
    """True while ``group`` is a live process group (not destroyed with its default group)."""
    try:
        return group in dist.distributed_c10d._world.pg_map
    except AttributeError:  # a torch without this registry: ask the public API
        try:
            dist.get_world_size(group)
            return True
        except Exception:  # noqa: BLE001 - a destroyed group
            return False


def _side_group() -> Any:
    """The gloo group of background saves (one per default group; created collectively).

    Keyed by the default group's id *and* checked to be still registered: after
    ``destroy_process_group()`` (which destroys every group) and a new
    ``init_process_group`` whose group may get the old id, a new side group is made; a
    stale one still registered (another default group) is destroyed first.
    """
    key = id(dist.group.WORLD)
    group = _side_groups.get(key)
    if group is not None and _registered(group):
        return group
    for stale in _side_groups.values():
        if _registered(stale):
            with contextlib.suppress(Exception):
                dist.destroy_process_group(stale)
    _side_groups.clear()
    _side_groups[key] = dist.new_group(backend="gloo")
    return _side_groups[key]


def _snapshot(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``x`` that no later in-place update reaches (a DTensor keeps its spec)."""
    if _tree.is_dtensor(x):
        from torch.distributed.tensor import DTensor

        local = x.to_local().detach().to("cpu", copy=True)
        return DTensor(local, x._spec, requires_grad=False)
    return x.detach().to("cpu", copy=True)


def save(
    path: str | os.PathLike[str],
    tree: _PyTree,
    *,
    async_: bool = False,
    step: int | None = None,
    allow_nonfinite: bool = False,
) -> Any:
    """Writes a training-state pytree to the new checkpoint directory ``path``, atomically.

    Call it on every rank with the same ``path``. Each rank writes its own shards (a
    DTensor leaf's local shard; a plain tensor once, as a replicated value). Ranks may pass
    different trees (e.g. each pipeline stage its own params under distinct keys); a key
    present on several ranks must have the same shape and dtype (the same value for
    non-tensor leaves). The directory appears only when complete (see the module
    docstring for the layout, the commit and :func:`latest`).

    Args:
        path: the checkpoint directory to create; must not exist (use one name per
            checkpoint, e.g. ``f"ckpt/step-{step:06d}"``).
        tree: tensors, DTensors, bool, int, float, str and None in any pytree (dicts,
            lists, tuples, NamedTuples such as optimizer states and ``fs.TrainState``).
        async_: return at once with a future while a background thread writes; tensors
            are copied to CPU first, so the caller may update them in place right away.
        step: the training step, recorded for :func:`latest` (newest = largest step).
        allow_nonfinite: save float leaves holding NaN or inf instead of refusing them.

    Returns:
        ``path`` as a string; with ``async_=True`` a ``concurrent.futures.Future`` whose
        ``result()`` returns it once committed (or raises ``fs.CheckpointError``).

    Raises:
        CheckpointError: on every rank, when any rank has a bad leaf (the message names its
            path), a non-finite float, a different ``path``, ``path`` exists, or writing
            fails.

    Example:
        >>> import tempfile, torch, fsharding as fs
        >>> d = tempfile.mkdtemp()
        >>> fs.save(f"{d}/step-1", {"w": torch.ones(2), "count": 1}, step=1) == f"{d}/step-1"
        True
        >>> fs.load(fs.latest(d), {"w": torch.zeros(2), "count": 0})
        {'w': tensor([1., 1.]), 'count': 1}
    """
    _wait_pending()
    api = "fs.save"
    path = os.path.abspath(os.fspath(path))
    rank, world = _world()
    pairs: list[tuple[str, Any]] = []
    try:  # any local failure is agreed below: every rank raises, none waits for a peer
        pairs = _tree.leaves_with_path(tree)
        err = _check_tree(pairs, allow_nonfinite)
        if err is None and os.path.lexists(path):
            err = f"{api}: {path} exists; save each checkpoint to a new path (e.g. step-numbered)."
        if err is None and step is not None and (type(step) is not int or step < 0):
            err = f"{api}: step must be a non-negative int or None, got {step!r}."
        index = {} if err else {p: _spec(x) for p, x in pairs}
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err, index = f"{api}: checking tree failed: {type(e).__name__}: {e}", {}
    token = uuid.uuid4().hex[:12]
    dtensors = sorted(p for p, x in pairs if _tree.is_dtensor(x)) if not err else []
    payload = (path, token, index, dtensors)
    everyone = _agree(api, err, payload)
    if any(p[0] != path for p in everyone):
        paths = sorted({p[0] for p in everyone})
        raise CheckpointError(f"{api}: ranks passed different paths {paths}; pass the same one.")
    merged, err = _merge(api, [p[2] for p in everyone])
    if err:
        raise CheckpointError(err)
    token = everyone[0][1]
    replicas = _replicas(merged, everyone)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}{_PARTIAL}{token}")
    tensors = {p: x for p, x in pairs if isinstance(x, torch.Tensor)}
    meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
            "torch": torch.__version__, "leaves": merged}  # fmt: skip
    if not async_:
        tensors = {p: (x if _tree.is_dtensor(x) else x.detach()) for p, x in tensors.items()}
        return _write(api, path, tmp, tensors, meta, None, rank, world, replicas)
    group = _side_group() if world > 1 else None
    snap = {p: _snapshot(x) for p, x in tensors.items()}
    if any(x.is_cuda for x in tensors.values()):
        torch.cuda.synchronize()
    fut: concurrent.futures.Future[str] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(_write(api, path, tmp, snap, meta, group, rank, world, replicas))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            fut.set_exception(e if isinstance(e, Exception) else CheckpointError(str(e)))

    global _pending
    with _lock:
        _pending = fut
    threading.Thread(target=run, name="fsharding-save", daemon=False).start()
    return fut


def _write(
    api: str,
    path: str,
    tmp: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    group: Any,
    rank: int,
    world: int,
    replicas: dict[str, list[int]],
) -> str:
    """Replicas compared, DCP's save into ``tmp``, then rank 0 commits by rename; every rank
    learns the outcome."""
    import torch.distributed.checkpoint as dcp

    if replicas:
        _check_replicas(api, replicas, tensors, group)
    writer_cls, _, planner_cls, _ = _dcp_classes()
    err: str | None = None
    try:
        os.makedirs(tmp, exist_ok=True)
        with _quiet():
            dcp.save(
                tensors,
                storage_writer=writer_cls(tmp),
                planner=planner_cls(flatten_state_dict=False, flatten_sharded_tensors=False),
                process_group=group,
                no_dist=world == 1,
            )
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            raise
        err = str(_dcp_error(api, path, e))
    if err is None and rank == 0:
        try:
            _commit(path, tmp, meta)
        except Exception as e:  # noqa: BLE001 - told to every rank below
            err = f"{api}: committing {path} failed: {type(e).__name__}: {e}"
    if world > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0, group=group)
        err = err or box[0]
    if err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(err)
    return path


def _replicas(merged: dict[str, dict[str, Any]], everyone: list[Any]) -> dict[str, list[int]]:
    """The plain-tensor keys held by several ranks (taken as replicated), with their ranks."""
    holders: dict[str, list[int]] = {}
    dtensors: set[str] = set()
    for rank, (_, _, index, dts) in enumerate(everyone):
        dtensors.update(dts)
        for key in index:
            holders.setdefault(key, []).append(rank)
    return {
        k: ranks
        for k, ranks in sorted(holders.items())
        if len(ranks) > 1 and merged[k]["kind"] == "tensor" and k not in dtensors
    }


def _digest(t: torch.Tensor) -> str:
    """A digest of ``t``'s bytes (its dtype and shape are compared by the index)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    h = hashlib.sha1(usedforsecurity=False)  # a consistency check, not a security one
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _check_replicas(
    api: str, replicas: dict[str, list[int]], tensors: dict[str, torch.Tensor], group: Any
) -> None:
    """Raises on every rank when ranks hold different bytes under one plain-tensor key
    (only those keys are hashed, each by the ranks holding it)."""
    err, digests = None, {}
    try:
        digests = {k: _digest(tensors[k]) for k in replicas if k in tensors}
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err = f"{api}: comparing replicated tensors failed: {type(e).__name__}: {e}"
    everyone = _agree(api, err, digests, group)
    for key, ranks in replicas.items():
        first = everyone[ranks[0]][key]
        for r in ranks[1:]:
            if everyone[r][key] != first:
                raise CheckpointError(
                    f"{api}: tree leaf {key} holds different values on rank {ranks[0]} and "
                    f"rank {r}; a plain tensor under the same key on several ranks is taken "
                    "as replicated and written once. Save per-rank values (e.g. generator "
                    'states) under per-rank keys, e.g. {f"rng_rank{r}": ...}, or as a '
                    "DTensor sharded over the ranks."
                )


def _commit(path: str, tmp: str, meta: dict[str, Any]) -> None:
    meta = dict(meta, time_ns=time.time_ns())
    file = os.path.join(tmp, INDEX)
    with open(file, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _compat.fsync_dir(tmp)
    if os.path.lexists(path):
        raise FileExistsError(path)
    os.rename(tmp, path)
    _compat.fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


def _read_index(path: str, api: str = "fs.load") -> dict[str, Any]:
    """``path``'s checked index; any failure (also a RecursionError of a deeply nested JSON)
    is a CheckpointError naming the file."""
    try:
        return _read_index_unchecked(path, api)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the content, the file is bad
        file = os.path.join(path, INDEX)
        raise CheckpointError(
            f"{api}: {file} is unreadable ({type(e).__name__}: {str(e)[:200]}); truncated, "
            "damaged or tampered with?"
        ) from None


def _read_index_unchecked(path: str, api: str) -> dict[str, Any]:
    file = os.path.join(path, INDEX)
    if not os.path.lexists(file):
        what = "a partial checkpoint" if _PARTIAL in os.path.basename(path) else "not one"
        raise CheckpointError(
            f"{api}: {file} not found: {path} is not an fsharding checkpoint ({what}; a "
            "checkpoint is complete once fs.save committed it)."
        )
    f, _ = _open_regular(file, api)
    try:
        with f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{api}: {file} is unreadable ({e}); truncated or damaged?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{api}: {file} is not an fsharding checkpoint index.")
    version = meta.get("version")
    if type(version) is not int or version > VERSION or version < 1:
        raise CheckpointError(
            f"{api}: {file} has format version {version!r}; this fsharding reads versions "
            f"1 to {VERSION}. Load it with the fsharding that wrote it."
        )
    leaves = meta.get("leaves")
    ok = isinstance(leaves, dict) and all(
        isinstance(s, dict)
        and (
            (s.get("kind") == "tensor" and isinstance(s.get("dtype"), str)
             and isinstance(getattr(torch, s["dtype"], None), torch.dtype)
             and isinstance(s.get("shape"), list)
             and all(type(n) is int and n >= 0 for n in s["shape"]))
            or (s.get("kind") in _VALUE_KINDS.values()
                and type(s.get("value")).__name__ == s["kind"])
        )
        for s in leaves.values()
    )  # fmt: skip
    if not ok:
        raise CheckpointError(f"{api}: {file} has a malformed leaf table.")
    return meta


def _match(path: str, index: dict[str, Any], pairs: list[tuple[str, Any]]) -> str | None:
    for key, x in pairs:
        spec = index.get(key)
        if spec is None:
            return (
                f"fs.load: like has leaf {key}, missing from the checkpoint {path} (keys "
                f"there: {sorted(index)[:8]}{' ...' if len(index) > 8 else ''})."
            )
        if isinstance(x, torch.Tensor):
            if spec["kind"] != "tensor":
                return f"fs.load: leaf {key} is a {spec['kind']} in {path}, a tensor in like."
            dtype = str(x.dtype).removeprefix("torch.")
            if list(x.shape) != spec["shape"]:
                return (
                    f"fs.load: leaf {key} has shape {tuple(spec['shape'])} in {path}, "
                    f"{tuple(x.shape)} in like."
                )
            if dtype != spec["dtype"]:
                return f"fs.load: leaf {key} is {spec['dtype']} in {path}, {dtype} in like."
        elif type(x) in _VALUE_KINDS:
            if spec["kind"] != _VALUE_KINDS[type(x)]:
                got = f"a {spec['dtype']} tensor" if spec["kind"] == "tensor" else spec["kind"]
                return f"fs.load: leaf {key} is {got} in {path}, {type(x).__name__} in like."
        else:
            return (
                f"fs.load: like leaf {key} is {_tree.describe(x)}; like holds tensors, "
                "DTensors, meta tensors, bool, int, float, str and None."
            )
    return None


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """A new buffer in ``x``'s layout (never ``x`` itself: DCP loads in place)."""
    if _tree.is_dtensor(x):
        from torch.distributed.tensor import empty

        return empty(x.shape, dtype=x.dtype, device_mesh=x.device_mesh, placements=x.placements)
    device = "cpu" if x.is_meta else x.device
    return torch.empty(x.shape, dtype=x.dtype, device=device)


def load(path: str | os.PathLike[str], like: _PyTree) -> _PyTree:
    """Reads a checkpoint into a **new** tree laid out like ``like``; never writes ``like``.

    ``like`` gives the structure and, per tensor leaf, the layout of the result: a plain
    tensor (its device), a DTensor (its mesh and placements: any world size or ZeRO stage
    other than the one that saved), or a meta tensor (shape and dtype; loaded onto CPU).
    Non-tensor leaves give their type; their values come from the checkpoint. Under a
    process group call it on every rank; without one it loads in this process alone.
    Tensor leaves come back as plain tensors or DTensors without ``requires_grad``, also
    where ``like`` holds an ``nn.Parameter`` (wrap them again if a module needs them).

    Args:
        path: a checkpoint directory written by :func:`save` (e.g. ``fs.latest(dir)``).
        like: a pytree with the checkpoint's key paths (e.g. ``step.init(params)``'s output).

    Returns:
        A tree of ``like``'s structure holding the checkpoint's values.

    Raises:
        CheckpointError: on every rank, when ``path`` is not a complete fsharding
            checkpoint, a file is damaged or tampered with (the message names it), or the
            structure differs (a key missing from the checkpoint or from every rank's
            ``like``, another shape, dtype or kind; the message names the pytree path).

    Example:
        >>> import tempfile, torch, fsharding as fs
        >>> path = fs.save(tempfile.mkdtemp() + "/ckpt", {"w": torch.arange(3.0)})
        >>> fs.load(path, {"w": torch.empty(3, device="meta")})["w"]
        tensor([0., 1., 2.])
    """
    import torch.distributed.checkpoint as dcp

    _wait_pending()
    api = "fs.load"
    path = os.path.abspath(os.fspath(path))
    rank, world = _world()
    pairs: list[tuple[str, Any]] = []
    err, md, index = None, None, {}
    try:
        pairs = _tree.leaves_with_path(like)
        index = _read_index(path)["leaves"]
        err = _match(path, index, pairs)
        if err is None:
            md = _read_metadata(path, index)
    except CheckpointError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err = f"{api}: reading {path} failed: {type(e).__name__}: {e}"
    keys = _agree(api, err, [k for k, _ in pairs])
    extra = sorted(set(index) - {k for ks in keys for k in ks})
    if extra:
        raise CheckpointError(
            f"{api}: the checkpoint {path} has leaf {extra[0]} that like lacks "
            f"({len(extra)} such: {extra[:4]}); pass a like with every saved key."
        )
    _, reader_cls, _, planner_cls = _dcp_classes()
    targets = {k: _fresh(x) for k, x in pairs if isinstance(x, torch.Tensor)}
    if targets or world > 1:
        try:
            with _quiet():
                dcp.load(
                    targets,
                    storage_reader=reader_cls(path, md),
                    planner=planner_cls(flatten_state_dict=False, flatten_sharded_tensors=False),
                    no_dist=world == 1,
                )
        except BaseException as e:
            if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
                raise
            if isinstance(e, CheckpointError):
                raise
            raise _dcp_error(api, path, e) from None
    leaves = [targets[k] if k in targets else index[k]["value"] for k, _ in pairs]
    return optree.tree_unflatten(optree.tree_structure(like), leaves)


# --------------------------------------------------------------------------------------
# latest
# --------------------------------------------------------------------------------------


def latest(directory: str | os.PathLike[str]) -> str | None:
    """The newest complete checkpoint directly under ``directory``, or None.

    Looks at the non-hidden subdirectories holding a readable ``fsharding.json`` (the
    commit marker, written last) of a format this fsharding reads; partial saves (hidden
    ``.<name>.partial-<id>`` directories) and foreign directories are ignored. Newest =
    largest ``(step, commit time)``, a checkpoint saved without ``step=`` counting as -1.

    Args:
        directory: where the checkpoints were saved (need not exist).

    Returns:
        The checkpoint's path (a string) or None when there is none.

    Example:
        >>> import tempfile, torch, fsharding as fs
        >>> d = tempfile.mkdtemp()
        >>> fs.latest(d) is None
        True
        >>> for s in (2, 10):
        ...     _ = fs.save(f"{d}/step-{s}", {"w": torch.zeros(1)}, step=s)
        >>> fs.latest(d).endswith("step-10")
        True
    """
    directory = os.fspath(directory)
    best: tuple[tuple[int, int], str] | None = None
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        if name.startswith("."):
            continue
        path = os.path.join(directory, name)
        try:
            meta = _read_index(path, api="fs.latest")
        except Exception:  # noqa: BLE001 - an unreadable entry is not a checkpoint
            continue
        step, when = meta.get("step"), meta.get("time_ns")
        key = (step if type(step) is int else -1, when if type(when) is int else 0)
        if best is None or key > best[0]:
            best = (key, path)
    return None if best is None else best[1]


def _benchmark(tree: _PyTree, directory: str, *, repeats: int = 3) -> dict[str, float]:
    """Seconds (min over ``repeats``) of ``fs.save``/``fs.load`` of ``tree`` against
    ``dcp.save``/``dcp.load`` of the same tensors used directly, on this process group.

    For benchmarks: call it on every rank (e.g. under ``fs.launch``); ``directory`` must be
    shared by the ranks. Returns ``{"fs.save", "fs.load", "dcp.save", "dcp.load"}``.
    """
    import torch.distributed.checkpoint as dcp

    rank, world = _world()
    tensors = {p: x for p, x in _tree.leaves_with_path(tree) if isinstance(x, torch.Tensor)}
    times: dict[str, list[float]] = {k: [] for k in ("fs.save", "fs.load", "dcp.save", "dcp.load")}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        if world > 1:
            dist.barrier()
        times[name].append(time.perf_counter() - t0)

    alone = world == 1
    for i in range(repeats):
        ours, theirs = os.path.join(directory, f"fs-{i}"), os.path.join(directory, f"dcp-{i}")
        fresh = {k: _fresh(x) for k, x in tensors.items()}
        with _quiet():
            timed("fs.save", lambda p=ours: save(p, tree))
            timed("fs.load", lambda p=ours: load(p, tree))
            timed("dcp.save", lambda p=theirs: dcp.save(tensors, checkpoint_id=p, no_dist=alone))
            timed("dcp.load", lambda p=theirs, f=fresh: dcp.load(f, checkpoint_id=p, no_dist=alone))
    return {k: min(v) for k, v in times.items()}
