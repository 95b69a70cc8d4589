"""The optimizer data model: optax's ``GradientTransformation`` on torch tensors.

A ``GradientTransformation`` is a pair of pure functions: ``init(params) -> state`` and
``update(updates, state, params=None) -> (updates, state)``. Optimizers are ``chain``s of
small transforms; each transform's state is its own NamedTuple. ``update`` and
``apply_updates`` run under ``torch.no_grad`` and return tensors that do not require grad.

Memory: the default path never writes into its inputs. The one explicit in-place path is
*donation* (JAX's word): inside ``with donation():`` transforms may overwrite the state they
were given (``Step.step(..., donate=True)`` uses it), and ``apply_updates_`` adds updates into
params in place.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree

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
        >>> identity().init({}) == EmptyState()
        True
    """
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None: (u, s))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in sequence; the state is the tuple of their states.

    Example:
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
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, state: tuple, params: PyTree = None) -> tuple[PyTree, tuple]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"optim.chain: state must be the tuple of {len(transforms)} states returned by "
                f"init, got {type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, tuple) else "")
                + "."
            )
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    update.parts = transforms  # type: ignore[attr-defined]  # for learning_rate()
    return GradientTransformation(init, update)


@torch.no_grad()
def global_norm(updates: PyTree) -> torch.Tensor:
    """The L2 norm of all floating leaves together, as a 0-dim tensor (float32, or float64
    when any leaf is float64).

    Computed with one ``torch._foreach_norm`` per device and dtype (no per-leaf sync).

    Example:
        >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}).item()
        5.0
    """
    leaves = [_tree.local_tensor(x) for x in optree.tree_leaves(updates) if _tree.is_floating(x)]
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for x in leaves:
        groups.setdefault((x.device, x.dtype), []).append(x)
    acc = torch.float64 if any(dt == torch.float64 for _, dt in groups) else torch.float32
    sq = []
    for xs in groups.values():
        norms = torch._foreach_norm(xs, 2)
        sq.append(torch.stack(norms).to(acc).square().sum())
    total = sq[0]
    for s in sq[1:]:
        total = total + s.to(total.device)
    return total.sqrt()


# --------------------------------------------------------------------------------------
# applying updates
# --------------------------------------------------------------------------------------


def _check_updates(params: PyTree, updates: PyTree, api: str) -> None:
    _tree.check_same_structure(params, updates, names=("params", "updates"), api=api)


@torch.no_grad()
def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` leaf-wise, in each param's dtype (new tensors).

    Example:
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"].tolist()
        [2.0, 2.0]
    """
    _check_updates(params, updates, "optim.apply_updates")
    pl, treedef = optree.tree_flatten(params)
    ul = optree.tree_leaves(updates)
    out = [
        p if u is None else (p + u.to(p.dtype)).detach() if isinstance(p, torch.Tensor) else p + u
        for p, u in zip(pl, ul)
    ]
    return optree.tree_unflatten(treedef, out)


@torch.no_grad()
def apply_updates_(params: PyTree, updates: PyTree) -> PyTree:
    """Adds ``updates`` into ``params`` in place (donation) and returns ``params``.

    The caller gives up the old params: every alias of them sees the new values. Use it
    where the memory of a second params copy matters; ``apply_updates`` otherwise.

    Example:
        >>> p = {"w": torch.ones(2)}
        >>> apply_updates_(p, {"w": torch.ones(2)})["w"].tolist()
        [2.0, 2.0]
    """
    _check_updates(params, updates, "optim.apply_updates_")
    pl = [p for p in optree.tree_leaves(params)]
    ul = optree.tree_leaves(updates)
    groups: dict[tuple, tuple[list, list]] = {}
    for p, u in zip(pl, ul):
        if u is None:
            continue
        if u.dtype != p.dtype:
            u = u.to(p.dtype)
        groups.setdefault((p.device, p.dtype), ([], []))
        groups[(p.device, p.dtype)][0].append(_tree.local_tensor(p))
        groups[(p.device, p.dtype)][1].append(_tree.local_tensor(u))
    for ps, us in groups.values():
        torch._foreach_add_(ps, us)
    return params


# --------------------------------------------------------------------------------------
# donation
# --------------------------------------------------------------------------------------

_DONATING: contextvars.ContextVar[bool] = contextvars.ContextVar("fs_donating", default=False)


@contextlib.contextmanager
def donation() -> Iterator[None]:
    """Within this block, ``update`` may overwrite the optimizer state passed to it.

    This is the single in-place path (JAX's buffer donation): the caller promises not to
    use the old state again, and transforms save the memory of a second state copy.

    Example:
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
    """True inside :func:`donation` (transforms use it to pick the in-place path)."""
    return _DONATING.get()


# --------------------------------------------------------------------------------------
# learning-rate introspection (for metrics)
# --------------------------------------------------------------------------------------


def learning_rate(tx: GradientTransformation, state: Any) -> float | None:
    """The learning rate ``tx``'s next ``update`` will use, or None if it has none.

    Transforms built by ``scale_by_learning_rate`` record their schedule; this walks a
    ``chain`` to find it and evaluates it at the state's step count.

    Example:
        >>> from fsharding import optim
        >>> tx = optim.adamw(optim.linear_schedule(0.0, 1.0, 10))
        >>> learning_rate(tx, tx.init({"w": torch.zeros(1)}))
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
