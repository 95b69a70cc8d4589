"""Training state on disk: ``fs.save``, ``fs.load``, ``fs.latest`` and ``fs.CheckpointError``
(and ``fs.export``, re-exported from ``_export``: params as safetensors for other tools).

This module owns checkpoints of any training-state pytree (params, optimizer state such as
``optim``'s ``ScaleByAdamState``, ``fs.TrainState`` with its loss scale, schedule counts,
``torch.Generator`` states as uint8 tensors, strings, bools and ``None``). Tensors go
through torch.distributed.checkpoint (DCP), shard per rank: a ``DTensor`` leaf (``fs.zero``
stages 1-3 store ``Shard(0)`` on the dp mesh) is written by the ranks that hold its shards,
a plain tensor once (it is taken as replicated: the lowest rank holding its key writes it).
Everything else is written by fsharding itself, as JSON.

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
``load``) waits for the previous one first.

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
metadata is then checked against ``fsharding.json`` (every key a tensor of the recorded
shape and dtype, every storage a plain file name of the checkpoint), tensors are read with
``torch.load(weights_only=True)`` by fsharding's own reader, and no entry is ever read as
bytes. A tampered, truncated or foreign file (not an fsharding checkpoint, or a newer
format version) raises :class:`CheckpointError` naming the file.

Failures: a float leaf holding NaN or inf is refused (``allow_nonfinite=True`` to save it
anyway): fp16 overflow or a NaN loss never writes bad values into a checkpoint. Errors are
agreed between ranks before and after DCP's collectives, so when one rank fails every rank
raises (no hang), and a failed save leaves no ``<path>``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import os
import pickle
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optree
import torch
import torch.distributed as dist

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


def _read_metadata(path: str, index: dict[str, dict[str, Any]]) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            md = _Unpickler(f).load()
    except Exception as e:
        raise CheckpointError(
            f"fs.load: {file} is not a valid checkpoint metadata file ({type(e).__name__}: "
            f"{e}); it may be truncated or tampered with."
        ) from None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"fs.load: {file} does not match {INDEX}: {why}.")

    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict):
        raise bad("not DCP Metadata")
    tensors = {k for k, s in index.items() if s["kind"] == "tensor"}
    if set(md.state_dict_metadata) != tensors:
        extra = sorted(set(md.state_dict_metadata) ^ tensors)
        raise bad(f"its keys differ at {extra[:3]}")
    for key, m in md.state_dict_metadata.items():
        want = index[key]
        if type(m) is not TensorStorageMetadata:
            raise bad(f"{key} is stored as {type(m).__name__}, not a tensor")
        if list(m.size) != want["shape"] or str(m.properties.dtype) != f"torch.{want['dtype']}":
            raise bad(f"{key} is {m.properties.dtype} {list(m.size)}")
    if not isinstance(md.storage_data, dict):
        raise bad("no storage table")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        ok = (
            isinstance(rel, str) and rel == os.path.basename(rel) and rel not in ("", ".", "..")
            and isinstance(info.offset, int) and isinstance(info.length, int)
            and info.offset >= 0 and info.length >= 0
            and not getattr(info, "transform_descriptors", None)
        )  # fmt: skip
        if not ok:
            raise bad(f"storage entry {info!r} is not a plain file slice of the checkpoint")
    return md


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

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._fs_metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            per_file: dict[str, list[Any]] = {}
            for item in plan.items:
                rel = self.storage_data[item.storage_index].relative_path
                per_file.setdefault(rel, []).append(item)
            for rel, items in per_file.items():
                file = os.path.join(self._fs_dir, rel)
                with open(file, "rb") as f:
                    for req in items:
                        _read_item(f, file, self.storage_data[req.storage_index], req, planner)
            fut: torch.futures.Future[None] = torch.futures.Future()
            fut.set_result(None)
            return fut

    def _read_item(f: Any, file: str, info: Any, req: Any, planner: Any) -> None:
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
_side_groups: dict[int, Any] = {}


def _wait_pending() -> None:
    global _pending
    with _lock:
        fut, _pending = _pending, None
    if fut is not None:
        concurrent.futures.wait([fut])


def _side_group() -> Any:
    """The gloo group of background saves (one per default group; created collectively)."""
    world = dist.group.WORLD
    key = id(world)
    if key not in _side_groups:
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
    payload = (path, token, index)
    everyone = _agree(api, err, payload)
    if any(p[0] != path for p in everyone):
        paths = sorted({p[0] for p in everyone})
        raise CheckpointError(f"{api}: ranks passed different paths {paths}; pass the same one.")
    merged, err = _merge(api, [p[2] for p in everyone])
    if err:
        raise CheckpointError(err)
    token = everyone[0][1]
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}{_PARTIAL}{token}")
    tensors = {p: x for p, x in pairs if isinstance(x, torch.Tensor)}
    meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
            "torch": torch.__version__, "leaves": merged}  # fmt: skip
    if not async_:
        tensors = {p: (x if _tree.is_dtensor(x) else x.detach()) for p, x in tensors.items()}
        return _write(api, path, tmp, tensors, meta, None, rank, world)
    group = _side_group() if world > 1 else None
    snap = {p: _snapshot(x) for p, x in tensors.items()}
    if any(x.is_cuda for x in tensors.values()):
        torch.cuda.synchronize()
    fut: concurrent.futures.Future[str] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(_write(api, path, tmp, snap, meta, group, rank, world))
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
) -> str:
    """DCP's save into ``tmp``, then rank 0 commits by rename; every rank learns the outcome."""
    import torch.distributed.checkpoint as dcp

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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(path: str, tmp: str, meta: dict[str, Any]) -> None:
    meta = dict(meta, time_ns=time.time_ns())
    file = os.path.join(tmp, INDEX)
    with open(file, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.lexists(path):
        raise FileExistsError(path)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


def _read_index(path: str, api: str = "fs.load") -> dict[str, Any]:
    file = os.path.join(path, INDEX)
    if not os.path.isfile(file):
        what = "a partial checkpoint" if _PARTIAL in os.path.basename(path) else "not one"
        raise CheckpointError(
            f"{api}: {file} not found: {path} is not an fsharding checkpoint ({what}; a "
            "checkpoint is complete once fs.save committed it)."
        )
    try:
        with open(file) as f:
            meta = json.load(f)
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
        except CheckpointError:
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
