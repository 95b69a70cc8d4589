"""The scaling and weight-decay transforms, optax's building blocks on torch tensors:
``scale``, ``scale_by_schedule``, ``scale_by_learning_rate``, ``add_decayed_weights`` and
``scale_by_trust_ratio`` (LAMB's), with their states. (The moment-based transforms live in
``_moments``, clipping in ``_clipping``.)

Each function returns a ``GradientTransformation(init, update)``; its state is its own
NamedTuple named as in optax. Formulas and defaults are optax's. Step counts are **python
ints** (not tensors): schedules and bias corrections are then computed on the host with no
device sync, a state round-trips through ``torch.optim`` state dicts (whose ``"step"`` is a
float tensor) exactly, and ``fs.save`` stores them as plain integers.

Every ``update`` runs under ``torch.no_grad``, groups leaves by (device, dtype) and runs
``torch._foreach_*`` ops, returns tensors that do not require grad and never writes into its
inputs — except inside ``optim.donation()``, where it updates its state tensors in place and
may reuse the incoming updates' buffers for the outgoing updates (bitwise the same results).
DTensor leaves are computed on their local shards and keep their layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from fsharding.optim import _checks, _leaves
from fsharding.optim.base import (
    EmptyState,
    GradientTransformation,
    donating,
    in_sharded_norm,
    sharded_leaf_norms,
)

__all__ = [
    "ScaleByScheduleState",
    "ScaleByTrustRatioState",
    "add_decayed_weights",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_trust_ratio",
]

PyTree = Any
Schedule = Callable[[int], float]


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: ``count`` (python int), the step the schedule is
    evaluated at by the next update."""

    count: int


class ScaleByTrustRatioState(NamedTuple):
    """State of :func:`scale_by_trust_ratio` (stateless)."""


# --------------------------------------------------------------------------------------
# scaling
# --------------------------------------------------------------------------------------


def scale(step_size: float) -> GradientTransformation:
    """Multiplies updates by a constant ``step_size``.

    Args:
        step_size: the factor (e.g. ``-lr`` for gradient descent).

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.scale(-0.5)
        >>> tx.update({"w": torch.tensor([2.0])}, tx.init({}))[0]["w"].tolist()
        [-1.0]
    """
    api = "optim.scale"
    step = _checks.number(api, "step_size", step_size)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    @torch.no_grad()
    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        scaled = _leaves.map_updates(updates, api, lambda g, d: _leaves.first("mul", d, g, step))
        return scaled, state

    return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``; the first update uses
    ``step_size_fn(0)`` and each update adds one to ``count``.

    Args:
        step_size_fn: a schedule, ``int -> float`` (a 0-dim tensor result also works).

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.scale_by_schedule(lambda step: 2.0 ** -step)
        >>> s = tx.init({})
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u["w"].tolist(), s.count
        ([0.5], 2)
    """
    api = "optim.scale_by_schedule"
    if not callable(step_size_fn):
        raise TypeError(
            f"{api}: step_size_fn must be callable (step -> float), got {step_size_fn!r}. "
            "Pass a schedule such as optim.linear_schedule(0.0, 1.0, 100)."
        )
    _checks.schedule(api, "step_size_fn", step_size_fn)

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=0)

    @torch.no_grad()
    def update(updates: PyTree, state: ScaleByScheduleState, params: PyTree = None):
        count = int(state.count)
        step = step_size_fn(count)
        if not isinstance(step, torch.Tensor):
            step = float(step)

        def fn(g: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
            s = step.to(g[0].device) if isinstance(step, torch.Tensor) else step
            return _leaves.first("mul", donate, g, s)

        return _leaves.map_updates(updates, api, fn), ScaleByScheduleState(count=count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: float | Schedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Scales updates by ``-learning_rate`` (or ``+`` with ``flip_sign=False``).

    A float gives :func:`scale`; a schedule gives :func:`scale_by_schedule` (state
    ``ScaleByScheduleState``, first update uses ``schedule(0)``). The update function carries
    ``update.learning_rate(state) -> float``, the rate the next update uses, which
    ``optim.learning_rate(tx, state)`` reports.

    Args:
        learning_rate: a float >= 0 or a schedule ``int -> float``.
        flip_sign: multiply by ``-1`` (descent), as optax.

    Raises:
        ValueError: a negative learning rate.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.scale_by_learning_rate(0.1)
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]["w"].tolist()
        [-0.10000000149011612]
    """
    api = "optim.scale_by_learning_rate"
    lr = _checks.learning_rate(api, learning_rate)
    m = -1.0 if flip_sign else 1.0
    if callable(lr):
        tx = scale_by_schedule(lambda count: m * lr(count))
        tx.update.learning_rate = lambda state: float(lr(int(state.count)))
    else:
        tx = scale(m * lr)
        tx.update.learning_rate = lambda state: lr
    return tx


# --------------------------------------------------------------------------------------
# params-dependent
# --------------------------------------------------------------------------------------


def add_decayed_weights(weight_decay: float = 0.0, mask: Any = None) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (decoupled weight decay when placed
    before the learning-rate scaling, as in ``adamw``).

    Args:
        weight_decay: the coefficient, >= 0.
        mask: which leaves decay: a pytree of bools with the structure of params (or a
            prefix of it), or a callable ``params -> such a tree``. Leaves where it is False
            pass through untouched (e.g. no decay on biases and norms:
            ``mask=lambda p: {k: v.ndim > 1 for k, v in p.items()}``). Under ``fs.zero`` a
            callable mask sees the rank's local shards (same ``ndim`` and dtype, fewer
            rows): make it depend on keys, ``ndim`` or dtype, not on sizes.

    Raises:
        ValueError: ``update`` called without params.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.add_decayed_weights(0.1, mask={"w": True, "b": False})
        >>> p = {"w": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"w": torch.zeros(1), "b": torch.zeros(1)}, tx.init(p), p)
        >>> round(u["w"].item(), 6), u["b"].item()
        (0.1, 0.0)
    """
    api = "optim.add_decayed_weights"
    _checks.non_negative(api, weight_decay=weight_decay)
    _checks.check_mask(api, mask)
    wd = float(weight_decay)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    @torch.no_grad()
    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        if params is None:
            raise _leaves.no_params_error(api)
        gl, gdef = _leaves.flatten(updates, api, "updates")
        pl = _leaves.leaves_like(params, gdef, updates, ("updates", "params"), api, gl)
        keep = [True] * len(gl) if mask is None else _checks.mask_leaves(api, mask, params)
        if wd == 0.0:  # u + 0 * p == u: skip the pass
            return optree.tree_unflatten(gdef, _leaves.detach_all(gl)), state
        g_loc, dt = _leaves.local(gl)
        p_loc, _ = _leaves.local(pl)
        if dt:
            _leaves.check_local(api, g_loc, (p_loc,), updates, ("params",))
        donate = donating()
        out = _leaves.detach_all(g_loc)
        sel = [i for i, k in enumerate(keep) if k]
        for sub in _leaves.groups(_leaves.pick(g_loc, sel), _leaves.pick(p_loc, sel)):
            idx = _leaves.pick(sel, sub)
            _leaves.put(
                out,
                idx,
                _leaves.first(
                    "add", donate, _leaves.pick(g_loc, idx), _leaves.pick(p_loc, idx), alpha=wd
                ),
            )
        if dt:
            out = _leaves.rewrap(out, gl, g_loc)
        return optree.tree_unflatten(gdef, out), state

    return GradientTransformation(init, update)


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    """Scales each leaf's update by ``trust_coefficient * |p| / (|u| + eps)`` (LAMB/LARS;
    norms floored at ``min_norm``; ratio 1 where either norm is 0), optax's formula.

    Args:
        min_norm: floor for both norms, >= 0.
        trust_coefficient: multiplier of the ratio.
        eps: added to the update norm, >= 0.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.scale_by_trust_ratio()
        >>> p = {"w": torch.tensor([3.0, 4.0])}
        >>> tx.update({"w": torch.tensor([0.0, 1.0])}, tx.init(p), p)[0]["w"].tolist()
        [0.0, 5.0]
    """
    api = "optim.scale_by_trust_ratio"
    _checks.non_negative(api, min_norm=min_norm, eps=eps)
    coeff = _checks.number(api, "trust_coefficient", trust_coefficient)
    min_norm, eps = float(min_norm), float(eps)

    def init(params: PyTree) -> ScaleByTrustRatioState:
        return ScaleByTrustRatioState()

    def norms(
        full: list[torch.Tensor], loc: list[torch.Tensor], dt: bool, idx: list[int]
    ) -> torch.Tensor:
        if dt:  # per-leaf norms of sharded leaves need the whole leaf
            ns = [torch.linalg.vector_norm(x) for x in full]
            ns = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in ns]
            return torch.stack(list(ns)).clamp_min(min_norm)
        ns = torch.stack(list(torch._foreach_norm(loc, 2)))
        reduce = sharded_leaf_norms()
        if reduce is None and in_sharded_norm():
            raise ValueError(
                f"{api}: inside optim.base.sharded_norm(reduce) with no reduce_leaves: the "
                "leaves are local shards and their per-leaf norms would be silently wrong. "
                "Pass sharded_norm(reduce, reduce_leaves, ...) (fs.zero does)."
            )
        if reduce is not None:  # local shards (fs.zero): sum the squares over the ranks
            ns = reduce(idx, ns.double().square()).sqrt().to(ns.dtype)
        return ns.clamp_min(min_norm)

    @torch.no_grad()
    def update(updates: PyTree, state: ScaleByTrustRatioState, params: PyTree = None):
        if params is None:
            raise _leaves.no_params_error(api)
        gl, gdef = _leaves.flatten(updates, api, "updates")
        pl = _leaves.leaves_like(params, gdef, updates, ("updates", "params"), api, gl)
        g_loc, dt = _leaves.local(gl)
        p_loc, _ = _leaves.local(pl)
        if dt:
            _leaves.check_local(api, g_loc, (p_loc,), updates, ("params",))
        donate = donating()
        out = list(g_loc)
        for idx in _leaves.groups(g_loc, p_loc):
            g = _leaves.pick(g_loc, idx)
            pn = norms(_leaves.pick(pl, idx), _leaves.pick(p_loc, idx), dt, idx).to(g[0].dtype)
            un = norms(_leaves.pick(gl, idx), g, dt, idx)
            ratio = coeff * pn / (un + eps)
            ratio = torch.where((pn == 0) | (un == 0), torch.ones_like(ratio), ratio)
            _leaves.put(out, idx, _leaves.first("mul", donate, g, list(ratio.unbind())))
        if dt:
            out = _leaves.rewrap(out, gl, g_loc)
        return optree.tree_unflatten(gdef, out), state

    update.elementwise = False  # per-leaf norms need whole leaves
    return GradientTransformation(init, update)
