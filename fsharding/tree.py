"""Pytrees (``fs.tree``), and the one storage-identity and DTensor helpers.

Owns the pytree helpers on optree (map, leaves, paths, structure checks that name the
differing path), ``storage_key`` (which storage a tensor's data lives in: every module
that asks "is this the same memory" asks it), ``is_dtensor`` / ``local_tensor`` (the one
DTensor check), and the byte and finiteness reductions over a tree (``nbytes``,
``all_finite``). It imports nothing of fsharding.

Every fsharding pytree uses optree's default registry with ``None`` as an empty node
(as in JAX). Paths are written in JAX's ``keystr`` form, e.g. ``['blocks'][0].mu``, so an
error can name the exact leaf that is wrong.

Example:
    >>> import torch, fsharding as fs
    >>> t = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    >>> fs.tree.map(lambda x, y: x + y, t, t)["w"].sum().item()
    12.0
    >>> [p for p, _ in fs.tree.leaves_with_path(t)]
    ["['b']", "['w']"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import optree
import torch

__all__ = [
    "map",
    "leaves",
    "leaves_with_path",
    "structure",
    "unflatten",
    "keystr",
    "check_same_structure",
    "first_difference",
    "nbytes",
    "all_finite",
    "is_floating",
    "local_tensor",
    "is_dtensor",
    "storage_key",
    "describe",
]

_PyTree = Any

_map = map  # the builtin, before this module shadows it


def map(fn: Callable[..., Any], tree: _PyTree, *rest: _PyTree) -> _PyTree:  # noqa: A001
    """Maps ``fn`` over the leaves of one or more trees of the same structure.

    Args:
        fn: called as ``fn(leaf, *rest_leaves)`` for each leaf position.
        tree: the tree that fixes the structure.
        *rest: further trees with the same structure as ``tree``.

    Returns:
        A tree of ``tree``'s structure holding ``fn``'s results.

    Raises:
        ValueError: a tree in ``rest`` differs in structure; the message names the first
            differing path.

    Example:
        >>> import fsharding as fs
        >>> fs.tree.map(lambda a, b: a * b, {"x": 2}, {"x": 3})
        {'x': 6}
    """
    if rest:
        for i, other in enumerate(rest):
            check_same_structure(tree, other, names=("tree", f"rest[{i}]"), api="fs.tree.map")
    return optree.tree_map(fn, tree, *rest)


def leaves(tree: _PyTree) -> list[Any]:
    """The leaves of ``tree`` in canonical (sorted-key) order.

    Example:
        >>> import fsharding as fs
        >>> fs.tree.leaves({"b": 1, "a": (2, 3)})
        [2, 3, 1]
    """
    return optree.tree_leaves(tree)


def structure(tree: _PyTree) -> optree.PyTreeSpec:
    """The treedef of ``tree`` (use with :func:`unflatten`).

    Example:
        >>> import fsharding as fs
        >>> fs.tree.structure({"a": 1}).num_leaves
        1
    """
    return optree.tree_structure(tree)


def unflatten(treedef: optree.PyTreeSpec, leaves: Iterable[Any]) -> _PyTree:
    """Rebuilds a tree from a treedef and its leaves.

    Example:
        >>> import fsharding as fs
        >>> fs.tree.unflatten(fs.tree.structure({"a": 1, "b": 2}), [5, 6])
        {'a': 5, 'b': 6}
    """
    return optree.tree_unflatten(treedef, list(leaves))


def keystr(accessor: optree.PyTreeAccessor) -> str:
    """The JAX-style path string of an optree accessor (``['a'][0].mu``)."""
    s = accessor.codify("")
    return s if s else "<root>"


def leaves_with_path(tree: _PyTree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs with JAX-style path strings.

    Example:
        >>> import fsharding as fs
        >>> fs.tree.leaves_with_path({"a": [10, 20]})
        [("['a'][0]", 10), ("['a'][1]", 20)]
    """
    accessors, lvs, _ = optree.tree_flatten_with_accessor(tree)
    return [(keystr(a), leaf) for a, leaf in zip(accessors, lvs)]


def first_difference(
    a: _PyTree, b: _PyTree, *, names: tuple[str, str] = ("the first tree", "the second tree")
) -> str | None:
    """The path of the first node where two trees' structures differ, or None if equal.

    Where a node's keys differ, the path is that of the first key (in ``a``'s, then ``b``'s
    order) present in one tree only, and says which tree lacks it.

    Args:
        a: first tree.
        b: second tree.
        names: how the two trees are called in the description.

    Example:
        >>> import fsharding as fs
        >>> fs.tree.first_difference({"a": 1, "b": 2}, {"a": 1, "c": 2}, names=("params", "grads"))
        "['b'] (missing from grads; keys ['a', 'b'] in params, ['a', 'c'] in grads)"
    """
    if optree.tree_structure(a) == optree.tree_structure(b):
        return None
    return _diff(a, b, "", names)


def _node(x: _PyTree) -> tuple[Any, list[Any], list[Any]] | None:
    """(node type, children, entries) of a non-leaf, or None for a leaf."""
    if x is not None and optree.tree_structure(x).is_leaf():
        return None
    out = optree.tree_flatten_one_level(x)
    return (type(x), out.metadata), list(out.children), list(out.entries)


def _entry_str(node_type: type, entry: Any) -> str:
    if isinstance(entry, str) and hasattr(node_type, "_fields"):
        return f".{entry}"
    return f"[{entry!r}]"


def _diff(a: _PyTree, b: _PyTree, path: str, names: tuple[str, str]) -> str:
    na, nb = _node(a), _node(b)
    here = path or "<root>"
    if na is None and nb is None:
        return here  # unreachable in practice: two leaves never differ in structure
    if na is None or nb is None:
        kind = lambda n, x: "a leaf" if n is None else type(x).__name__  # noqa: E731
        return f"{here} ({kind(na, a)} vs {kind(nb, b)})"
    (ta, ma), ca, ea = na
    (tb, mb), cb, eb = nb
    if ta is not tb:
        return f"{here} ({ta.__name__} vs {tb.__name__})"
    if list(ea) != list(eb):
        only_a = [x for x in ea if x not in eb]
        only_b = [y for y in eb if y not in ea]
        if only_a:
            at, note = path + _entry_str(ta, only_a[0]), f"missing from {names[1]}"
        elif only_b:
            at, note = path + _entry_str(ta, only_b[0]), f"missing from {names[0]}"
        else:  # the same keys in another order (e.g. an OrderedDict)
            first = next(x for x, y in zip(ea, eb) if x != y)
            at, note = path + _entry_str(ta, first), "keys in another order"
        return f"{at} ({note}; keys {list(ea)!r} in {names[0]}, {list(eb)!r} in {names[1]})"
    if hasattr(ta, "_fields"):
        ea = list(ta._fields)
    for entry, xa, xb in zip(ea, ca, cb):
        sub = path + _entry_str(ta, entry)
        if optree.tree_structure(xa) != optree.tree_structure(xb):
            return _diff(xa, xb, sub, names)
    return f"{here} (node metadata differs: {ma!r} vs {mb!r})"


def check_same_structure(
    a: _PyTree, b: _PyTree, *, names: tuple[str, str] = ("a", "b"), api: str = "fsharding"
) -> None:
    """Raises a ValueError naming the first path where ``a`` and ``b`` differ.

    Args:
        a: first tree.
        b: second tree.
        names: how the two trees are called in the message (argument names).
        api: the public API that is checking, for the message.

    Raises:
        ValueError: the structures differ.

    Example:
        >>> import fsharding as fs
        >>> fs.tree.check_same_structure({"w": 1}, {"w": 2})
        >>> fs.tree.check_same_structure({"w": 1}, {"v": 2}, names=("params", "grads"))
        Traceback (most recent call last):
        ...
        ValueError: fsharding: params and grads differ in pytree structure at ['w'] ...
    """
    where = first_difference(a, b, names=names)
    if where is not None:
        raise ValueError(
            f"{api}: {names[0]} and {names[1]} differ in pytree structure at {where}. "
            f"Pass trees with the same keys and nesting (e.g. grads from "
            f"fs.value_and_grad(f)(params))."
        )


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (checked without importing
    DTensor's module, which costs a second on first import; none can exist before it is).

    Example:
        >>> import torch, fsharding as fs
        >>> fs.tree.is_dtensor(torch.ones(2))
        False
    """
    return type(x).__name__ == "DTensor" and hasattr(x, "_local_tensor")


def storage_key(t: Any) -> tuple[int, int] | None:
    """The identity of the storage behind tensor ``t``: ``(device index, address of its
    first byte)`` (index -1 on CPU), the same for every view of one storage (an empty view
    too: it keeps its storage alive); None for a non-tensor, a meta tensor, a tensor whose
    storage is empty or a tensor without storage (a subclass such as DTensor: take
    :func:`local_tensor` first).

    Computed from the tensor's data pointer, without building a storage or device object:
    cheap enough for a dispatch-mode hot path (``fs.remat`` calls it per op).

    Example:
        >>> import torch, fsharding as fs
        >>> x = torch.zeros(4, 4)
        >>> key = fs.tree.storage_key(x)
        >>> fs.tree.storage_key(x[1:]) == key, fs.tree.storage_key(x.clone()) == key
        (True, False)
        >>> fs.tree.storage_key(torch.zeros(0)) is None, fs.tree.storage_key(x[:0]) == key
        (True, True)
    """
    if type(t) is not _Tensor and not isinstance(t, _TensorBase):
        return None
    try:
        ptr = t.data_ptr()  # 0 for an empty or meta tensor
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
        return None
    if not ptr:  # an empty or meta tensor: an empty view still holds its storage alive
        if t.is_meta:
            return None
        try:
            base = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return (t.get_device(), base) if base else None
    return t.get_device(), ptr - t.storage_offset() * t.element_size()


# isinstance(x, torch.Tensor) is fast only for exactly torch.Tensor (torch.Tensor's
# metaclass checks the rest in Python); its C base class, which every tensor subclass
# derives from, is checked in C.
_Tensor = torch.Tensor
_TensorBase = torch._C.TensorBase


def describe(x: Any, *, shape: bool = False) -> str:
    """How an error message names a value it did not expect: ``a <dtype> tensor`` (with
    ``shape=True``: ``... of shape (2, 3)``), or the name of its type.

    Example:
        >>> import torch, fsharding as fs
        >>> fs.tree.describe(torch.zeros(2, dtype=torch.int64)), fs.tree.describe(3)
        ('a torch.int64 tensor', 'int')
        >>> fs.tree.describe(torch.zeros(2, 3), shape=True)
        'a torch.float32 tensor of shape (2, 3)'
    """
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor" + (f" of shape {tuple(x.shape)}" if shape else "")
    return type(x).__name__


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or ``x`` itself for a plain tensor."""
    return x.to_local() if is_dtensor(x) else x


def nbytes(tree: _PyTree) -> int:
    """Bytes held by the tensors of ``tree``, counting each storage once.

    Views and tied tensors share a storage and count once; a DTensor counts its local
    shard. Non-tensor leaves, meta and empty tensors count zero (:func:`storage_key`).

    Example:
        >>> import torch, fsharding as fs
        >>> w = torch.zeros(4, 4)
        >>> fs.tree.nbytes({"w": w, "view": w[0], "b": torch.zeros(4)})
        80
    """
    seen: dict[tuple[int, int], int] = {}
    for leaf in optree.tree_leaves(tree):
        t = local_tensor(leaf)
        key = storage_key(t)
        if key is not None:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
    return sum(seen.values())


def is_floating(x: Any) -> bool:
    """True for a floating-point (or complex) tensor."""
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


# dtypes torch._foreach_norm(inf) computes on every device; others (float8, float4, complex32)
# go through torch.isfinite one leaf at a time.
_NORM_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}
)


def all_finite(tree: _PyTree) -> torch.Tensor:
    """A 0-dim bool tensor: True when every floating leaf of ``tree`` is finite.

    One fused reduction per device for the usual float dtypes; empty leaves (e.g. a ZeRO-3
    rank's empty shard) are finite; dtypes the fused op lacks (float8, ...) are checked
    leaf by leaf. One device sync is left to the caller (``bool(...)``); no per-leaf sync.

    Example:
        >>> import torch, fsharding as fs
        >>> bool(fs.all_finite({"a": torch.ones(2), "b": torch.tensor([float("inf")])}))
        False
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    flags = []
    for x in optree.tree_leaves(tree):
        if not is_floating(x):
            continue
        t = local_tensor(x).detach()
        if t.numel() == 0:  # _foreach_norm(inf) has no identity for an empty tensor
            continue
        if t.dtype in _NORM_DTYPES:
            by_device.setdefault(t.device, []).append(t)
        else:
            flags.append(_finite_other(t))
    for dev_tensors in by_device.values():
        # max |x| is inf/nan exactly when some element is (no overflow, unlike a sum).
        norms = torch._foreach_norm(dev_tensors, float("inf"))
        flags.append(torch.isfinite(torch.stack([n.float() for n in norms])).all())
    if not flags:
        return torch.tensor(True)
    out = flags[0]
    for f in flags[1:]:
        out = out & f.to(out.device)
    return out


def _finite_other(t: torch.Tensor) -> torch.Tensor:
    """``isfinite(t).all()`` for a dtype ``_foreach_norm`` lacks (via float32 where
    ``isfinite`` lacks it too: float8 converts exactly, NaN stays NaN)."""
    try:
        return torch.isfinite(t).all()
    except (NotImplementedError, RuntimeError):
        pass
    try:
        return torch.isfinite(t.float()).all()
    except (NotImplementedError, RuntimeError):
        if t.dtype == getattr(torch, "float4_e2m1fn_x2", None):  # no NaN or inf encoding
            return torch.tensor(True, device=t.device)
        raise TypeError(f"fs.all_finite: cannot check a {t.dtype} tensor for NaN/inf.") from None
