"""Moment-based transforms: ``scale_by_adam``, ``scale_by_lion`` and ``trace`` (momentum).

optax's formulas and defaults on torch tensors, one ``torch._foreach_*`` pass per (device,
dtype) group. Step counts are python ints (see ``optim._transforms``). Inside
``optim.donation()`` the moment buffers are updated in place and the outgoing updates reuse
the incoming updates' buffers where the formula allows (bitwise the same results as without
donation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from fsharding.optim import _checks, _leaves
from fsharding.optim.base import GradientTransformation, donating

__all__ = [
    "ScaleByAdamState",
    "ScaleByLionState",
    "TraceState",
    "scale_by_adam",
    "scale_by_lion",
    "trace",
]

PyTree = Any


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: ``count`` (python int, updates done so far) and the
    first and second moments ``mu``, ``nu`` (trees like params)."""

    count: int
    mu: PyTree
    nu: PyTree


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: ``count`` (python int) and the momentum ``mu``."""

    count: int
    mu: PyTree


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer ``trace`` (a tree like params)."""

    trace: PyTree


def adam_denominator(
    nu: list[torch.Tensor], bc2: float, eps: float, eps_root: float
) -> list[torch.Tensor]:
    """``sqrt(nu / bc2 + eps_root) + eps`` (one new buffer, the step's only temporary)."""
    d = list(torch._foreach_div(nu, bc2))
    if eps_root:
        torch._foreach_add_(d, eps_root)
    torch._foreach_sqrt_(d)
    if eps:
        torch._foreach_add_(d, eps)
    return d


def plain_group(g: list[torch.Tensor], *state: list[torch.Tensor]) -> bool:
    """Whether a group computes in its state's dtype: every state list has one dtype and the
    grads' dtype promotes to it (e.g. bf16 grads with fp32 moments: the cast is exact).
    Otherwise (``mu_dtype``/``accumulator_dtype`` narrower than the grads) the group
    computes in the promoted dtype and rounds once into each state's own dtype."""
    d = state[0][0].dtype
    if any(s[0].dtype != d for s in state[1:]):
        return False
    return torch.promote_types(g[0].dtype, d) == d


def _in(xs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``xs`` as new tensors in ``dtype`` (a copy even where the dtype already is that)."""
    return [x.to(dtype, copy=True) for x in xs]


def _store(new: list[torch.Tensor], old: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
    """``new`` rounded once into ``old``'s dtype: in place into ``old`` when donating."""
    if donate:
        torch._foreach_copy_(old, new)
        return old
    return [x.to(old[0].dtype) for x in new]


def adam_mixed(g, mu, nu, b1, b2, count, eps, eps_root, donate):
    """optax's ``scale_by_adam`` for a group whose dtypes differ (``mu_dtype``): the moments
    are computed in the promoted dtype from the stored ones, the direction
    ``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` uses the unrounded moments, then each
    moment is stored rounded to its own dtype. Returns (direction in the promoted dtype,
    new mu, new nu)."""
    ct = torch.promote_types(torch.promote_types(g[0].dtype, mu[0].dtype), nu[0].dtype)
    gc = g if g[0].dtype == ct else [x.to(ct) for x in g]
    mc = _in(mu, ct)
    torch._foreach_lerp_(mc, gc, 1.0 - b1)
    vc = _in(nu, ct)
    torch._foreach_mul_(vc, b2)
    torch._foreach_addcmul_(vc, gc, gc, 1.0 - b2)
    d = adam_denominator(vc, 1.0 - b2**count, eps, eps_root)
    torch._foreach_mul_(d, 1.0 - b1**count)
    u = list(torch._foreach_div(mc, d))
    return u, _store(mc, mu, donate), _store(vc, nu, donate)


def adam_moments(g, mu, nu, b1: float, b2: float, donate: bool):
    """optax's ``mu = b1 mu + (1 - b1) g`` (as torch, one ``lerp``) and
    ``nu = b2 nu + (1 - b2) g^2``; in place when donating, else into new tensors."""
    if g[0].dtype != mu[0].dtype:
        g = [x.to(mu[0].dtype) for x in g]
    mu = _leaves.first("lerp", donate, mu, g, 1.0 - b1)
    nu = _leaves.first("mul", donate, nu, b2)
    torch._foreach_addcmul_(nu, g, g, 1.0 - b2)
    return g, mu, nu


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: torch.dtype | str | None = None,
) -> GradientTransformation:
    """Adam's rescaling: ``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` with bias-corrected
    moments ``mu_hat = mu / (1 - b1^t)``, ``nu_hat = nu / (1 - b2^t)`` (optax formulas).

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to the denominator outside the square root, >= 0.
        eps_root: added inside the square root, >= 0.
        mu_dtype: the dtype ``mu`` is stored in (optax's semantics: e.g. ``torch.bfloat16``
            halves its memory; ``nu`` keeps the params' dtype). The moments are computed in
            the promoted dtype, the update uses the unrounded ``mu``, then ``mu`` is stored
            rounded; the updates come out in the promoted dtype. None: the params' dtype.

    Returns:
        A transform with state :class:`ScaleByAdamState`. (optax's ``nesterov`` option is
        not provided.)

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.scale_by_adam()
        >>> u, s = tx.update({"w": torch.tensor([0.5])}, tx.init({"w": torch.zeros(1)}))
        >>> round(u["w"].item(), 6), s.count
        (1.0, 1)
    """
    api = "optim.scale_by_adam"
    _checks.betas(api, b1=b1, b2=b2)
    _checks.non_negative(api, eps=eps, eps_root=eps_root)
    mu_dtype = _checks.dtype_arg(api, "mu_dtype", mu_dtype)
    b1, b2, eps, eps_root = float(b1), float(b2), float(eps), float(eps_root)

    def init(params: PyTree) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=0,
            mu=_leaves.zeros_like_tree(params, f"{api}.init", mu_dtype),
            nu=_leaves.zeros_like_tree(params, f"{api}.init"),
        )

    @torch.no_grad()
    def update(updates: PyTree, state: ScaleByAdamState, params: PyTree = None):
        gl, gdef = _leaves.flatten(updates, api, "updates")
        ml = _leaves.leaves_like(state.mu, gdef, updates, ("updates", "state.mu"), api, gl)
        nl = _leaves.leaves_like(state.nu, gdef, updates, ("updates", "state.nu"), api, gl)
        g_loc, dt = _leaves.local(gl)
        m_loc, _ = _leaves.local(ml)
        n_loc, _ = _leaves.local(nl)
        if dt:
            _leaves.check_local(api, g_loc, (m_loc, n_loc), updates, ("state.mu", "state.nu"))
        donate = donating()
        count = int(state.count) + 1
        bc1, bc2 = 1.0 - b1**count, 1.0 - b2**count
        out, new_m, new_n = list(g_loc), list(m_loc), list(n_loc)
        for idx in _leaves.groups(g_loc, m_loc, n_loc):
            g, m, v = _leaves.pick(g_loc, idx), _leaves.pick(m_loc, idx), _leaves.pick(n_loc, idx)
            if not plain_group(g, m, v):
                u, m, v = adam_mixed(g, m, v, b1, b2, count, eps, eps_root, donate)
                _leaves.put(out, idx, u)
                _leaves.put(new_m, idx, m)
                _leaves.put(new_n, idx, v)
                continue
            g, m, v = adam_moments(g, m, v, b1, b2, donate)
            d = adam_denominator(v, bc2, eps, eps_root)
            torch._foreach_mul_(d, bc1)  # mu_hat / d == mu / (bc1 * d)
            if donate:
                torch._foreach_copy_(g, m)
                torch._foreach_div_(g, d)
                u = g
            else:
                u = list(torch._foreach_div(m, d))
            _leaves.put(out, idx, u)
            _leaves.put(new_m, idx, m)
            _leaves.put(new_n, idx, v)
        if dt:
            out, new_m, new_n = (
                _leaves.rewrap(out, gl, g_loc),
                _leaves.rewrap(new_m, ml, m_loc),
                _leaves.rewrap(new_n, nl, n_loc),
            )
        unflat = lambda x: optree.tree_unflatten(gdef, x)  # noqa: E731
        return unflat(out), ScaleByAdamState(count, unflat(new_m), unflat(new_n))

    return GradientTransformation(init, update)


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's update direction: ``sign(b1 mu + (1 - b1) g)``, then
    ``mu = b2 mu + (1 - b2) g`` (Chen et al. 2023, optax formulas).

    Args:
        b1: interpolation between momentum and gradient for the direction, in [0, 1).
        b2: decay of the momentum, in [0, 1).

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.scale_by_lion()
        >>> tx.update({"w": torch.tensor([-3.0, 2.0])}, tx.init({"w": torch.zeros(2)}))[0]
        {'w': tensor([-1.,  1.])}
    """
    api = "optim.scale_by_lion"
    _checks.betas(api, b1=b1, b2=b2)
    b1, b2 = float(b1), float(b2)

    def init(params: PyTree) -> ScaleByLionState:
        return ScaleByLionState(count=0, mu=_leaves.zeros_like_tree(params, f"{api}.init"))

    @torch.no_grad()
    def update(updates: PyTree, state: ScaleByLionState, params: PyTree = None):
        gl, gdef = _leaves.flatten(updates, api, "updates")
        ml = _leaves.leaves_like(state.mu, gdef, updates, ("updates", "state.mu"), api, gl)
        g_loc, dt = _leaves.local(gl)
        m_loc, _ = _leaves.local(ml)
        if dt:
            _leaves.check_local(api, g_loc, (m_loc,), updates, ("state.mu",))
        donate = donating()
        out, new_m = list(g_loc), list(m_loc)
        for idx in _leaves.groups(g_loc, m_loc):
            g, m = _leaves.pick(g_loc, idx), _leaves.pick(m_loc, idx)
            if g[0].dtype != m[0].dtype:
                g = [x.to(m[0].dtype) for x in g]
            c = list(torch._foreach_lerp(m, g, 1.0 - b1))
            m = _leaves.first("lerp", donate, m, g, 1.0 - b2)
            torch._foreach_sign_(c)
            _leaves.put(out, idx, c)
            _leaves.put(new_m, idx, m)
        if dt:
            out, new_m = _leaves.rewrap(out, gl, g_loc), _leaves.rewrap(new_m, ml, m_loc)
        unflat = lambda x: optree.tree_unflatten(gdef, x)  # noqa: E731
        return unflat(out), ScaleByLionState(int(state.count) + 1, unflat(new_m))

    return GradientTransformation(init, update)


def trace(
    decay: float, nesterov: bool = False, accumulator_dtype: torch.dtype | str | None = None
) -> GradientTransformation:
    """Momentum: ``trace = g + decay * trace``; the update is ``trace``, or with Nesterov
    ``g + decay * trace`` (optax formulas; equal to ``torch.optim.SGD``'s momentum buffer
    with ``dampening=0``).

    Args:
        decay: the momentum coefficient, >= 0.
        nesterov: use Nesterov momentum.
        accumulator_dtype: the dtype the trace is stored in (optax's semantics: computed in
            the promoted dtype, the update uses the unrounded trace, then it is stored
            rounded). None: the params' dtype.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.trace(0.5)
        >>> s = tx.init({"w": torch.zeros(1)})
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u, s = tx.update({"w": torch.ones(1)}, s)
        >>> u["w"].tolist()
        [1.5]
    """
    api = "optim.trace"
    _checks.non_negative(api, decay=decay)
    acc_dtype = _checks.dtype_arg(api, "accumulator_dtype", accumulator_dtype)
    decay = float(decay)

    def init(params: PyTree) -> TraceState:
        return TraceState(trace=_leaves.zeros_like_tree(params, f"{api}.init", acc_dtype))

    @torch.no_grad()
    def update(updates: PyTree, state: TraceState, params: PyTree = None):
        gl, gdef = _leaves.flatten(updates, api, "updates")
        tl = _leaves.leaves_like(state.trace, gdef, updates, ("updates", "state.trace"), api, gl)
        g_loc, dt = _leaves.local(gl)
        t_loc, _ = _leaves.local(tl)
        if dt:
            _leaves.check_local(api, g_loc, (t_loc,), updates, ("state.trace",))
        donate = donating()
        out, new_t = list(g_loc), list(t_loc)
        for idx in _leaves.groups(g_loc, t_loc):
            g, t = _leaves.pick(g_loc, idx), _leaves.pick(t_loc, idx)
            if not plain_group(g, t):  # the trace narrower than the grads: optax's rule
                ct = torch.promote_types(g[0].dtype, t[0].dtype)
                gc = g if g[0].dtype == ct else [x.to(ct) for x in g]
                tc = _in(t, ct)
                torch._foreach_mul_(tc, decay)
                torch._foreach_add_(tc, gc)
                u = list(torch._foreach_add(gc, tc, alpha=decay)) if nesterov else tc
                _leaves.put(out, idx, u)
                _leaves.put(new_t, idx, _store(tc, t, donate))
                continue
            if g[0].dtype != t[0].dtype:
                g = [x.to(t[0].dtype) for x in g]
            t = _leaves.first("mul", donate, t, decay)
            torch._foreach_add_(t, g)
            if nesterov:
                u = _leaves.first("add", donate, g, t, alpha=decay)
            elif donate:  # the outgoing updates must not alias the (donated) state
                torch._foreach_copy_(g, t)
                u = g
            else:
                u = t
            _leaves.put(out, idx, u)
            _leaves.put(new_t, idx, t)
        if dt:
            out, new_t = _leaves.rewrap(out, gl, g_loc), _leaves.rewrap(new_t, tl, t_loc)
        unflat = lambda x: optree.tree_unflatten(gdef, x)  # noqa: E731
        return unflat(out), TraceState(unflat(new_t))

    return GradientTransformation(init, update)
