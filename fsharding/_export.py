"""``fs.export``: a params pytree as safetensors files + a JSON index, readable without fsharding.

The Hugging Face layout, so ``safetensors.torch.load_file``, ``model.load_state_dict`` and
``transformers``' ``from_pretrained(directory)`` read it as they read ``save_pretrained``'s:

- one file: ``model.safetensors``;
- several: ``model-00001-of-0000N.safetensors`` ... and ``model.safetensors.index.json``
  holding ``{"metadata": {"total_size": <bytes>}, "weight_map": {name: file}}``.

Names are the module's own state-dict names: the keys of a flat dict (``fs.functional``'s
params) as they are, nested dicts and sequences joined with ``"."`` (``{"h": [{"w": t}]}``
-> ``h.0.w``, as ``nn.ModuleList`` names its children).

The safetensors format is written here (an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {"format": "pt"}}``
padded with spaces to 8 bytes, then each tensor's raw little-endian bytes in header order),
so fsharding needs no new dependency; the tests read it back with the ``safetensors``
package.

**Streaming.** Every header is computed from shapes and dtypes before any data moves, so
each file is written tensor by tensor: a DTensor leaf is gathered (``full_tensor()``, after
the ``dtype=`` cast, on the shards) just before its bytes are written and dropped after.
Peak memory is about the largest tensor (its gathered copy, a cast or a device-to-CPU copy
of it); no file is ever assembled in memory. Measured (``tests/test_export.py``, peak RSS
growth): 16.3 MiB on each of 2 gloo ranks for 16 DTensors of 8 MiB (128 MiB), gloo's
all-gather holding a second full-size buffer; 2.0 MiB for 2 MiB tensors cast to bf16.

**Several processes.** In a process group (``torchrun``, ``fs.launch``) ``export`` is a
collective: every rank of the default group calls it with its own params (a call on one
rank alone waits for the others until the group's timeout), and every rank returns the same
weight map. Each rank's names and shapes are exchanged first (bad input on
any rank raises on every rank, before any data moves). A name held by one rank (a pipeline
stage's params) is written by that rank; a name held by several ranks -- a DTensor, or a
replicated plain tensor (checked to be bitwise the same on each rank: a BLAKE2 digest) -- is
written by the lowest of them. A DTensor is gathered by a collective that every rank of the
writer's mesh joins, leaf by leaf in one global order (replicas on other meshes, e.g. HSDP's
other replicate groups, skip it). So with ``fs.zero`` rank 0 writes every file while the
other ranks join the gathers (stage 3) or digest their replicas (stages 0-2). Each file has
one writer; ``path`` must be a directory that every writing rank sees (a shared filesystem
when ranks are on several machines).

**Atomic.** Each file is written under a temporary name in ``path`` and renamed when
complete (after ``fsync``). An export becomes visible when its ``model.safetensors``
(one file) or its index (several) appears, which happens only after every file it names is
complete: a previous export's index (and its ``model.safetensors`` when the new export has
several files) is removed before any new file is written, and its leftover
``model-*-of-*.safetensors`` files after the new index is in place.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsharding import _compat
from fsharding import tree as _tree
from fsharding._compat import settle, use_counts

__all__ = ["export"]

_API = "fs.export"
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default

# torch dtype -> safetensors dtype string (the ones safetensors and this torch both know).
_DTYPES: dict[torch.dtype, str] = {}
for _name, _code in [
    ("float64", "F64"),
    ("float32", "F32"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int64", "I64"),
    ("int32", "I32"),
    ("int16", "I16"),
    ("int8", "I8"),
    ("uint8", "U8"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("bool", "BOOL"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("complex64", "C64"),
]:
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPES[getattr(torch, _name)] = _code

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass
class _Leaf:
    """One tensor to export: where it came from and what will be written."""

    where: str  # the pytree path (or module attribute) it was found at, for messages
    value: torch.Tensor
    dtensor: bool
    mesh_ranks: frozenset[int]  # a DTensor's: the global ranks of its device mesh
    shape: tuple[int, ...]
    dtype: torch.dtype  # as written (after the dtype= cast)


def export(
    path: str | os.PathLike[str],
    params: Any,
    *,
    module: nn.Module | None = None,
    max_shard_size: int | str = _DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Writes ``params`` as safetensors files plus a JSON index: a checkpoint for inference
    and for other libraries, read without fsharding.

    The Hugging Face layout (``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
    and ``model.safetensors.index.json``), named with the module's state-dict names, written
    tensor by tensor (peak memory about the largest tensor, never a whole file or model),
    each file atomically. In a process group every rank calls it (a collective): DTensor
    leaves (``fs.zero`` stage 3) are gathered one at a time, pipeline ranks contribute their
    own stages' params, and one index names every rank's tensors. Use ``fs.save`` for
    training state that ``fs.load`` resumes.

    Args:
        path: a directory (created if missing) that every writing rank sees. Files of a
            previous export there are replaced.
        params: a dict of tensors keyed by state-dict name (``fs.functional``'s params,
            ``fs.zero``'s sharded params), or nested dicts / lists of them, whose keys are
            joined with ``"."``; or a list of such dicts (a pipeline rank's virtual stages,
            each keyed by the whole model's names), taken together. Keys must be strings;
            ``None`` leaves are skipped. Tensors may be DTensors or on any device; they are
            read, never changed.
        module: the ``nn.Module`` the params belong to, to add what
            ``module.load_state_dict(strict=True)`` also expects: its persistent buffers
            (the module's values) and every other name of a tied weight (written as its own
            copy of the data: safetensors stores no aliases). A parameter missing from
            ``params`` is not taken from the module (a pipeline rank passes its stages' own
            params; the module's copy may be stale). Without it, exactly the
            names of ``params`` are written (``fs.functional`` lists a tied weight once,
            which ``transformers``' ``from_pretrained`` re-ties).
        max_shard_size: the largest file, in bytes or as a string (``"5GB"``, ``"500MB"``,
            ``"2GiB"``); a tensor larger than this gets a file of its own. Default ``"5GB"``
            (``save_pretrained``'s).
        dtype: cast floating-point tensors to this floating dtype while writing (e.g.
            ``torch.bfloat16`` for a half-size checkpoint); integer and bool tensors are
            written as they are. None (default): every tensor in its own dtype.

    Returns:
        The weight map ``{name: file name}`` of what was written (the same on every rank).

    Raises:
        TypeError: ``params`` is not a dict, or holds a non-string key or a non-tensor leaf
            (the message names its pytree path); ``module``, ``dtype`` or
            ``max_shard_size`` of the wrong type.
        ValueError: two leaves map to one name; a meta, sparse or unsupported-dtype tensor;
            across ranks, one name with different shapes, dtypes or values; a
            ``max_shard_size`` that is not a positive size.
        FileExistsError: ``path`` is an existing file.
        All of them are raised on every rank, before any file is written.

    Example:
        >>> import os, tempfile, torch, fsharding as fs
        >>> apply, params = fs.functional(torch.nn.Linear(3, 2))
        >>> d = tempfile.mkdtemp()
        >>> fs.export(d, params)
        {'weight': 'model.safetensors', 'bias': 'model.safetensors'}
        >>> fs.export(d, params, max_shard_size=16)  # 24 + 8 bytes: two files and an index
        {'weight': 'model-00001-of-00002.safetensors', 'bias': 'model-00002-of-00002.safetensors'}
        >>> sorted(os.listdir(d))[-1]  # model.safetensors is gone, as its export is
        'model.safetensors.index.json'
    """
    limit = _parse_size(max_shard_size)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"{_API}: dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, "
            f"got {dtype!r}."
        )
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(
            f"{_API}: module must be the nn.Module the params belong to (or None), got "
            f"{type(module).__name__}."
        )
    if sys.byteorder != "little":  # pragma: no cover - no big-endian torch build to test
        raise NotImplementedError(f"{_API}: safetensors files are little-endian; this host is not.")
    group = _Group()
    directory = Path(os.fspath(path))

    # 1. Local checks, exchanged so that bad input on any rank raises on every rank.
    leaves: dict[str, _Leaf] = {}
    error = None
    try:
        leaves = _collect(params, module, dtype)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(
                f"{_API}: path {str(directory)!r} is an existing file; pass a directory "
                "(created if missing) to hold the safetensors files."
            )
        directory.mkdir(parents=True, exist_ok=True)
    except (TypeError, ValueError, OSError) as e:
        error = e
    meta = {
        n: (leaf.shape, _DTYPES[leaf.dtype], leaf.dtensor, leaf.where) for n, leaf in leaves.items()
    }
    everyone = group.all_gather((_describe(error), meta))
    _raise_first(everyone, error, group)

    # 2. The plan: the same on every rank, from every rank's names and shapes.
    plan = _Plan([m for _, m in everyone], limit)
    digests = {n: _digest(leaves[n].value) for n in plan.check_replicas if n in leaves}
    if plan.check_replicas:
        _check_replicas(plan, group.all_gather(digests))

    # 3. A previous export stops being visible before any new file is written.
    error = None
    if group.rank == 0:
        try:
            _remove(directory / _INDEX)
            if len(plan.files) > 1:
                _remove(directory / _SINGLE)
        except OSError as e:
            error = e
    _agree(group, error)

    # 4. Every file by its writer; every rank joins the gathers of its DTensors in order.
    error = None
    for name, writer, names in plan.files:
        writing = writer == group.rank and error is None
        try:
            out = _AtomicFile(directory / name) if writing else None
        except OSError as e:
            error, out = e, None
        try:
            if out is not None:
                out.write(plan.header(names))
            for n in names:
                leaf = leaves.get(n)
                # a DTensor: gathered by every rank of the writer's mesh (other meshes
                # holding a replica, e.g. other replicate groups of HSDP, skip it)
                if leaf is None or not (writer in leaf.mesh_ranks or out is not None):
                    continue
                t = _materialize(leaf)  # a collective for a DTensor: joined even after an error
                if out is not None:
                    try:
                        _write_tensor(out, t)
                    except Exception as e:  # the other ranks still wait for this one
                        error = e
                        out.discard()
                        out = None
                del t
            if out is not None:
                out.commit()
        except Exception as e:
            error = e
            if out is not None:
                out.discard()
    _agree(group, error)

    # 5. The index makes a multi-file export visible; then older files go.
    error = None
    if group.rank == 0:
        try:
            if len(plan.files) > 1:
                index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map}
                with _AtomicFile(directory / _INDEX) as f:
                    f.write(json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
            else:
                _remove(directory / _INDEX)
            keep = {name for name, _, _ in plan.files}
            for old in directory.iterdir():
                if old.name not in keep and _SHARD.fullmatch(old.name):
                    _remove(old)
        except OSError as e:
            error = e
    _agree(group, error)
    return dict(plan.weight_map)


# --------------------------------------------------------------------------------------
# input: params (and a module) -> {name: _Leaf}
# --------------------------------------------------------------------------------------


def _collect(params: Any, module: nn.Module | None, dtype: torch.dtype | None) -> dict[str, _Leaf]:
    # a list of dicts: one pipeline rank's virtual stages, each keyed by full names
    stages = isinstance(params, (list, tuple)) and not hasattr(params, "_fields")
    parts = list(params) if stages else [params]
    if not parts or not all(isinstance(p, Mapping) for p in parts):
        raise TypeError(
            f"{_API}: params must be a dict of tensors keyed by state-dict name (e.g. "
            f"fs.functional(model)[1]) or a list of such dicts (a pipeline rank's stages), "
            f"got {_tree.describe(params)}"
            + (f" of {[_tree.describe(p) for p in parts]}." if stages else ".")
        )
    leaves: dict[str, _Leaf] = {}
    for i, part in enumerate(parts):
        for name, where, value in _walk(part, (), f"params[{i}]" if stages else "params"):
            _add(leaves, name, where, value, dtype)
    if module is not None:
        for name, where, value in _module_extras(module, leaves):
            _add(leaves, name, where, value, dtype)
    return leaves


def _walk(node: Any, names: tuple[str, ...], where: str):
    """(dotted name, pytree path, leaf) for every non-None leaf of ``node``."""
    if node is None:
        return
    if isinstance(node, torch.Tensor):
        yield ".".join(names), where, node
        return
    if isinstance(node, Mapping):
        items = list(node.items())
        for k, _ in items:
            if not isinstance(k, str):
                raise TypeError(
                    f"{_API}: {where} has the key {k!r} ({type(k).__name__}); keys must "
                    "be strings (state-dict names). Convert it, e.g. {str(k): v ...}."
                )
        for k, v in items:
            yield from _walk(v, (*names, k), f"{where}[{k!r}]")
        return
    if isinstance(node, (list, tuple)):
        fields = getattr(node, "_fields", None)  # a NamedTuple: its field names
        for i, v in enumerate(node):
            key = fields[i] if fields else str(i)
            yield from _walk(v, (*names, key), f"{where}.{key}" if fields else f"{where}[{i}]")
        return
    raise TypeError(
        f"{_API}: {where} is {_tree.describe(node)}; export writes tensors only. Remove "
        "non-tensor leaves (save training state with fs.save)."
    )


def _add(
    leaves: dict[str, _Leaf], name: str, where: str, value: torch.Tensor, dtype: torch.dtype | None
) -> None:
    if not name or name == "__metadata__":
        raise ValueError(
            f"{_API}: the leaf at {where} would be named {name!r}, which safetensors "
            "cannot hold; nest it under a non-empty key."
        )
    if name in leaves:
        raise ValueError(
            f"{_API}: {where} and {leaves[name].where} are both named {name!r} "
            "(keys are joined with '.'); rename one of them."
        )
    dtensor = _tree.is_dtensor(value)
    local = _tree.local_tensor(value)
    if value.is_meta or local.is_meta:
        raise ValueError(
            f"{_API}: {where} is a meta tensor (no data); materialize it first (e.g. "
            "fs.zero(...).init(params, init_fn=...))."
        )
    if local.layout != torch.strided:
        raise ValueError(
            f"{_API}: {where} has layout {local.layout}; export writes dense tensors "
            "(call .to_dense() first)."
        )
    out_dtype = dtype if dtype is not None and value.dtype.is_floating_point else value.dtype
    if out_dtype not in _DTYPES:
        raise ValueError(
            f"{_API}: {where} has dtype {out_dtype}, which safetensors cannot hold; "
            f"supported: {sorted(str(d) for d in _DTYPES)}."
        )
    ranks = frozenset(value.device_mesh.mesh.flatten().tolist()) if dtensor else frozenset()
    leaves[name] = _Leaf(where, value, dtensor, ranks, tuple(value.shape), out_dtype)


def _module_extras(module: nn.Module, leaves: dict[str, _Leaf]):
    """What ``module.load_state_dict(strict=True)`` needs besides ``leaves``: other names of
    tied weights given in ``leaves``, and persistent buffers."""
    wanted = module.state_dict(keep_vars=True).keys()
    names_of: dict[int, list[str]] = {}
    for n, t in (
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ):
        names_of.setdefault(id(t), []).append(n)
    buffers = dict(module.named_buffers(remove_duplicate=False))
    for group in names_of.values():
        given = [n for n in group if n in leaves]
        for n in group:
            if n in leaves or n not in wanted:
                continue
            if given:  # a tied name: the given value under this name too
                yield n, f"{leaves[given[0]].where} (tied as {n!r})", leaves[given[0]].value
            elif n in buffers:
                yield n, f"module buffer {n!r}", buffers[n]


# --------------------------------------------------------------------------------------
# the plan: which file holds which names, written by which rank
# --------------------------------------------------------------------------------------


class _Plan:
    """Files, writers and headers, computed identically on every rank from every rank's
    ``{name: (shape, dtype code, is DTensor, where)}``."""

    def __init__(self, metas: list[dict[str, tuple]], limit: int):
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        holders: dict[str, list[int]] = {}
        dtensor: dict[str, bool] = {}
        for rank, meta in enumerate(metas):
            for n, (shape, code, is_dt, where) in meta.items():
                if n not in self.meta:
                    self.meta[n], holders[n], dtensor[n] = (tuple(shape), code), [], is_dt
                elif self.meta[n] != (tuple(shape), code) or dtensor[n] != is_dt:
                    first = holders[n][0]
                    f_shape, f_code = self.meta[n]
                    raise ValueError(
                        f"{_API}: rank {first} and rank {rank} both hold {n!r} but differ "
                        f"(rank {first}: {'DTensor ' if dtensor[n] else ''}{f_code} "
                        f"{list(f_shape)}; rank {rank}: {'DTensor ' if is_dt else ''}{code} "
                        f"{list(shape)} at {where}). Pipeline stages must name their "
                        "params apart (e.g. by their module path in the whole model)."
                    )
                holders[n].append(rank)
        # A plain tensor on several ranks must be a replica: its digest is compared.
        self.check_replicas = sorted(n for n, r in holders.items() if len(r) > 1 and not dtensor[n])
        self.holders = holders
        by_writer: dict[int, list[str]] = {}
        for n, r in holders.items():
            by_writer.setdefault(r[0], []).append(n)
        chunks: list[tuple[int, list[str]]] = []
        for writer in sorted(by_writer):
            size, current = 0, []
            for n in by_writer[writer]:
                nbytes = self.nbytes(n)
                if current and size + nbytes > limit:
                    chunks.append((writer, current))
                    size, current = 0, []
                current.append(n)
                size += nbytes
            chunks.append((writer, current))
        if not chunks:
            chunks = [(0, [])]  # nothing to export: one valid, empty file
        k = len(chunks)
        self.files = [
            (_SINGLE if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors", w, names)
            for i, (w, names) in enumerate(chunks)
        ]
        self.weight_map = {n: f for f, _, names in self.files for n in names}
        self.total_size = sum(self.nbytes(n) for n in self.meta)

    def nbytes(self, name: str) -> int:
        shape, code = self.meta[name]
        numel = 1
        for s in shape:
            numel *= s
        return numel * _ITEMSIZE[code]

    def header(self, names: list[str]) -> bytes:
        """The header of a file holding ``names`` in order: length prefix + padded JSON."""
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in names:
            shape, code = self.meta[n]
            end = offset + self.nbytes(n)
            entries[n] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned
        return len(text).to_bytes(8, "little") + text


_ITEMSIZE = {code: torch.empty((), dtype=dt).element_size() for dt, code in _DTYPES.items()}


def _check_replicas(plan: _Plan, digests: list[dict[str, str]]) -> None:
    for n in plan.check_replicas:
        ranks = plan.holders[n]
        first = digests[ranks[0]][n]
        for r in ranks[1:]:
            if digests[r][n] != first:
                raise ValueError(
                    f"{_API}: rank {ranks[0]} and rank {r} both hold {n!r} with the same shape "
                    "but different values; a name held by several ranks must be a replica. "
                    "Pipeline stages must name their params apart (e.g. by their module path "
                    "in the whole model); replicas must be in sync before export."
                )


def _digest(t: torch.Tensor) -> str:
    data = _bytes_view(t.detach().cpu().resolve_conj().resolve_neg().contiguous())
    return hashlib.blake2b(data if data is not None else b"", digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------
# data: one tensor at a time
# --------------------------------------------------------------------------------------


def _materialize(leaf: _Leaf) -> torch.Tensor:
    """The full tensor to write, in its output dtype (a collective for a DTensor)."""
    with torch.no_grad():
        x = leaf.value.detach()
        if x.dtype != leaf.dtype:
            x = x.to(leaf.dtype)  # on the shards for a DTensor: less to gather
        if leaf.dtensor:
            local = x._local_tensor  # what a collective reads (to_local() is an alias)
            before = use_counts([local])
            x = x.full_tensor()
            if type(x).__name__ == "AsyncCollectiveTensor":
                x = x.wait()
            # no collective ran where the DTensor was already whole (Replicate, a one-rank
            # mesh): x is then a view of the local tensor, nothing to wait for
            if _tree.storage_key(x) != _tree.storage_key(local):
                settle([(x, 1), *before])  # gloo's worker has let go of both
            del local
        return x


def _bytes_view(t: torch.Tensor) -> memoryview | None:
    """The raw bytes of a contiguous CPU tensor, without a copy (None when empty)."""
    if t.numel() == 0:
        return None
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_tensor(out: _AtomicFile, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        t = t.cpu()
    data = _bytes_view(t.resolve_conj().resolve_neg().contiguous())
    if data is not None:
        out.write(data)


class _AtomicFile:
    """A file written under a temporary name and renamed to ``final`` by :meth:`commit`."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit / discard

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        _compat.fsync_dir(self.final.parent)

    def discard(self) -> None:
        self.f.close()
        _remove(self.tmp)

    def __enter__(self) -> _AtomicFile:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _remove(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------
# arguments and ranks
# --------------------------------------------------------------------------------------


def _parse_size(size: Any) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = _SIZE_UNITS.get(m.group(2).upper()) if m else None
        if unit is None:
            raise ValueError(
                f"{_API}: max_shard_size {size!r} is not a size; pass bytes (an int) or a "
                "string such as '5GB', '500MB' or '2GiB'."
            )
        n = int(float(m.group(1)) * unit)
    else:
        raise TypeError(
            f"{_API}: max_shard_size must be bytes (an int) or a string such as '5GB', got "
            f"{type(size).__name__}."
        )
    if n < 1:
        raise ValueError(f"{_API}: max_shard_size must be positive, got {size!r}.")
    return n


class _Group:
    """The default process group when there is one with several ranks, else one rank."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if on else 0
        self.size = dist.get_world_size() if on else 1

    def all_gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out


def _describe(error: BaseException | None) -> tuple[str, str] | None:
    return None if error is None else (type(error).__name__, str(error))


def _agree(group: _Group, error: BaseException | None) -> None:
    """A sync point: raises on every rank when any rank had an error."""
    _raise_first(group.all_gather((_describe(error), None)), error, group)


def _raise_first(everyone: list[Any], own: BaseException | None, group: _Group) -> None:
    """Raises (on every rank) the first rank's error of an exchange, if any."""
    if own is not None:  # this rank's own error, with its traceback
        raise own
    for rank, (err, _) in enumerate(everyone):
        if err is None:
            continue
        kind, message = err
        cls = getattr(builtins, kind, None)
        try:
            exc = cls(f"rank {rank}: {message}")  # the same type as that rank's error
        except Exception:  # not a builtin type with a message-only constructor
            exc = None
        if not isinstance(exc, Exception):
            exc = RuntimeError(f"rank {rank} raised {kind}: {message}")
        raise exc from None
