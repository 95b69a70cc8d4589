"""Wrappers around a transform: ``apply_if_finite`` (optax semantics)."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import _util as _u
from fsharding.optim import base as _base
from fsharding.optim.base import GradientTransformation

__all__ = ["ApplyIfFiniteState", "apply_if_finite"]

PyTree = Any


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite` (optax's fields; counters are python ints).

    Attributes:
        notfinite_count: non-finite updates in a row so far.
        last_finite: whether the last updates were all finite (a python bool).
        total_notfinite: non-finite updates in total.
        inner_state: the wrapped transform's state.
    """

    notfinite_count: int
    last_finite: bool
    total_notfinite: int
    inner_state: Any


def _all_finite(leaves: list[torch.Tensor]) -> bool:
    """Finiteness of all leaves, agreed by every rank holding shards (``base.agree``): the
    ``reduce_all`` of an enclosing ``sharded_norm`` block (``fs.zero``), else a MIN
    all-reduce over the DTensor leaves' meshes; so all ranks skip or step together."""
    return _base.agree(_tree.all_finite(leaves), leaves)


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int
) -> GradientTransformation:
    """Runs ``inner`` only on finite updates.

    optax's semantics: when any incoming update element is inf or NaN, the outgoing updates
    are zeros and ``inner``'s state is kept unchanged (the same objects), unless this is more
    than ``max_consecutive_errors`` non-finite updates in a row, in which case ``inner`` runs
    anyway. Costs one device sync per update (the finiteness flag decides on the host). Sharded,
    every rank takes the same branch (``optim.base.agree``): under ``fs.zero`` (plain
    local shards) through its ``reduce_all``, with DTensor leaves by one MIN all-reduce over
    their mesh; a NaN in one rank's shard skips the step on every rank.

    Args:
        inner: the transform to protect (e.g. ``optim.adamw(1e-3)``).
        max_consecutive_errors: how many non-finite updates in a row are skipped, >= 0.

    Returns:
        A transform with state :class:`ApplyIfFiniteState`. Its update carries
        ``learning_rate`` for ``optim.learning_rate``.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.apply_if_finite(optim.sgd(1.0), max_consecutive_errors=2)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> u, s = tx.update({"w": torch.tensor([float("nan")])}, s)
        >>> u["w"].tolist(), s.notfinite_count, s.last_finite
        ([0.0], 1, False)
    """
    api = "optim.apply_if_finite"
    if not isinstance(inner, GradientTransformation):
        raise TypeError(
            f"{api}: inner must be a GradientTransformation, got {type(inner).__name__}; "
            "pass an optimizer such as optim.adamw(1e-3)."
        )
    limit = _u.integer(api, "max_consecutive_errors", max_consecutive_errors)

    def init(params: PyTree) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(0, True, 0, inner.init(params))

    @torch.no_grad()
    def update(updates: PyTree, state: ApplyIfFiniteState, params: PyTree = None):
        if not isinstance(state, ApplyIfFiniteState):
            raise TypeError(
                f"{api}: state must be the ApplyIfFiniteState returned by init, got "
                f"{type(state).__name__}."
            )
        gl, gdef = _u.flatten(updates, api, "updates")
        finite = _all_finite(gl)
        notfinite = 0 if finite else int(state.notfinite_count) + 1
        total = int(state.total_notfinite) + (0 if finite else 1)
        if finite or notfinite > limit:
            updates, inner_state = inner.update(updates, state.inner_state, params)
        else:
            if _base.donating():
                loc, _ = _u.local(gl)
                for idx in _u.groups(loc):
                    torch._foreach_zero_(_u.pick(loc, idx))
                out = gl
            else:
                out = [torch.zeros_like(x) for x in gl]
            updates, inner_state = optree.tree_unflatten(gdef, out), state.inner_state
        return updates, ApplyIfFiniteState(notfinite, finite, total, inner_state)

    update.learning_rate = lambda state: _base.learning_rate(inner, state.inner_state)
    update.inner = inner
    update.elementwise = False  # needs the whole tree (fs.offload streams elementwise only)
    return GradientTransformation(init, update)
