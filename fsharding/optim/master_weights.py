"""``fs.amp`` on an optimizer: float32 master weights for half-precision params.

This module owns :func:`master_weights` (what ``fs.amp(optimizer, policy=...)`` returns)
and its state, :class:`AmpState`; the ``fs.Policy`` it reads is ``fsharding.precision``'s.

In pure bfloat16 (or float16) training the params themselves are half precision, and an
update smaller than half a unit in the last place of a param is lost: ``256 + 1`` is 256 in
bfloat16. ``fs.amp(optimizer, policy="pure_bf16")`` keeps a float32 *master* copy of every
float16 / bfloat16 param in the optimizer state. Each ``update``

1. casts the gradients to float32,
2. runs the inner optimizer against the masters (its state was initialised on them, so
   Adam's moments are float32 too),
3. adds the inner updates to the masters (float32: updates ``+256, +1, -256`` move a param
   by exactly 1), and
4. returns updates that take each param to its master cast to the param dtype:
   ``update = master.to(dtype).float() - param.float()`` as float32.

Adding them with one rounding (optax's ``apply_updates``: ``(p + u).to(p.dtype)``) gives
exactly ``master.to(param_dtype)`` whenever the float32 difference is exact: always unless
the new param is below ``2**-12`` times the old one. Rounding ``u`` to the param dtype first
lands within one unit in the last place of the larger of the old and new param, and exactly
whenever a step changes a param by less than a factor of 2 (Sterbenz). The master is never
affected: the error does not accumulate. Params stored in float32 or float64 are their own
masters: their grads and updates pass through.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import base as _optim
from fsharding.precision import HALF, Policy

__all__ = ["AmpState", "master_weights"]

_PyTree = Any


class AmpState(NamedTuple):
    """State of ``fs.amp(optimizer)``.

    Attributes:
        master: the params' structure; a float32 copy for each float16 / bfloat16 param,
            ``None`` for params that are their own master.
        inner: the wrapped optimizer's state, initialised on the masters.
    """

    master: _PyTree
    inner: Any


def _flat(tree: _PyTree) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=True)


def master_weights(
    optimizer: _optim.GradientTransformation, policy: Policy
) -> _optim.GradientTransformation:
    """Wraps ``optimizer`` with float32 master weights (what ``fs.amp(optimizer)`` returns).

    Args:
        optimizer: the inner ``GradientTransformation``.
        policy: the mixed-precision policy; when its ``param_dtype`` is half precision,
            ``init`` checks that some params are stored in it (a reminder to cast them with
            ``policy.cast_to_param``).

    Returns:
        A ``GradientTransformation`` whose state is an :class:`AmpState`; ``update`` needs
        ``params``.

    Example:
        >>> import torch, fsharding as fs
        >>> from fsharding import optim
        >>> tx = fs.amp(optim.sgd(1.0), policy="pure_bf16")
        >>> params = {"w": torch.zeros(1, dtype=torch.bfloat16)}
        >>> state = tx.init(params)
        >>> for g in (-256.0, -1.0, 256.0):
        ...     grads = {"w": torch.tensor([g], dtype=torch.bfloat16)}
        ...     updates, state = tx.update(grads, state, params)
        ...     params = optim.apply_updates(params, updates)
        >>> params["w"].item(), state.master["w"].item()
        (1.0, 1.0)
    """
    if not isinstance(optimizer, _optim.GradientTransformation):
        raise TypeError(
            f"fs.amp: optimizer must be an optim.GradientTransformation, got "
            f"{type(optimizer).__name__}."
        )

    @torch.no_grad()
    def init(params: _PyTree) -> AmpState:
        leaves, treedef = optree.tree_flatten(params)
        if policy.param_dtype in HALF and not any(
            isinstance(p, torch.Tensor) and p.dtype == policy.param_dtype for p in leaves
        ):
            raise ValueError(
                f"fs.amp(optimizer, policy='{policy}'): the policy stores params in "
                f"{policy.param_dtype} but no params leaf has that dtype. Cast them first: "
                "params = policy.cast_to_param(params)."
            )
        # .float() of a half tensor is a new float32 tensor (a DTensor keeps its layout).
        master = [p.detach().float() if _is_half(p) else None for p in leaves]
        full = [p if m is None else m for p, m in zip(leaves, master)]
        return AmpState(
            master=optree.tree_unflatten(treedef, master),
            inner=optimizer.init(optree.tree_unflatten(treedef, full)),
        )

    @torch.no_grad()
    def update(updates: _PyTree, state: AmpState, params: _PyTree = None) -> tuple[_PyTree, Any]:
        if params is None:
            raise ValueError(
                "fs.amp(optimizer).update: params are required (the updates take each param "
                "to its float32 master); call update(grads, state, params)."
            )
        if not isinstance(state, AmpState):
            raise TypeError(
                "fs.amp(optimizer).update: state must be the AmpState returned by init, got "
                f"{type(state).__name__}."
            )
        _tree.check_same_structure(
            params, updates, names=("params", "grads"), api="fs.amp(optimizer).update"
        )
        p_leaves, treedef = optree.tree_flatten(params)
        g_leaves = optree.tree_leaves(updates)
        m_leaves = _flat(state.master)
        if len(m_leaves) != len(p_leaves):
            raise ValueError(
                "fs.amp(optimizer).update: state.master does not match the params' structure "
                "(state from another model?); call init(params) again."
            )
        full = [p if m is None else m for p, m in zip(p_leaves, m_leaves)]
        grads = [
            g.to(f.dtype) if isinstance(g, torch.Tensor) and g.dtype != f.dtype else g
            for g, f in zip(g_leaves, full)
        ]
        inner_updates, inner_state = optimizer.update(
            optree.tree_unflatten(treedef, grads), state.inner, optree.tree_unflatten(treedef, full)
        )
        u_leaves = optree.tree_leaves(inner_updates, none_is_leaf=True)
        new_master, out = [], []
        for p, m, u in zip(p_leaves, m_leaves, u_leaves):
            if m is None or u is None:
                new_master.append(m)
                out.append(u)
                continue
            m = m.add_(u) if _optim.donating() else m + u
            new_master.append(m)
            out.append(m.to(p.dtype).float() - p.float())
        return optree.tree_unflatten(treedef, out), AmpState(
            master=optree.tree_unflatten(treedef, new_master), inner=inner_state
        )

    update.learning_rate = lambda state: _optim.learning_rate(optimizer, state.inner)  # type: ignore[attr-defined]
    return _optim.GradientTransformation(init, update)


def _is_half(p: Any) -> bool:
    return isinstance(p, torch.Tensor) and p.dtype in HALF
