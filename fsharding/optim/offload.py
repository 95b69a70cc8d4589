"""``fs.offload`` on an optimizer: its state lives on CPU or on disk, its update runs there.

This module owns optimizer offload: :func:`offload_optimizer` (what ``fs.offload(tx,
to=...)`` returns for an ``optim.GradientTransformation``), the state files
(:class:`DiskLeaf`), how the params are cut into chunks, and the streamed ``init`` and
``update`` of a state on disk. Offloading a function's saved activations is
``transforms/offload``.

``offload(tx, to="cpu")``: ``init`` and ``update`` run the inner ``tx`` on CPU copies of the
params and grads (vectorised, as the inner transforms are); the state is exactly ``tx``'s
own state with every tensor on CPU (checkpoints interchange with the plain optimizer); the
returned updates are on each param's device (in the dtype ``tx`` returns them in). Any
transform works, also global ones (``clip_by_global_norm``).

``offload(tx, to=directory, chunk_bytes=...)``: the state is ``tx``'s own state tree in which
every per-parameter tensor (Adam's ``mu``/``nu``, a momentum ``trace``) is a
:class:`DiskLeaf` — a file of raw bytes in ``directory`` — while scalars (the step
``count``) stay in memory. ``init`` and ``update`` stream: the params are cut into chunks
whose state takes at most ``chunk_bytes`` (a chunk is a run of whole dim-0 rows, or a flat
range shaped ``(1, ..., 1, n)`` when rows are too long; it keeps the leaf's ``ndim``, holds
at least 128 elements and starts on a multiple of 128 elements, so the arithmetic is bitwise
that of a whole-tensor update, see :func:`_chunks`); for each group of chunks the state is
read from the files into one buffer reused by every group (:class:`_Arena`), ``tx.update``
runs on the chunks (the other leaves passed as empty tensors, so masks and structure checks
see the full tree) and the new state is written back and dropped. Resident optimizer state
is at most two chunks: the one read and the new one ``tx.update`` returns (one chunk under
``optim.donation()``, where it updates in place), plus the inner update's temporaries.
Every chunk sees the same step count, which advances once per step; scalar state that comes
out different for different chunks raises.

Updates and state are bitwise those of ``tx`` for fp32/fp64 state and torch's fused Adam
kernel. (For bf16/fp16 state, torch's own element-wise kernels round the last bit
differently in vector and scalar code, and split tensors above 32768 elements between
threads at unaligned points, so even the plain optimizer's result depends on the thread
count there; chunked results can differ from it in the last bit on such tensors.)

Chunking is exact only for *element-wise* optimizers: ``adam``/``adamw``, ``sgd``,
``lion``, ``trace``, ``add_decayed_weights``, ``scale_by_learning_rate``, ``scale``,
``clip``. Transforms that need the whole tree (``clip_by_global_norm``,
``scale_by_trust_ratio``/``lamb``, ``apply_if_finite``) are refused for disk; chain them
outside: ``optim.chain(optim.clip_by_global_norm(1.0), fs.offload(optim.adamw(3e-4),
to=d))``.

Purity: ``update`` writes the new state into new files; the old state stays valid until it
is garbage collected (its files are removed then), also when ``update`` raises. Under
``optim.donation()`` (e.g. ``Step.step(..., donate=True)``) it writes in place and returns
the same ``DiskLeaf``s. To checkpoint, turn the leaves into tensors: ``fs.tree.map(lambda
x: x.load() if isinstance(x, DiskLeaf) else x, state)`` (or stream them with
:meth:`DiskLeaf.read`).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import base as _optim

__all__ = ["DiskLeaf", "offload_optimizer"]

_PyTree = Any
_API = "fs.offload"
# Transforms that read the whole tree at once: chunking would change their result.
_GLOBAL = ("clip_by_global_norm", "scale_by_trust_ratio", "apply_if_finite", "lamb")


def offload_optimizer(
    tx: _optim.GradientTransformation, to: str, chunk_bytes: int
) -> _optim.GradientTransformation:
    """The offloaded ``tx`` (what ``fs.offload(tx, to=..., chunk_bytes=...)`` returns).

    Args:
        tx: the inner optimizer.
        to: ``"cpu"`` or the absolute path of an existing directory (``fs.offload`` checks
            it).
        chunk_bytes: for ``to=directory``, the most bytes of state read into memory at once.

    Returns:
        A ``GradientTransformation`` with ``tx``'s updates and state (state on ``to``).

    Raises:
        ValueError: ``to`` is a directory and ``tx`` contains a transform that needs the
            whole tree at once (``clip_by_global_norm`` & co.).

    Example:
        >>> import tempfile, torch, fsharding as fs
        >>> from fsharding import optim
        >>> params, grads = {"w": torch.ones(300)}, {"w": torch.ones(300)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     tx = fs.offload(optim.adam(0.1), to=d, chunk_bytes=1024)  # 3 chunks
        ...     updates, state = tx.update(grads, tx.init(params), params)
        ...     ref, _ = optim.adam(0.1).update(grads, optim.adam(0.1).init(params), params)
        ...     torch.equal(updates["w"], ref["w"])
        True
    """
    if to == "cpu":
        init, update = _cpu(tx)
    else:
        refused = _global_parts(tx)
        if refused:
            raise ValueError(
                f"{_API}: optimizer offload to disk streams the state in chunks, which is "
                f"exact only for element-wise transforms, but this optimizer contains "
                f"{refused}, which needs the whole tree at once. Chain it outside the "
                "offload, e.g. optim.chain(optim.clip_by_global_norm(1.0), "
                "fs.offload(optim.adamw(lr), to=dir)), or offload to='cpu'."
            )
        init, update = _disk(tx, to, chunk_bytes)
    update.learning_rate = lambda state: _optim.learning_rate(tx, state)  # type: ignore
    return _optim.GradientTransformation(init, update)


def _global_parts(tx: _optim.GradientTransformation) -> list[str]:
    """The names of the transforms in ``tx`` that read the whole tree at once."""
    found: list[str] = []
    stack = [tx.update]
    while stack:
        fn = stack.pop()
        name = getattr(fn, "__qualname__", "").split(".<locals>")[0]
        if name in _GLOBAL or getattr(fn, "elementwise", True) is False:
            found.append(name)
        stack.extend(part.update for part in getattr(fn, "parts", ()))
    return found


# --------------------------------------------------------------------------------------
# state on CPU
# --------------------------------------------------------------------------------------


def _detached(x: Any, device: str | torch.device = "cpu") -> Any:
    return x.detach().to(device) if isinstance(x, torch.Tensor) else x


def _to_cpu(tree: _PyTree) -> _PyTree:
    return None if tree is None else optree.tree_map(_detached, tree)


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``out`` on ``ref``'s device, in its own dtype (the inner optimizer's choice: a cast
    would round twice where ``apply_updates`` adds with promotion, e.g. under ``fs.amp``)."""
    return out.to(device=ref.device, non_blocking=ref.device.type == "cuda")


def _cpu(tx: _optim.GradientTransformation) -> tuple[Any, Any]:
    @torch.no_grad()
    def init(params: _PyTree) -> _PyTree:
        return _to_cpu(tx.init(_to_cpu(params)))

    @torch.no_grad()
    def update(updates: _PyTree, state: _PyTree, params: _PyTree = None) -> tuple[_PyTree, _PyTree]:
        new_updates, state = tx.update(_to_cpu(updates), _to_cpu(state), _to_cpu(params))
        _tree.check_same_structure(updates, new_updates, names=("updates", "new updates"), api=_API)
        refs = updates if params is None else params
        return optree.tree_map(_like, new_updates, refs), state

    return init, update


# --------------------------------------------------------------------------------------
# state files
# --------------------------------------------------------------------------------------


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
                        raise RuntimeError(
                            f"{_API}: optimizer state file {self.path} is truncated."
                        )
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
            f"{_API}: a DiskLeaf (optimizer state in {self.path}) cannot be pickled; convert "
            "the state first: fs.tree.map(lambda x: x.load() if isinstance(x, DiskLeaf) else x, "
            "state)."
        )

    def __repr__(self) -> str:
        return f"DiskLeaf(shape={tuple(self.shape)}, dtype={self.dtype}, path={self.path!r})"


# --------------------------------------------------------------------------------------
# chunks
# --------------------------------------------------------------------------------------

# Chunk boundaries fall on multiples of this many elements: CPU kernels process whole
# vectors and a scalar tail (torch's fused Adam kernel even splits work on 64-byte units),
# and some vector and scalar paths round differently (fused multiply-add), so aligned
# boundaries give every element the same path as in a whole-tensor update: bitwise results.
_ALIGN = 128


class _Chunk(NamedTuple):
    """Flat elements ``[start, stop)`` of a leaf, passed to the optimizer as ``shape``."""

    start: int
    stop: int
    shape: tuple[int, ...]


# One group of chunks, streamed through the optimizer at once: {leaf index: its chunk}.
_Group = dict[int, _Chunk]


def _chunks(shape: torch.Size, max_elems: int) -> list[_Chunk]:
    """Chunks covering a row-major leaf, each of at most ``max(max_elems, 128)`` elements and
    starting on a multiple of 128 elements.

    A chunk is a run of whole dim-0 rows (shape ``(rows, *shape[1:])``) when 128-aligned
    runs of rows fit in ``max_elems``; otherwise a flat range (shape ``(1, ..., 1, n)``).
    Either way it keeps the leaf's ``ndim``.
    """
    n = shape.numel()
    if len(shape) == 0 or 0 < n <= max_elems:
        return [_Chunk(0, max(n, 1), tuple(shape))]
    row = math.prod(shape[1:])
    unit = math.lcm(row, _ALIGN) if row else 0
    if 0 < unit <= max_elems:  # whole rows
        step = max_elems // unit * unit
        return [_Chunk(a, min(a + step, n), ((min(a + step, n) - a) // row, *shape[1:]))
                for a in range(0, n, step)]  # fmt: skip
    step = max(_ALIGN, max_elems // _ALIGN * _ALIGN)
    if n <= step:
        return [_Chunk(0, n, tuple(shape))]
    ones = (1,) * (len(shape) - 1)
    return [_Chunk(a, min(a + step, n), (*ones, min(a + step, n) - a)) for a in range(0, n, step)]


def _plan(params: list[torch.Tensor], state_bytes: list[int], chunk_bytes: int) -> list[_Group]:
    """The groups of chunks one ``init`` or ``update`` streams, in order: each holds at most
    ``chunk_bytes`` of state and at most one chunk of each leaf. ``state_bytes[i]`` is the
    state's bytes per element of ``params[i]`` (its dtype's size if it has no state)."""
    groups: list[_Group] = []
    used = chunk_bytes + 1
    for i, p in enumerate(params):
        per_elem = state_bytes[i] or p.dtype.itemsize
        for chunk in _chunks(p.shape, max(1, chunk_bytes // per_elem)):
            size = (chunk.stop - chunk.start) * per_elem
            if used + size > chunk_bytes or i in groups[-1]:
                groups.append({})
                used = 0
            groups[-1][i] = chunk
            used += size
    return groups or [{}]  # at least one call, so scalar state (the count) advances


def _state_bytes(files: list[DiskLeaf], n_params: int) -> list[int]:
    """Bytes of state per element of each of the ``n_params`` params."""
    per_elem = [0] * n_params
    for f in files:
        per_elem[f.param_index] += f.dtype.itemsize
    return per_elem


def _dummy(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """What a leaf outside the current group is passed as: no elements (one if 0-dim)."""
    return (
        torch.zeros((), dtype=dtype) if len(shape) == 0 else torch.empty(0, *shape[1:], dtype=dtype)
    )


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


class _Arena:
    """One reusable CPU buffer for a group's chunks: the state read from the files, and the
    grads and params that are not on CPU (CPU ones are passed as views, no copy)."""

    def __init__(
        self,
        plan: list[_Group],
        grads: list[torch.Tensor],
        params: list[torch.Tensor] | None,
        files: list[DiskLeaf],
    ):
        def group_bytes(group: _Group) -> int:
            total = 0
            for i, chunk in group.items():
                n = chunk.stop - chunk.start
                for t in (grads[i], None if params is None else params[i]):
                    if t is not None and t.device.type != "cpu":
                        total += _aligned(n * t.dtype.itemsize)
            for f in files:
                chunk = group.get(f.param_index)
                if chunk is not None:
                    total += _aligned((chunk.stop - chunk.start) * f.dtype.itemsize)
            return total

        self.buf = torch.empty(max(map(group_bytes, plan)), dtype=torch.uint8)
        self.used = 0

    def reset(self) -> None:
        """Frees the whole buffer for the next group."""
        self.used = 0

    def _carve(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        start, self.used = self.used, self.used + _aligned(n * dtype.itemsize)
        return self.buf[start : start + n * dtype.itemsize].view(dtype)

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        """A copy of the 1-D ``src`` in the buffer."""
        return self._carve(src.numel(), src.dtype).copy_(src)

    def read(self, file: DiskLeaf, chunk: _Chunk) -> torch.Tensor:
        """``file``'s ``chunk``, read into the buffer."""
        out = self._carve(chunk.stop - chunk.start, file.dtype)
        return file.read(chunk.start, chunk.stop, out=out).view(chunk.shape)


class _Flat:
    """A list of tensors as 1-D views, cut by groups: each leaf's chunk in a group, or the
    empty stand-in (:func:`_dummy`) the optimizer gets for a leaf outside it."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.flat = [t.detach().reshape(-1) for t in tensors]
        self.dummies = [_dummy(t.shape, t.dtype) for t in tensors]

    def chunks(self, group: _Group, arena: _Arena | None = None) -> list[torch.Tensor]:
        """The leaves cut to ``group``: CPU chunks are views; others are copied to CPU (into
        ``arena`` when given)."""
        out = []
        for i, (flat, dummy) in enumerate(zip(self.flat, self.dummies)):
            chunk = group.get(i)
            if chunk is None:
                out.append(dummy)
                continue
            src = flat[chunk.start : chunk.stop]
            on_cpu = src.device.type == "cpu" or arena is None
            out.append((src.cpu() if on_cpu else arena.copy(src)).view(chunk.shape))
        return out


# --------------------------------------------------------------------------------------
# state on disk: streamed init and update
# --------------------------------------------------------------------------------------


def _disk(tx: _optim.GradientTransformation, directory: str, chunk_bytes: int) -> tuple[Any, Any]:
    @torch.no_grad()
    def init(params: _PyTree) -> _PyTree:
        return _disk_init(tx, directory, chunk_bytes, params)

    @torch.no_grad()
    def update(updates: _PyTree, state: _PyTree, params: _PyTree = None) -> tuple[_PyTree, _PyTree]:
        return _DiskUpdate(tx, directory, chunk_bytes, updates, state, params).run()

    return init, update


def _same(ref: Any, new: Any) -> bool:
    return torch.equal(ref, new) if isinstance(ref, torch.Tensor) else ref == new


def _differs(path: str, ref: Any, new: Any) -> RuntimeError:
    return RuntimeError(
        f"{_API}: optimizer state leaf {path} came out different for different chunks "
        f"({ref!r} vs {new!r}): this optimizer is not element-wise, so streaming its state "
        "from disk changes its result. Offload only the element-wise part and chain "
        "global transforms outside it, or offload to='cpu'."
    )


def _per_param_subtrees(state: _PyTree, params: _PyTree) -> tuple[list, list, optree.PyTreeSpec]:
    """Flattens ``state`` so that every subtree shaped like ``params`` is one leaf: returns
    ``[(leaf or subtree, is per-param)]``, their paths and the treedef above them."""
    params_def = optree.tree_structure(params)
    param_leaves = optree.tree_leaves(params)

    def like_params(node: Any) -> bool:
        if optree.tree_structure(node) != params_def:
            return False
        leaves = optree.tree_leaves(node)
        return all(
            isinstance(s, torch.Tensor) and s.shape == p.shape for s, p in zip(leaves, param_leaves)
        )

    accessors, leaves, treedef = optree.tree_flatten_with_accessor(state, is_leaf=like_params)
    paths = [_tree.keystr(a) for a in accessors]
    return [(x, like_params(x)) for x in leaves], paths, treedef


def _disk_init(
    tx: _optim.GradientTransformation, directory: str, chunk_bytes: int, params: _PyTree
) -> _PyTree:
    """``tx.init`` run chunk by chunk, its per-parameter state written into new files."""
    param_leaves, params_def = optree.tree_flatten(params)
    # tx.init on empty stand-ins gives the state's structure, dtypes and scalars.
    probe = params_def.unflatten([_dummy(p.shape, p.dtype) for p in param_leaves])
    slots, paths, slots_def = _per_param_subtrees(tx.init(probe), probe)
    # A per-param subtree of the state (Adam's mu) becomes one file per param.
    files = {
        o: [
            DiskLeaf(directory, p.shape, s.dtype, i)
            for i, (p, s) in enumerate(zip(param_leaves, optree.tree_leaves(subtree)))
        ]
        for o, (subtree, per_param) in enumerate(slots)
        if per_param
    }
    all_files = [f for per_param in files.values() for f in per_param]
    flat_params = _Flat(param_leaves)
    for group in _plan(param_leaves, _state_bytes(all_files, len(param_leaves)), chunk_bytes):
        new = slots_def.flatten_up_to(tx.init(params_def.unflatten(flat_params.chunks(group))))
        for o, (slot, per_param) in enumerate(slots):
            if per_param:
                new_chunks = optree.tree_leaves(new[o])
                for i, chunk in group.items():
                    files[o][i].write(chunk.start, new_chunks[i])
            elif not _same(slot, new[o]):
                raise _differs(paths[o], slot, new[o])
    return slots_def.unflatten(
        [
            optree.tree_unflatten(optree.tree_structure(slot), files[o]) if o in files else slot
            for o, (slot, _) in enumerate(slots)
        ]
    )


class _DiskUpdate:
    """One ``update`` of an optimizer whose state is in files: for each group of chunks, the
    state is read into the arena, ``tx.update`` runs on the chunks, the new state is written
    to the files and the chunk updates into the full-size updates; then the chunks go.

    Without donation the new state goes into new files, so the old state stays valid (also
    when this raises); under the caller's donation it goes into the same files, and the
    inner update writes into the chunks, as it would into whole tensors: both modes stay
    bitwise those of the plain optimizer.
    """

    def __init__(
        self,
        tx: _optim.GradientTransformation,
        directory: str,
        chunk_bytes: int,
        updates: _PyTree,
        state: _PyTree,
        params: _PyTree,
    ):
        self.tx = tx
        self.state_tree = state
        grad_leaves, self.grads_def = optree.tree_flatten(updates)
        param_leaves = None if params is None else self.grads_def.flatten_up_to(params)
        self.state, self.state_def = optree.tree_flatten(state)
        _check_state(self.state, grad_leaves)
        # Per state leaf index: the file it is read from and the file its new value goes to.
        self.sources = {j: x for j, x in enumerate(self.state) if isinstance(x, DiskLeaf)}
        self.targets = (
            self.sources
            if _optim.donating()
            else {
                j: DiskLeaf(directory, x.shape, x.dtype, x.param_index)
                for j, x in self.sources.items()
            }
        )
        files = list(self.sources.values())
        self.plan = _plan(grad_leaves, _state_bytes(files, len(grad_leaves)), chunk_bytes)
        self.arena = _Arena(self.plan, grad_leaves, param_leaves, files)
        self.grads = _Flat(grad_leaves)
        self.params = None if param_leaves is None else _Flat(param_leaves)
        self.state_dummies = {j: _dummy(x.shape, x.dtype) for j, x in self.sources.items()}
        # The updates go to each param's device (each grad's without params).
        self.refs = grad_leaves if param_leaves is None else param_leaves
        self.new_updates: list[torch.Tensor] = []
        self.new_state = list(self.state)

    def run(self) -> tuple[_PyTree, _PyTree]:
        for n, group in enumerate(self.plan):
            self._update_group(group, first=n == 0)
        for j, f in self.targets.items():
            self.new_state[j] = f
        return self.grads_def.unflatten(self.new_updates), self.state_def.unflatten(self.new_state)

    def _update_group(self, group: _Group, first: bool) -> None:
        self.arena.reset()
        grads = self.grads.chunks(group, self.arena)
        params = None if self.params is None else self.params.chunks(group, self.arena)
        state = self._read_state(group)
        new_updates, new_state = self.tx.update(
            self.grads_def.unflatten(grads),
            self.state_def.unflatten(state),
            None if params is None else self.grads_def.unflatten(params),
        )
        self._store_updates(group, self.grads_def.flatten_up_to(new_updates), first)
        self._store_state(group, self.state_def.flatten_up_to(new_state), first)

    def _read_state(self, group: _Group) -> list[Any]:
        """The state leaves for ``group``: file chunks read into the arena, scalars as are."""
        state = list(self.state)
        for j, f in self.sources.items():
            chunk = group.get(f.param_index)
            state[j] = self.state_dummies[j] if chunk is None else self.arena.read(f, chunk)
        return state

    def _store_updates(self, group: _Group, new_chunks: list[torch.Tensor], first: bool) -> None:
        """Copies the group's update chunks into the full-size updates (made at the first
        group, on each param's device, in the dtype the inner update returns)."""
        if first:
            self.new_updates = [
                torch.empty(ref.shape, dtype=new.dtype, device=ref.device)
                for ref, new in zip(self.refs, new_chunks)
            ]
        for i, chunk in group.items():
            flat = self.new_updates[i].view(-1)
            flat[chunk.start : chunk.stop].copy_(new_chunks[i].reshape(-1))

    def _store_state(self, group: _Group, new_state: list[Any], first: bool) -> None:
        """Writes the per-param chunks to their files; keeps the scalars of the first group
        and checks that every later group computed the same ones."""
        for j, new in enumerate(new_state):
            target = self.targets.get(j)
            if target is not None:
                chunk = group.get(target.param_index)
                if chunk is not None:
                    target.write(chunk.start, new)
            elif first:
                self.new_state[j] = new
            elif not _same(self.new_state[j], new):
                path = _tree.leaves_with_path(self.state_tree)[j][0]
                raise _differs(path, self.new_state[j], new)


def _check_state(state: list[Any], grads: list[torch.Tensor]) -> None:
    """Raises unless ``state`` (flat) is an offloaded state for params shaped as ``grads``."""
    for x in state:
        if isinstance(x, DiskLeaf):
            i = x.param_index
            if i >= len(grads) or grads[i].shape != x.shape:
                raise ValueError(
                    f"{_API}: the optimizer state does not match the updates (state leaf of "
                    f"shape {tuple(x.shape)} for parameter {i}); pass the state returned by "
                    "this offloaded optimizer's init (or its previous update) for these params."
                )
        elif isinstance(x, torch.Tensor) and x.dim() > 0 and x.numel() > 1:
            raise ValueError(
                f"{_API}: the optimizer state holds an in-memory tensor of shape "
                f"{tuple(x.shape)}; an optimizer offloaded to disk keeps per-parameter state "
                "in files. Pass the state returned by this offloaded optimizer's init."
            )
