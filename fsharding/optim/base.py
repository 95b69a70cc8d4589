"""The optimizer data model: optax's ``GradientTransformation`` on torch tensors.

This module owns the core every optimizer shares: the ``GradientTransformation`` type, its
``EmptyState``, ``identity`` and ``chain``; applying updates (``apply_updates`` and the
in-place ``apply_updates_``); the one in-place path (``donation`` / ``donating``); the
quantities and decisions over all the grads that sharded leaves must make globally
(``global_norm``, and ``sharded_norm`` / ``agree``, the protocol ``fs.zero`` plugs its
reductions into); and ``learning_rate``, read by the training step's metrics.

A ``GradientTransformation`` is a pair of pure functions: ``init(params) -> state`` and
``update(updates, state, params=None) -> (updates, state)``. Optimizers are ``chain``s of
small transforms; each transform's state is its own NamedTuple. ``update`` and
``apply_updates`` run under ``torch.no_grad`` and return tensors that do not require grad.

Memory: the default path never writes into its inputs. The one explicit in-place path is
*donation* (JAX's word): inside ``with optim.donation():`` transforms update the state they
were given in place and may reuse the incoming updates' buffers (``Step.step(...,
donate=True)`` uses it), with bitwise the same results; ``optim.apply_updates_`` adds
updates into params in place.

Example:
    >>> import torch
    >>> from fsharding import optim
    >>> tx = optim.chain(optim.scale_by_adam(), optim.scale(-1e-3))
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
    >>> optim.apply_updates(params, updates)["w"].tolist()
    [0.9990000128746033, 0.9990000128746033]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import optree
import torch
import torch.distributed as dist

from fsharding import _context
from fsharding import tree as _tree
from fsharding._compat import settle, use_counts
from fsharding.optim import _leaves

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "chain",
    "identity",
    "apply_updates",
    "apply_updates_",
    "donation",
    "donating",
    "learning_rate",
    "global_norm",
    "agree",
]

PyTree = Any
Schedule = Callable[[int], float]


class GradientTransformation(NamedTuple):
    """A pure optimizer building block: ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (updates, state)``.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.sgd(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> optim.apply_updates(params, updates)["w"].tolist()
        [0.8999999761581421, 0.8999999761581421]
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def identity() -> GradientTransformation:
    """The transform that returns updates unchanged.

    Example:
        >>> from fsharding import optim
        >>> optim.identity().init({}) == optim.EmptyState()
        True
    """

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in sequence; the state is the tuple of their states.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.scale(-0.1))
        >>> len(tx.init({"w": torch.zeros(2)}))
        2
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"optim.chain: argument {i} is a {type(t).__name__}, not a "
                "GradientTransformation; pass transforms such as optim.scale(-0.1)."
            )

    def init(params: PyTree) -> tuple:
        states = tuple(t.init(params) for t in transforms)
        update.expected = tuple(map(type, states))  # type: ignore[attr-defined]
        return states

    def update(updates: PyTree, state: tuple, params: PyTree = None) -> tuple[PyTree, tuple]:
        check_chain_state(update, state, len(transforms))
        if params is not None:  # before any part runs (a first clip would write in place)
            _check_chain_leaves(updates, params, update.api)  # type: ignore[attr-defined]
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    update.parts = transforms  # type: ignore[attr-defined]  # for learning_rate()
    update.api = "optim.chain"  # type: ignore[attr-defined]  # aliases put their name
    return GradientTransformation(init, update)


def _is_namedtuple(t: type) -> bool:
    return issubclass(t, tuple) and hasattr(t, "_fields")


def _describe_states(state: Any) -> str:
    if not isinstance(state, tuple):
        return f"a {type(state).__name__}"
    return f"a tuple of length {len(state)} ({', '.join(type(s).__name__ for s in state)})"


def check_chain_state(update_fn: Callable[..., Any], state: Any, n: int) -> None:
    """The state given to a chain's update is the tuple its init returns: the right length
    and, where init ran in this process, each part's state type (a state from another
    optimizer of the same length would otherwise run silently on the wrong moments)."""
    api = getattr(update_fn, "api", "optim.chain")
    expected = getattr(update_fn, "expected", None)
    want = f" ({', '.join(t.__name__ for t in expected)})" if expected else ""
    fix = (
        "A state from another optimizer? Pass the state this optimizer's init(params) "
        "returned (re-run init after changing the optimizer)."
    )
    if not isinstance(state, tuple) or len(state) != n:
        raise ValueError(
            f"{api}: state must be the tuple of {n} states its init returns{want}, got "
            f"{_describe_states(state)}. {fix}"
        )
    if expected:
        for i, (s, e) in enumerate(zip(state, expected)):
            if type(s) is not e and _is_namedtuple(type(s)) and _is_namedtuple(e):
                raise TypeError(
                    f"{api}: state[{i}] is a {type(s).__name__} where this chain keeps a "
                    f"{e.__name__}: it expected the states{want}, got {_describe_states(state)}. "
                    f"{fix}"
                )


def _check_chain_leaves(updates: PyTree, params: PyTree, api: str) -> None:
    ul, udef = optree.tree_flatten(updates)
    pl, pdef = optree.tree_flatten(params)
    if udef != pdef:
        return  # the parts that read params name the difference
    for i, (u, p) in enumerate(zip(ul, pl)):
        if isinstance(u, torch.Tensor) and isinstance(p, torch.Tensor):
            if u.shape != p.shape:
                _leaves.raise_leaf_mismatch(api, i, u, p, updates, ("updates", "params"))


@torch.no_grad()
def global_norm(updates: PyTree) -> torch.Tensor:
    """The L2 norm of all floating leaves together, as a 0-dim tensor (float32, or float64
    when any leaf is float64).

    Computed with one ``torch._foreach_norm`` per device and dtype (no per-leaf sync). A
    DTensor leaf counts by its global value: local squared norms are summed over the mesh
    dims it is sharded on (one all-reduce per mesh and layout), replicated dims count once.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> optim.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}).item()
        5.0
    """
    leaves = [x for x in optree.tree_leaves(updates) if _tree.is_floating(x)]
    acc = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    reduce = _SHARDED_NORM.get()
    if reduce is not None:  # leaves are local shards (fs.zero): sum squares over ranks
        # called even with no leaves: the other ranks wait in its collective (a pipeline
        # stage without params, a rank whose shards are empty)
        local = [_tree.local_tensor(x) for x in leaves]
        per_leaf = [n.to(acc).square() for n in torch._foreach_norm(local, 2)] if local else []
        return reduce(per_leaf).to(acc).sqrt()
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    plain = [x for x in leaves if not _tree.is_dtensor(x)]
    sq = [_sum_sq(_leaves.pick(plain, g), acc) for g in _leaves.groups(plain)]
    if len(plain) < len(leaves):
        sq.extend(_dtensor_sum_sq([x for x in leaves if _tree.is_dtensor(x)], acc))
    total = sq[0]
    for s in sq[1:]:
        total = total + s.to(total.device)
    return total.sqrt()


_SHARDED_NORM = _context.SHARDED_NORM


_SHARDED_LEAF_NORMS = _context.SHARDED_LEAF_NORMS


_REDUCE_ALL = _context.REDUCE_ALL


@contextlib.contextmanager
def sharded_norm(
    reduce: Callable[[list[torch.Tensor]], torch.Tensor],
    reduce_leaves: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
    *,
    reduce_all: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Within this block, the optimizer sees sharded leaves (used by ``fs.zero``): every
    quantity or decision that depends on all the grads is made global.

    ``reduce(per_leaf_squared_norms) -> total`` turns the local squared norm of each leaf
    (in leaf order) into the global sum of squares, e.g. with an all-reduce over the ranks
    that hold the shards. So :func:`global_norm` and ``clip_by_global_norm`` inside a
    sharded optimizer use the norm of the whole, unsharded gradient. ``reduce_leaves(positions,
    squared)`` does the same leaf by leaf (``squared[i]`` is the local squared norm of the
    leaf at ``positions[i]`` in the tree's leaf order) for per-leaf norms such as
    :func:`scale_by_trust_ratio`'s (LAMB), which refuses to run in this block without it.
    ``reduce_all(flag) -> flag`` takes a 0-dim int32 tensor (1: true on this rank) and
    returns the MIN over every rank holding shards; :func:`agree` uses it for yes/no
    decisions such as ``apply_if_finite``'s, so all ranks skip or step together (without
    it, such decisions under this block are refused: one rank alone would diverge or hang).

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> with optim.base.sharded_norm(lambda sq: 2 * sum(sq)):  # a 2nd rank, same shard
        ...     optim.global_norm({"a": torch.tensor([3.0, 4.0])}).item()
        7.071067810058594
    """
    token = _SHARDED_NORM.set(reduce)
    token_leaves = _SHARDED_LEAF_NORMS.set(reduce_leaves)
    token_all = _REDUCE_ALL.set(reduce_all)
    try:
        yield
    finally:
        _REDUCE_ALL.reset(token_all)
        _SHARDED_LEAF_NORMS.reset(token_leaves)
        _SHARDED_NORM.reset(token)


def sharded_leaf_norms() -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
    """The per-leaf reducer of the enclosing :func:`sharded_norm` block, if any."""
    return _SHARDED_LEAF_NORMS.get()


def in_sharded_norm() -> bool:
    """True inside a :func:`sharded_norm` block (the leaves are local shards)."""
    return _SHARDED_NORM.get() is not None


@torch.no_grad()
def agree(flag: torch.Tensor | bool, leaves: list[Any] | None = None) -> bool:
    """A yes/no decision that depends on all the grads, agreed by every rank (MIN: true
    only when true everywhere) and returned as a python bool.

    Every optimizer decision that reads the whole tree goes through here, so all ranks
    take the same branch: inside ``sharded_norm(..., reduce_all=...)`` (``fs.zero``) the
    given ``reduce_all``; else, when ``leaves`` holds DTensors, a MIN all-reduce over each
    of their meshes (every mesh dim, in leaf order: the ranks that hold the shards, not the
    default group); else the local value. Never true where the local flag is false.

    Args:
        flag: a 0-dim bool or integer tensor (or a bool): the decision on this rank.
        leaves: the tree's leaves the decision was computed from (for their meshes).

    Raises:
        RuntimeError: inside a ``sharded_norm`` block that gives no ``reduce_all``.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> optim.base.agree(torch.tensor(True))
        True
        >>> with optim.base.sharded_norm(lambda sq: sum(sq), reduce_all=lambda f: f * 0):
        ...     optim.base.agree(torch.tensor(True))  # another rank said no
        False
    """
    local = flag if isinstance(flag, torch.Tensor) else torch.tensor(bool(flag))
    local = local.reshape(()).to(torch.int32)
    reduce_all = _REDUCE_ALL.get()
    if reduce_all is not None:
        out = reduce_all(local.clone())
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise TypeError(
                "optim.base.agree: the reduce_all given to optim.base.sharded_norm returned "
                f"{type(out).__name__}"
                + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
                + "; it must return a 0-dim tensor, the MIN of the flag over the ranks."
            )
        return bool(out.reshape(())) and bool(local)
    if _SHARDED_NORM.get() is not None:
        raise RuntimeError(
            "optim.base.agree: a decision over all the grads (e.g. optim.apply_if_finite's) "
            "inside optim.base.sharded_norm(reduce) with no reduce_all: each rank would "
            "decide on its own shards and the ranks diverge or hang. Pass "
            "sharded_norm(reduce, reduce_leaves, reduce_all=...) with a MIN all-reduce over "
            "the ranks that hold the shards."
        )
    meshes: dict[int, tuple[Any, torch.device]] = {}
    for x in leaves or ():
        if _tree.is_dtensor(x) and id(x.device_mesh) not in meshes:
            meshes[id(x.device_mesh)] = (x.device_mesh, x.to_local().device)
    if not meshes:
        return bool(local)
    for mesh, device in meshes.values():
        local = local.to(device)
        before = use_counts([local])
        for dim in range(mesh.ndim):
            dist.all_reduce(local, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
        settle(before)  # gloo's workers have let go of `local` (no SIGABRT at exit)
    return bool(local)


def _sum_sq(xs: list[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    norms = torch._foreach_norm(xs, 2)
    return torch.stack(norms).to(acc).square().sum()


def _dtensor_sum_sq(leaves: list[Any], acc: torch.dtype) -> list[torch.Tensor]:
    # Imported here, not at the top: the leaves are DTensors, so torch has loaded these
    # modules already, while a plain-tensor run would pay a second to import them.
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import Replicate, Shard

    out: list[torch.Tensor] = []
    buckets: dict[tuple, tuple[Any, tuple, list[torch.Tensor]]] = {}
    for x in leaves:
        pl = tuple(x.placements)
        if all(isinstance(p, (Shard, Replicate)) for p in pl):
            key = (id(x.device_mesh), pl, x.to_local().device, x.dtype)
            buckets.setdefault(key, (x.device_mesh, pl, []))[2].append(x.to_local())
        else:  # e.g. Partial: let DTensor reduce it
            n = torch.linalg.vector_norm(x).full_tensor()
            out.append(n.to(acc).square())
    for mesh, pl, locs in buckets.values():
        s = _sum_sq(locs, acc)
        for dim, p in enumerate(pl):
            if isinstance(p, Shard):
                before = use_counts([s])
                s = funcol.wait_tensor(funcol.all_reduce(s, "sum", (mesh, dim)))
                settle([(s, 1), *before])  # gloo's worker has let go of both
        out.append(s)
    return out


# --------------------------------------------------------------------------------------
# applying updates
# --------------------------------------------------------------------------------------


def _check_updates(params: PyTree, updates: PyTree, api: str) -> None:
    _tree.check_same_structure(params, updates, names=("params", "updates"), api=api)


def _check_leaves(pl: list, ul: list, updates: PyTree, api: str) -> None:
    """Per tensor param: a tensor update of its shape (never broadcast), and no
    floating update into an integer param (it would be truncated silently)."""
    for i, (p, u) in enumerate(zip(pl, ul)):
        if not isinstance(p, torch.Tensor):
            continue
        if not isinstance(u, torch.Tensor):
            path = _tree.leaves_with_path(updates)[i][0]
            raise TypeError(
                f"{api}: updates leaf {path} is {u!r} ({type(u).__name__}) for a tensor param; "
                "pass one tensor of the param's shape per param (no broadcasting)."
            )
        if p.shape != u.shape:
            _leaves.raise_leaf_mismatch(api, i, u, p, updates, ("updates", "params"))
        if u.dtype.is_floating_point and not (p.dtype.is_floating_point or p.is_complex()):
            path = _tree.leaves_with_path(updates)[i][0]
            raise TypeError(
                f"{api}: params leaf {path} is {p.dtype} and its update is {u.dtype}: adding "
                "would truncate the update silently. Keep integer values out of the params "
                "(e.g. in the batch or a closure), or make the param a float tensor."
            )


@torch.no_grad()
def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` leaf-wise, in each param's dtype (new tensors).

    One ``torch._foreach_add`` per device and dtype; DTensor params keep their layout.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> optim.apply_updates({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"].tolist()
        [2.0, 2.0]
    """
    pl, treedef = optree.tree_flatten(params)
    ul, udef = optree.tree_flatten(updates)
    if treedef != udef:
        _check_updates(params, updates, "optim.apply_updates")
    _check_leaves(pl, ul, updates, "optim.apply_updates")
    out = list(pl)
    pos = [i for i, (p, u) in enumerate(zip(pl, ul)) if isinstance(p, torch.Tensor)]
    for i, (p, u) in enumerate(zip(pl, ul)):
        if not isinstance(p, torch.Tensor):
            out[i] = p + u
    tp = [pl[i] for i in pos]
    tu = [ul[i] for i in pos]
    p_loc, dt = _leaves.local(tp)
    u_loc, _ = _leaves.local(tu)
    if dt:  # other placements of one global shape: other local shapes
        for k, (u, p) in enumerate(zip(u_loc, p_loc)):
            if u.shape != p.shape:
                names = ("updates (local shard)", "params (local shard)")
                _leaves.raise_leaf_mismatch("optim.apply_updates", pos[k], u, p, updates, names)
    new = list(p_loc)
    # Mixed dtypes (e.g. float32 updates of bf16 params): add with type promotion, round
    # once to the param dtype (optax's rule) — a pre-cast of the update would round twice.
    same = [i for i, (p, u) in enumerate(zip(p_loc, u_loc)) if p.dtype == u.dtype]
    for i in sorted(set(range(len(p_loc))) - set(same)):
        new[i] = (p_loc[i] + u_loc[i]).to(p_loc[i].dtype)
    sp, su = [p_loc[i] for i in same], [u_loc[i] for i in same]
    out_same = list(sp)
    for g in _leaves.groups(sp, su):
        _leaves.put(out_same, g, torch._foreach_add(_leaves.pick(sp, g), _leaves.pick(su, g)))
    for i, x in zip(same, out_same):
        new[i] = x
    if dt:
        new = _leaves.rewrap(new, tp, p_loc)
    for i, x in zip(pos, new):
        out[i] = x
    return optree.tree_unflatten(treedef, out)


@torch.no_grad()
def apply_updates_(params: PyTree, updates: PyTree) -> PyTree:
    """Adds ``updates`` into ``params`` in place (donation) and returns ``params``.

    The caller gives up the old params: every alias of them sees the new values. Use it
    where the memory of a second params copy matters; ``apply_updates`` otherwise.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> p = {"w": torch.ones(2)}
        >>> optim.apply_updates_(p, {"w": torch.ones(2)})["w"].tolist()
        [2.0, 2.0]
    """
    pl, pdef = optree.tree_flatten(params)
    ul, udef = optree.tree_flatten(updates)
    if pdef != udef:
        _check_updates(params, updates, "optim.apply_updates_")
    _check_leaves(pl, ul, updates, "optim.apply_updates_")
    p_loc, dt = _leaves.local(pl)
    u_loc, _ = _leaves.local(ul)
    if dt:  # other placements of one global shape: other local shapes
        _leaves.check_local("optim.apply_updates_", u_loc, (p_loc,), updates, ("params",))
    same = [(p, u) for p, u in zip(p_loc, u_loc) if p.dtype == u.dtype]
    for p, u in zip(p_loc, u_loc):
        if p.dtype != u.dtype:
            p.add_(u)  # computes in the promoted dtype, rounds once into p
    sp, su = [p for p, _ in same], [u for _, u in same]
    for g in _leaves.groups(sp, su):
        torch._foreach_add_(_leaves.pick(sp, g), _leaves.pick(su, g))
    return params


# --------------------------------------------------------------------------------------
# donation
# --------------------------------------------------------------------------------------

_DONATING = _context.DONATING


@contextlib.contextmanager
def donation() -> Iterator[None]:
    """Within this block, ``update`` may overwrite the optimizer state and the updates
    passed to it.

    This is the single in-place path (JAX's buffer donation): the caller promises not to
    use the old state or the incoming updates (e.g. the grads) again, and transforms save
    the memory of a second state copy: state tensors are updated in place (the same tensor
    objects come back) and outgoing updates may live in the incoming updates' buffers. The
    values are bitwise those of the non-donated path.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.adam(1e-3)
        >>> p = {"w": torch.ones(2)}
        >>> s = tx.init(p)
        >>> with optim.donation():
        ...     u, s2 = tx.update({"w": torch.ones(2)}, s, p)
        >>> s2[0].mu["w"] is s[0].mu["w"]
        True
    """
    token = _DONATING.set(True)
    try:
        yield
    finally:
        _DONATING.reset(token)


def donating() -> bool:
    """True inside :func:`donation` (transforms use it to pick the in-place path).

    Example:
        >>> from fsharding import optim
        >>> optim.donating()
        False
    """
    return _DONATING.get()


# --------------------------------------------------------------------------------------
# learning-rate introspection (for metrics)
# --------------------------------------------------------------------------------------


def learning_rate(tx: GradientTransformation, state: Any) -> float | None:
    """The learning rate ``tx``'s next ``update`` will use, or None if it has none.

    Transforms built by ``scale_by_learning_rate`` record their schedule; this walks a
    ``chain`` to find it and evaluates it at the state's step count.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.adamw(optim.linear_schedule(0.0, 1.0, 10))
        >>> optim.learning_rate(tx, tx.init({"w": torch.zeros(1)}))
        0.0
    """
    fn = getattr(tx.update, "learning_rate", None)
    if fn is not None:
        return fn(state)
    parts = getattr(tx.update, "parts", None)
    if parts is not None and isinstance(state, tuple) and len(state) == len(parts):
        for t, s in zip(parts, state):
            lr = learning_rate(t, s)
            if lr is not None:
                return lr
    return None
