"""``fs.offload`` on an optimizer: its state lives on CPU or on disk, its update runs there.

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
that of a whole-tensor update, see ``offload_disk``); for each group of
chunks the state is read from the files into one buffer reused by every group, ``tx.update``
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
is garbage collected (its files are removed then). Under ``optim.donation()`` (e.g.
``Step.step(..., donate=True)``) it writes in place and returns the same ``DiskLeaf``s.
To checkpoint, turn the leaves into tensors: ``fs.tree.map(lambda x: x.load() if
isinstance(x, DiskLeaf) else x, state)`` (or stream them with :meth:`DiskLeaf.read`).
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import base as _optim
from fsharding.optim._offload_disk import DiskLeaf, _Arena, _dummy, _plan, _take

__all__ = ["offload_optimizer"]

PyTree = Any
API = "fs.offload"
# Transforms that read the whole tree at once: chunking would change their result.
_GLOBAL = ("clip_by_global_norm", "scale_by_trust_ratio", "apply_if_finite", "lamb")


def offload_optimizer(
    tx: _optim.GradientTransformation, to: str, chunk_bytes: int
) -> _optim.GradientTransformation:
    """The offloaded ``tx`` (``to`` is ``"cpu"`` or a checked absolute directory)."""
    if to == "cpu":
        init, update = _cpu(tx)
    else:
        refused = _global_parts(tx)
        if refused:
            raise ValueError(
                f"{API}: optimizer offload to disk streams the state in chunks, which is exact "
                f"only for element-wise transforms, but this optimizer contains {refused}, "
                "which needs the whole tree at once. Chain it outside the offload, e.g. "
                "optim.chain(optim.clip_by_global_norm(1.0), fs.offload(optim.adamw(lr), "
                "to=dir)), or offload to='cpu'."
            )
        init, update = _disk(tx, to, chunk_bytes)
    update.learning_rate = lambda state: _optim.learning_rate(tx, state)  # type: ignore
    return _optim.GradientTransformation(init, update)


def _global_parts(tx: _optim.GradientTransformation) -> list[str]:
    found: list[str] = []
    stack = [tx.update]
    while stack:
        fn = stack.pop()
        name = getattr(fn, "__qualname__", "").split(".<locals>")[0]
        if name in _GLOBAL or getattr(fn, "elementwise", True) is False:
            found.append(name)
        stack.extend(part.update for part in getattr(fn, "parts", ()))
    return found


def _detached(x: Any, device: str | torch.device = "cpu") -> Any:
    return x.detach().to(device) if isinstance(x, torch.Tensor) else x


def _to_cpu(tree: PyTree) -> PyTree:
    return None if tree is None else optree.tree_map(_detached, tree)


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``out`` on ``ref``'s device, in its own dtype (the inner optimizer's choice: a cast
    would round twice where ``apply_updates`` adds with promotion, e.g. under ``fs.amp``)."""
    return out.to(device=ref.device, non_blocking=ref.device.type == "cuda")


def _cpu(tx: _optim.GradientTransformation) -> tuple[Any, Any]:
    @torch.no_grad()
    def init(params: PyTree) -> PyTree:
        return _to_cpu(tx.init(_to_cpu(params)))

    @torch.no_grad()
    def update(updates: PyTree, state: PyTree, params: PyTree = None) -> tuple[PyTree, PyTree]:
        new_updates, state = tx.update(_to_cpu(updates), _to_cpu(state), _to_cpu(params))
        _tree.check_same_structure(updates, new_updates, names=("updates", "new updates"), api=API)
        refs = updates if params is None else params
        return optree.tree_map(_like, new_updates, refs), state

    return init, update


# --------------------------------------------------------------------------------------
# state on disk
# --------------------------------------------------------------------------------------


def _per_param_subtrees(state: PyTree, params: PyTree) -> tuple[list, list, optree.PyTreeSpec]:
    """Flattens ``state`` so that every subtree shaped like ``params`` is one leaf: returns
    ``[(leaf or subtree, is per-param)]``, their paths and the treedef above them."""
    pdef = optree.tree_structure(params)
    pleaves = optree.tree_leaves(params)

    def like_params(node: Any) -> bool:
        if optree.tree_structure(node) != pdef:
            return False
        leaves = optree.tree_leaves(node)
        return all(
            isinstance(s, torch.Tensor) and s.shape == p.shape for s, p in zip(leaves, pleaves)
        )

    accessors, leaves, treedef = optree.tree_flatten_with_accessor(state, is_leaf=like_params)
    paths = [_tree.keystr(a) for a in accessors]
    return [(x, like_params(x)) for x in leaves], paths, treedef


def _agree(path: str, ref: Any, new: Any) -> None:
    same = torch.equal(ref, new) if isinstance(ref, torch.Tensor) else ref == new
    if not same:
        raise RuntimeError(
            f"{API}: optimizer state leaf {path} came out different for different chunks "
            f"({ref!r} vs {new!r}): this optimizer is not element-wise, so streaming its state "
            "from disk changes its result. Offload only the element-wise part and chain "
            "global transforms outside it, or offload to='cpu'."
        )


def _disk(tx: _optim.GradientTransformation, directory: str, chunk_bytes: int) -> tuple[Any, Any]:
    @torch.no_grad()
    def init(params: PyTree) -> PyTree:
        pl, pdef = optree.tree_flatten(params)
        probe = [_dummy(p.shape, p.dtype) for p in pl]
        probe_tree = optree.tree_unflatten(pdef, probe)
        flat, paths, sdef = _per_param_subtrees(tx.init(probe_tree), probe_tree)
        # Output slots: a per-param subtree becomes DiskLeafs, anything else stays as is.
        disk: dict[int, list[DiskLeaf]] = {}
        for o, (x, per_param) in enumerate(flat):
            if per_param:
                dts = [s.dtype for s in optree.tree_leaves(x)]
                disk[o] = [
                    DiskLeaf(directory, p.shape, dt, i) for i, (p, dt) in enumerate(zip(pl, dts))
                ]
        sizes = [sum(disk[o][i].dtype.itemsize for o in disk) for i in range(len(pl))]
        flat_p = [p.detach().reshape(-1) for p in pl]
        for group in _plan(pl, sizes, chunk_bytes):
            out = sdef.flatten_up_to(tx.init(pdef.unflatten(_take(flat_p, pl, group))))
            for o, (x, per_param) in enumerate(flat):
                if not per_param:
                    _agree(paths[o], x, out[o])
                    continue
                leaves = optree.tree_leaves(out[o])
                for i, (start, _, _) in group.items():
                    disk[o][i].write(start, leaves[i])
        slots = [
            optree.tree_unflatten(optree.tree_structure(x), disk[o]) if o in disk else x
            for o, (x, _) in enumerate(flat)
        ]
        return optree.tree_unflatten(sdef, slots)

    @torch.no_grad()
    def update(updates: PyTree, state: PyTree, params: PyTree = None) -> tuple[PyTree, PyTree]:
        ul, udef = optree.tree_flatten(updates)
        pl = None if params is None else udef.flatten_up_to(params)
        sl, sdef = optree.tree_flatten(state)
        _check_state(sl, ul)
        disk = {j: x for j, x in enumerate(sl) if isinstance(x, DiskLeaf)}
        if not _optim.donating():  # new files: the old state stays valid
            disk = {
                j: DiskLeaf(directory, x.shape, x.dtype, x.param_index) for j, x in disk.items()
            }
        sizes = [0] * len(ul)
        for x in disk.values():
            sizes[x.param_index] += x.dtype.itemsize
        refs = ul if pl is None else pl
        outs: list[torch.Tensor | None] = [None] * len(ul)  # allocated in the inner's dtype
        flat_u = [u.detach().reshape(-1) for u in ul]
        flat_p = None if pl is None else [p.detach().reshape(-1) for p in pl]
        dummy_u = [_dummy(u.shape, u.dtype) for u in ul]
        dummy_p = None if pl is None else [_dummy(p.shape, p.dtype) for p in pl]
        dummy_s = {j: _dummy(x.shape, x.dtype) for j, x in enumerate(sl) if j in disk}
        plan = _plan(ul, sizes, chunk_bytes)
        # One buffer, reused by every group, receives the group's state chunks (and grads and
        # params not on CPU): no chunk-sized allocation (and page faults) per group for them.
        arena = _Arena(plan, ul, pl, [x for x in sl if isinstance(x, DiskLeaf)])
        new_sl, paths = list(sl), []
        for n, group in enumerate(plan):
            arena.reset()
            u_g = [arena.take(flat_u[i], group.get(i), dummy_u[i]) for i in range(len(ul))]
            p_g = None
            if pl is not None:
                p_g = [arena.take(flat_p[i], group.get(i), dummy_p[i]) for i in range(len(pl))]
            s_g = [
                arena.read(x, group.get(x.param_index), dummy_s[j]) if j in disk else x
                for j, x in enumerate(sl)
            ]
            # Under the caller's donation the inner update writes into the chunks, as it would
            # into the whole tensors: both modes stay bitwise those of the plain optimizer.
            new_u, new_s = tx.update(
                udef.unflatten(u_g),
                sdef.unflatten(s_g),
                None if p_g is None else udef.unflatten(p_g),
            )
            new_u, new_s = udef.flatten_up_to(new_u), sdef.flatten_up_to(new_s)
            for i, r in enumerate(refs):
                if outs[i] is None:
                    outs[i] = torch.empty(r.shape, dtype=new_u[i].dtype, device=r.device)
            for i, (start, stop, _) in group.items():
                outs[i].view(-1)[start:stop].copy_(new_u[i].reshape(-1))
            for j, x in enumerate(sl):
                if j in disk:
                    if x.param_index in group:
                        disk[j].write(group[x.param_index][0], new_s[j])
                elif n == 0:
                    new_sl[j] = new_s[j]
                else:
                    paths = paths or [p for p, _ in _tree.leaves_with_path(state)]
                    _agree(paths[j], new_sl[j], new_s[j])
            del u_g, p_g, s_g, new_u, new_s
        for j, x in disk.items():
            new_sl[j] = x
        return udef.unflatten(outs), sdef.unflatten(new_sl)

    return init, update


def _check_state(sl: list[Any], ul: list[torch.Tensor]) -> None:
    for x in sl:
        if isinstance(x, DiskLeaf):
            i = x.param_index
            if i >= len(ul) or ul[i].shape != x.shape:
                raise ValueError(
                    f"{API}: the optimizer state does not match the updates (state leaf of shape "
                    f"{tuple(x.shape)} for parameter {i}); pass the state returned by this "
                    "offloaded optimizer's init (or its previous update) for these params."
                )
        elif isinstance(x, torch.Tensor) and x.dim() > 0 and x.numel() > 1:
            raise ValueError(
                f"{API}: the optimizer state holds an in-memory tensor of shape "
                f"{tuple(x.shape)}; an optimizer offloaded to disk keeps per-parameter state in "
                "files. Pass the state returned by this offloaded optimizer's init."
            )
