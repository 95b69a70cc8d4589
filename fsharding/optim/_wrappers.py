"""Wrappers that change when or where an inner transform applies (optax semantics).

This module owns ``apply_if_finite`` (skip non-finite steps, agreed by every rank holding
shards), ``masked`` (apply to the leaves a mask selects) and ``MultiSteps`` (accumulate
``k`` steps' updates, with the ``should_skip_update_fn`` rules ``skip_not_finite`` and
``skip_large_updates``), each with its state NamedTuple.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from fsharding import tree as _tree
from fsharding.optim import _checks, _leaves
from fsharding.optim import base as _base
from fsharding.optim.base import GradientTransformation

__all__ = [
    "ApplyIfFiniteState",
    "MaskedNode",
    "MaskedState",
    "MultiSteps",
    "MultiStepsState",
    "apply_if_finite",
    "masked",
    "skip_large_updates",
    "skip_not_finite",
]

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
    limit = _checks.integer(api, "max_consecutive_errors", max_consecutive_errors)

    def init(params: PyTree) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(0, True, 0, inner.init(params))

    @torch.no_grad()
    def update(updates: PyTree, state: ApplyIfFiniteState, params: PyTree = None):
        if not isinstance(state, ApplyIfFiniteState):
            raise TypeError(
                f"{api}: state must be the ApplyIfFiniteState returned by init, got "
                f"{type(state).__name__}."
            )
        gl, gdef = _leaves.flatten(updates, api, "updates")
        finite = _all_finite(gl)
        notfinite = 0 if finite else int(state.notfinite_count) + 1
        total = int(state.total_notfinite) + (0 if finite else 1)
        if finite or notfinite > limit:
            updates, inner_state = inner.update(updates, state.inner_state, params)
        else:
            if _base.donating():
                loc, _ = _leaves.local(gl)
                for idx in _leaves.groups(loc):
                    torch._foreach_zero_(_leaves.pick(loc, idx))
                out = gl
            else:
                out = [torch.zeros_like(x) for x in gl]
            updates, inner_state = optree.tree_unflatten(gdef, out), state.inner_state
        return updates, ApplyIfFiniteState(notfinite, finite, total, inner_state)

    update.learning_rate = lambda state: _base.learning_rate(inner, state.inner_state)
    update.inner = inner
    update.elementwise = False  # needs the whole tree (fs.offload streams elementwise only)
    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------
# masked
# --------------------------------------------------------------------------------------


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner transform's state (for masked-in leaves only)."""

    inner_state: Any


class MaskedNode(NamedTuple):
    """Stands for a masked-out leaf in the trees :func:`masked` hands its inner transform
    (an empty node: tree functions skip it), as optax's ``MaskedNode``."""


def _mask_tree(api: str, mask: Any, tree: PyTree) -> PyTree:
    m = mask(tree) if callable(mask) else mask
    _checks.mask_leaves(api, m, tree)  # checks bools and the (prefix) structure, naming paths
    return m


def _apply_mask(m: PyTree, tree: PyTree) -> PyTree:
    return optree.tree_map(lambda b, sub: sub if _checks.as_bool(b) else MaskedNode(), m, tree)


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Applies ``inner`` to the leaves where ``mask`` is True; the others pass through
    unchanged (optax's ``masked``).

    ``inner`` sees the trees with masked-out leaves (or subtrees) replaced by
    :class:`MaskedNode`, so its state holds entries only for masked-in leaves (optax's
    rule). A callable mask is called on the params at ``init`` and on the updates at
    ``update`` (as optax); under ``fs.zero`` those are the rank's local shards (same ``ndim``
    and dtype, fewer rows), so a mask should depend on keys, ``ndim`` or dtype only.

    Args:
        inner: the transform to apply to the masked-in leaves.
        mask: a pytree of bools with the structure of params (or a prefix of it: a bool
            masks a whole subtree), or a callable ``params -> such a tree``.

    Returns:
        A transform with state :class:`MaskedState`.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.masked(optim.scale(-1.0), {"w": True, "b": False})
        >>> g = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update(g, tx.init(g))
        >>> u["w"].item(), u["b"].item()
        (-1.0, 1.0)
    """
    api = "optim.masked"
    if not isinstance(inner, GradientTransformation):
        raise TypeError(
            f"{api}: inner must be a GradientTransformation, got {type(inner).__name__}; "
            "pass a transform such as optim.add_decayed_weights(1e-4)."
        )
    _checks.check_mask(api, mask)

    def init(params: PyTree) -> MaskedState:
        m = _mask_tree(api, mask, params)
        return MaskedState(inner.init(_apply_mask(m, params)))

    @torch.no_grad()
    def update(updates: PyTree, state: MaskedState, params: PyTree = None):
        if not isinstance(state, MaskedState):
            raise TypeError(
                f"{api}: state must be the MaskedState returned by init, got "
                f"{type(state).__name__}. A state from another optimizer? Pass the state "
                "this optimizer's init(params) returned."
            )
        m = _mask_tree(api, mask, updates)
        masked_params = None if params is None else _apply_mask(m, params)
        new, inner_state = inner.update(_apply_mask(m, updates), state.inner_state, masked_params)
        out = optree.tree_map(
            lambda b, n, old: n if _checks.as_bool(b) else old,
            m,
            new,
            updates,
            is_leaf=lambda x: isinstance(x, MaskedNode),
        )
        return out, MaskedState(inner_state)

    update.learning_rate = lambda state: _base.learning_rate(inner, state.inner_state)
    update.elementwise = False  # the mask applies to the whole tree
    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------
# MultiSteps (gradient accumulation as an optimizer wrapper)
# --------------------------------------------------------------------------------------


class MultiStepsState(NamedTuple):
    """State of :class:`MultiSteps` (optax's fields; counters are python ints).

    Attributes:
        mini_step: mini-steps accumulated since the last inner update.
        gradient_step: inner updates done so far.
        inner_opt_state: the wrapped optimizer's state.
        acc_grads: the accumulated grads (a tree like params).
        skip_state: what ``should_skip_update_fn`` returned last (``()`` without one).
    """

    mini_step: int
    gradient_step: int
    inner_opt_state: Any
    acc_grads: Any
    skip_state: Any = ()


def skip_not_finite(updates: PyTree, gradient_step: int, params: PyTree) -> tuple[Any, dict]:
    """A ``should_skip_update_fn`` for :class:`MultiSteps`: skip when any update element is
    inf or NaN (optax's). Returns ``(should_skip, {"should_skip", "num_not_finite"})``.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> nan = torch.tensor(float("nan"))
        >>> skip, info = optim.skip_not_finite([nan, torch.zeros(())], 0, None)
        >>> bool(skip), int(info["num_not_finite"])
        (True, 1)
    """
    ls = [x for x in optree.tree_leaves(updates) if isinstance(x, torch.Tensor)]
    n = sum((~torch.isfinite(_tree.local_tensor(x))).sum() for x in ls) if ls else 0
    n = torch.as_tensor(n)
    return n > 0, {"should_skip": n > 0, "num_not_finite": n}


def skip_large_updates(
    updates: PyTree, gradient_step: int, params: PyTree, max_squared_norm: float
) -> tuple[Any, dict]:
    """A ``should_skip_update_fn`` for :class:`MultiSteps` (with ``functools.partial``):
    skip when the squared global norm is not below ``max_squared_norm`` (NaN skips), optax's.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> skip, info = optim.skip_large_updates([torch.tensor(11.0)], 0, None, 100.0)
        >>> bool(skip), float(info["norm_squared"])
        (True, 121.0)
    """
    sq = _base.global_norm(updates).double() ** 2
    skip = ~(sq < max_squared_norm)
    return skip, {"should_skip": skip, "norm_squared": sq}


class MultiSteps:
    """Accumulates updates over mini-steps and runs ``opt`` every k of them (optax's
    ``MultiSteps``; the optimizer-side twin of ``fs.accumulate``).

    Each ``update`` adds the incoming updates to ``acc_grads`` (their running mean with
    ``use_grad_mean``, else their sum) and returns zeros, until the ``k``-th mini-step
    (``k = every_k_schedule(gradient_step)``), where ``opt`` runs on the accumulated grads,
    its updates are returned and the accumulator is reset. Unlike optax (which traces both
    branches under ``jit``), the inner update runs only on that k-th mini-step.
    ``should_skip_update_fn(updates, gradient_step, params) -> (skip, info)`` rejects a
    mini-step as if it never happened; the ranks agree on the decision
    (``optim.base.agree``), so under ``fs.zero`` all of them skip together.

    Args:
        opt: the wrapped optimizer.
        every_k_schedule: an int k >= 1, or a function ``gradient_step -> k``.
        use_grad_mean: average the mini-steps' updates (default), else sum them.
        should_skip_update_fn: e.g. :func:`skip_not_finite`.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> ms = optim.MultiSteps(optim.sgd(1.0), every_k_schedule=2)
        >>> p = {"w": torch.zeros(1)}
        >>> s = ms.init(p)
        >>> u, s = ms.update({"w": torch.tensor([1.0])}, s, p)
        >>> u["w"].item(), ms.has_updated(s)
        (0.0, False)
        >>> u, s = ms.update({"w": torch.tensor([3.0])}, s, p)
        >>> u["w"].item(), ms.has_updated(s)
        (-2.0, True)
    """

    def __init__(
        self,
        opt: GradientTransformation,
        every_k_schedule: int | Any,
        use_grad_mean: bool = True,
        should_skip_update_fn: Any = None,
    ) -> None:
        api = "optim.MultiSteps"
        if not isinstance(opt, GradientTransformation):
            raise TypeError(
                f"{api}: opt must be a GradientTransformation, got {type(opt).__name__}; "
                "pass an optimizer such as optim.adamw(1e-3)."
            )
        if callable(every_k_schedule):
            k_of = every_k_schedule
        else:
            k = _checks.integer(api, "every_k_schedule", every_k_schedule, lo=1)
            k_of = lambda step: k  # noqa: E731
        if should_skip_update_fn is not None and not callable(should_skip_update_fn):
            raise TypeError(
                f"{api}: should_skip_update_fn must be callable (updates, gradient_step, "
                f"params) -> (skip, info), got {should_skip_update_fn!r}."
            )
        self._opt, self._k_of, self._mean = opt, k_of, bool(use_grad_mean)
        self._skip = should_skip_update_fn
        self._api = api

        def update(updates: PyTree, state: MultiStepsState, params: PyTree = None):
            return self._update(updates, state, params)

        update.learning_rate = lambda state: _base.learning_rate(opt, state.inner_opt_state)
        update.elementwise = should_skip_update_fn is None and getattr(
            opt.update, "elementwise", True
        )
        self._update_fn = update

    @property
    def inner_opt(self) -> GradientTransformation:
        """The wrapped optimizer."""
        return self._opt

    def init(self, params: PyTree) -> MultiStepsState:
        """The initial state: zero counters, ``opt.init(params)`` and zero accumulators."""
        acc = _leaves.zeros_like_tree(params, f"{self._api}.init")
        skip_state: Any = ()
        if self._skip is not None:
            _, skip_state = self._skip(acc, 0, params)
        return MultiStepsState(0, 0, self._opt.init(params), acc, skip_state)

    def update(
        self, updates: PyTree, state: MultiStepsState, params: PyTree = None
    ) -> tuple[PyTree, MultiStepsState]:
        """Accumulates ``updates``; returns ``opt``'s updates every k-th mini-step, else
        zeros."""
        return self._update(updates, state, params)

    def has_updated(self, state: MultiStepsState) -> bool:
        """Whether the last ``update`` ran the inner optimizer."""
        return state.mini_step == 0 and state.gradient_step > 0

    def gradient_transformation(self) -> GradientTransformation:
        """This wrapper as a ``GradientTransformation(init, update)``."""
        return GradientTransformation(self.init, self._update_fn)

    @torch.no_grad()
    def _update(self, updates: PyTree, state: MultiStepsState, params: PyTree):
        api = self._api
        if not isinstance(state, MultiStepsState):
            raise TypeError(
                f"{api}: state must be the MultiStepsState returned by init, got "
                f"{type(state).__name__}. A state from another optimizer? Pass the state "
                "this optimizer's init(params) returned."
            )
        gl, gdef = _leaves.flatten(updates, api, "updates")
        al = _leaves.leaves_like(
            state.acc_grads, gdef, updates, ("updates", "state.acc_grads"), api, gl
        )
        k = _checks.integer(
            api, "every_k_schedule(gradient_step)", self._k_of(state.gradient_step), lo=1
        )
        skip_state = state.skip_state
        if self._skip is not None:
            skip, skip_state = self._skip(updates, state.gradient_step, params)
            if not _base.agree(~torch.as_tensor(skip, dtype=torch.bool), gl):
                zeros = optree.tree_unflatten(gdef, [torch.zeros_like(x) for x in gl])
                return zeros, state._replace(skip_state=skip_state)
        donate = _base.donating()
        n = int(state.mini_step)
        g_loc, dt = _leaves.local(gl)
        a_loc, _ = _leaves.local(al)
        new_a = list(a_loc)
        for idx in _leaves.groups(g_loc, a_loc):
            g, a = _leaves.pick(g_loc, idx), _leaves.pick(a_loc, idx)
            g = g if g[0].dtype == a[0].dtype else [x.to(a[0].dtype) for x in g]
            if self._mean:  # Welford: acc + (g - acc) / (n + 1)
                d = list(torch._foreach_sub(g, a))
                torch._foreach_div_(d, float(n + 1))
                _leaves.put(new_a, idx, _leaves.first("add", donate, a, d))
            else:
                _leaves.put(new_a, idx, _leaves.first("add", donate, a, g))
        if dt:
            new_a = _leaves.rewrap(new_a, al, a_loc)
        acc = optree.tree_unflatten(gdef, new_a)
        if n + 1 < k:
            if donate:  # the incoming updates are free: return them zeroed
                for idx in _leaves.groups(g_loc):
                    torch._foreach_zero_(_leaves.pick(g_loc, idx))
                zeros = updates
            else:
                zeros = optree.tree_unflatten(gdef, [torch.zeros_like(x) for x in gl])
            return zeros, MultiStepsState(
                n + 1, state.gradient_step, state.inner_opt_state, acc, skip_state
            )
        out, inner_state = self._opt.update(acc, state.inner_opt_state, params)
        fresh = optree.tree_unflatten(gdef, [torch.zeros_like(x) for x in new_a])
        return out, MultiStepsState(0, int(state.gradient_step) + 1, inner_state, fresh, skip_state)
