"""Optimizer state on disk for ``fs.offload``: :class:`DiskLeaf` files and chunk planning.

A :class:`DiskLeaf` is one per-parameter state tensor stored as raw row-major bytes in a
private temporary file. :func:`_plan` cuts the params into chunks (runs of whole rows, or
flat ranges; each keeps its leaf's ``ndim`` and starts on a multiple of 128 elements) and
groups them so that a group's state takes at most ``chunk_bytes``; :class:`_Arena` holds one
group's chunks in a buffer reused by every group.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from typing import Any

import torch

__all__ = ["DiskLeaf"]

API = "fs.offload"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class DiskLeaf:
    """One per-parameter optimizer-state tensor, stored as raw row-major bytes in a file.

    The file is private to this object and removed when it is garbage collected.

    Attributes:
        path: the file. shape / dtype: the tensor's. param_index: the position (in
            ``tree.leaves(params)``) of the parameter it belongs to.

    Example:
        >>> import tempfile, torch, fsharding as fs
        >>> from fsharding import optim
        >>> with tempfile.TemporaryDirectory() as d:
        ...     tx = fs.offload(optim.adam(1e-3), to=d)
        ...     state = tx.init({"w": torch.ones(3)})
        ...     print(state[0].mu["w"], state[0].mu["w"].load().tolist())
        ...     del state  # its files go with it
        DiskLeaf(shape=(3,), dtype=torch.float32, path='.../fs-optstate-....bin') [0.0, 0.0, 0.0]
    """

    __slots__ = ("path", "shape", "dtype", "param_index", "_finalizer", "__weakref__")

    def __init__(self, directory: str, shape: torch.Size, dtype: torch.dtype, param_index: int):
        self.shape, self.dtype, self.param_index = torch.Size(shape), dtype, param_index
        fd, self.path = tempfile.mkstemp(prefix="fs-optstate-", suffix=".bin", dir=directory)
        self._finalizer = weakref.finalize(self, _remove, self.path)
        try:
            os.ftruncate(fd, self.nbytes)
        finally:
            os.close(fd)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat elements ``[start, stop)`` as a 1-D CPU tensor (into ``out`` if given)."""
        if out is None:
            out = torch.empty(stop - start, dtype=self.dtype)
        if stop > start:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                buf, done, off = _bytes(out), 0, start * self.dtype.itemsize
                while done < len(buf):
                    n = os.preadv(fd, [buf[done:]], off + done)
                    if n <= 0:
                        raise RuntimeError(f"{API}: optimizer state file {self.path} is truncated.")
                    done += n
            finally:
                os.close(fd)
        return out

    def write(self, start: int, values: torch.Tensor) -> None:
        """Writes ``values`` (flattened) at flat element ``start``."""
        buf = _bytes(values.detach().to("cpu", self.dtype).contiguous())
        fd = os.open(self.path, os.O_WRONLY)
        try:
            done, off = 0, start * self.dtype.itemsize
            while done < len(buf):
                done += os.pwritev(fd, [buf[done:]], off + done)
        finally:
            os.close(fd)

    def load(self) -> torch.Tensor:
        """The whole tensor, in memory."""
        return self.read(0, self.shape.numel()).view(self.shape)

    def __copy__(self) -> DiskLeaf:
        return self  # immutable value: copies share the file (and its lifetime)

    def __deepcopy__(self, memo: dict) -> DiskLeaf:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{API}: a DiskLeaf (optimizer state in {self.path}) cannot be pickled; convert "
            "the state first: fs.tree.map(lambda x: x.load() if isinstance(x, DiskLeaf) else x, "
            "state)."
        )

    def __repr__(self) -> str:
        return f"DiskLeaf(shape={tuple(self.shape)}, dtype={self.dtype}, path={self.path!r})"


# Chunk boundaries fall on multiples of this many elements: CPU kernels process whole
# vectors and a scalar tail (torch's fused Adam kernel even splits work on 64-byte units),
# and some vector and scalar paths round differently (fused multiply-add), so aligned
# boundaries give every element the same path as in a whole-tensor update: bitwise results.
_ALIGN = 128


def _chunks(shape: torch.Size, max_elems: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(flat start, flat stop, chunk shape)`` covering a row-major leaf with chunks of at
    most ``max(max_elems, 128)`` elements whose starts are multiples of 128 elements.

    A chunk is a run of whole dim-0 rows (shape ``(rows, *shape[1:])``) when 128-aligned
    runs of rows fit in ``max_elems``; otherwise a flat range (shape ``(1, ..., 1, n)``).
    Either way it keeps the leaf's ``ndim``.
    """
    n = shape.numel()
    if len(shape) == 0 or 0 < n <= max_elems:
        return [(0, max(n, 1), tuple(shape))]
    row = math.prod(shape[1:])
    unit = math.lcm(row, _ALIGN) if row else 0
    if 0 < unit <= max_elems:  # whole rows
        step = max_elems // unit * unit
        return [(a, min(a + step, n), ((min(a + step, n) - a) // row, *shape[1:]))
                for a in range(0, n, step)]  # fmt: skip
    step = max(_ALIGN, max_elems // _ALIGN * _ALIGN)
    if n <= step:
        return [(0, n, tuple(shape))]
    flat = (1,) * (len(shape) - 1)
    return [(a, min(a + step, n), (*flat, min(a + step, n) - a)) for a in range(0, n, step)]


def _plan(params: list[torch.Tensor], state_bytes: list[int], chunk_bytes: int) -> list[dict]:
    """Groups of chunks, ``{leaf index: (start, stop, shape)}``, each group holding at most
    ``chunk_bytes`` of state (one chunk of a leaf per group)."""
    groups: list[dict] = []
    used = chunk_bytes + 1
    for i, p in enumerate(params):
        per_elem = state_bytes[i] or p.dtype.itemsize
        for start, stop, shape in _chunks(p.shape, max(1, chunk_bytes // per_elem)):
            size = (stop - start) * per_elem
            if used + size > chunk_bytes or i in groups[-1]:
                groups.append({})
                used = 0
            groups[-1][i] = (start, stop, shape)
            used += size
    return groups or [{}]  # at least one call, so scalar state (the count) advances


def _dummy(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """What a leaf outside the current group is passed as: no elements (one if 0-dim)."""
    return (
        torch.zeros((), dtype=dtype) if len(shape) == 0 else torch.empty(0, *shape[1:], dtype=dtype)
    )


def _take(flat: list[torch.Tensor], ref: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
    """Each leaf's chunk in ``group`` (a CPU view or copy), or its dummy."""
    out = []
    for i, r in enumerate(ref):
        g = group.get(i)
        out.append(_dummy(r.shape, r.dtype) if g is None else flat[i][g[0] : g[1]].view(g[2]).cpu())
    return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


class _Arena:
    """One reusable CPU buffer for a group's chunks of state (and of grads and params that
    are not on CPU; CPU ones are passed as views)."""

    def __init__(self, plan: list[dict], ul: list, pl: list | None, disk: list[DiskLeaf]):
        def need(group: dict) -> int:
            total = 0
            for i, (a, b, _) in group.items():
                if ul[i].device.type != "cpu":
                    total += _aligned((b - a) * ul[i].dtype.itemsize)
                if pl is not None and pl[i].device.type != "cpu":
                    total += _aligned((b - a) * pl[i].dtype.itemsize)
            for x in disk:
                if x.param_index in group:
                    a, b, _ = group[x.param_index]
                    total += _aligned((b - a) * x.dtype.itemsize)
            return total

        self.buf = torch.empty(max(map(need, plan)), dtype=torch.uint8)
        self.used = 0

    def reset(self) -> None:
        self.used = 0

    def _carve(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        start, self.used = self.used, self.used + _aligned(n * dtype.itemsize)
        return self.buf[start : start + n * dtype.itemsize].view(dtype)

    def take(self, flat: torch.Tensor, g: tuple | None, dummy: torch.Tensor) -> torch.Tensor:
        """A leaf's chunk: a view on CPU, else a copy in the buffer; ``dummy`` if absent."""
        if g is None:
            return dummy
        src = flat[g[0] : g[1]]
        if src.device.type == "cpu":
            return src.view(g[2])
        return self._carve(g[1] - g[0], src.dtype).copy_(src).view(g[2])

    def read(self, x: DiskLeaf, g: tuple | None, dummy: torch.Tensor) -> torch.Tensor:
        if g is None:
            return dummy
        return x.read(g[0], g[1], out=self._carve(g[1] - g[0], x.dtype)).view(g[2])
