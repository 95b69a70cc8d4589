"""The fused update of ``adam`` / ``adamw``: the chain ``scale_by_adam →
[add_decayed_weights] → scale_by_learning_rate`` computed in one pass per group.

Per (device, dtype, decays) group the updates start as ``u = -lr * wd * p`` (decayed leaves)
or ``u = 0``, then torch's own fused Adam kernel (``torch._fused_adam_``, the kernel behind
``torch.optim.Adam(fused=True)``, on CPU and CUDA) is run with ``u`` in the place of the
params and no weight decay: it updates ``mu`` and ``nu`` and subtracts
``lr / (1 - b1^t) * mu / (sqrt(nu) / sqrt(1 - b2^t) + eps)`` from ``u``, in one read of
``g, mu, nu, u`` and one write of ``mu, nu, u``. The result is optax's adamw update
``-lr * (mu_hat / (sqrt(nu_hat) + eps) + wd * p)`` up to rounding. Memory traffic is about 12
params-sizes per step with ``apply_updates_`` (torch ``AdamW(foreach=True)``: about 20), and
the one new buffer is ``u`` (torch's foreach step allocates a ``sqrt(nu)`` of the same size).

Groups whose moments are narrower than the grads (``mu_dtype``) compute in the promoted
dtype and store each moment rounded to its dtype (``_moments.adam_mixed``, optax's rule).
Other groups the kernel does not take (``eps_root != 0``, other devices, non-contiguous or
mixed-dtype leaves) run the same formula with ``torch._foreach_*`` ops, writing ``u`` into
the donated incoming updates (one temporary, ``sqrt(nu_hat) + eps``). Donated: ``mu`` and
``nu`` are updated in place; otherwise they are copied first (``* 1.0``, exact), so both
modes run the same arithmetic and agree bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from fsharding.optim import _checks, _leaves
from fsharding.optim import _moments as _m
from fsharding.optim import _transforms as _t
from fsharding.optim.base import GradientTransformation, check_chain_state, donating

PyTree = Any
_KERNEL_DEVICES = ("cpu", "cuda")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernel_ok(key: tuple, tensors: list[torch.Tensor], eps_root: float) -> bool:
    """Whether torch's fused kernel takes a group: ``key`` is (device, g, mu, nu dtypes,
    ...); ``u`` has the moments' dtype by construction."""
    device, g_dtype, m_dtype, v_dtype = key[:4]
    if eps_root or not hasattr(torch, "_fused_adam_") or device.type not in _KERNEL_DEVICES:
        return False
    if not g_dtype == m_dtype == v_dtype or m_dtype not in _KERNEL_DTYPES:
        return False
    return all(map(torch.Tensor.is_contiguous, tensors))


def _init_updates(g, p, scale: float, into_g: bool) -> list[torch.Tensor]:
    """``u = scale * p`` (decayed leaves) or ``u = g * 0.0`` (one foreach op; a non-finite
    ``g`` gives a non-finite update anyway); written into ``g`` when ``into_g``."""
    if into_g:
        if p is not None:
            torch._foreach_copy_(g, p)
        torch._foreach_mul_(g, scale if p is not None else 0.0)
        return g
    return list(torch._foreach_mul(p, scale) if p is not None else torch._foreach_mul(g, 0.0))


def _kernel(g, m, v, p, count, rate, wd, b1, b2, eps, donate):
    u = _init_updates(g, p, -rate * wd, into_g=False)
    if not donate:  # new moment buffers; x * 1.0 is exact (also for -0, inf and nan)
        m = list(torch._foreach_mul(m, 1.0))
        v = list(torch._foreach_mul(v, 1.0))
    steps = torch.full((len(u),), float(count), dtype=torch.float32, device=u[0].device)
    torch._fused_adam_(
        u, g, m, v, [], list(steps.unbind()),
        lr=rate, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
    )  # fmt: skip
    return u, m, v


def _foreach(g, m, v, p, count, rate, wd, b1, b2, eps, eps_root, donate):
    g, m, v = _m.adam_moments(g, m, v, b1, b2, donate)
    d = _m.adam_denominator(v, 1.0 - b2**count, eps, eps_root)
    u = _init_updates(g, p, -rate * wd, into_g=donate)  # g is free once the moments are in
    torch._foreach_addcdiv_(u, m, d, -rate / (1.0 - b1**count))
    return u, m, v


def fused_adam(
    tx: GradientTransformation,
    lr: float | Callable[[int], float],
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    weight_decay: float,
    mask: Any,
    api: str,
) -> GradientTransformation:
    """``tx`` (the unfused chain, whose init and state it keeps) with a fused update."""
    b1, b2, eps, eps_root, wd = map(float, (b1, b2, eps, eps_root, weight_decay))
    parts = tx.update.parts  # type: ignore[attr-defined]
    lr_of = lr if callable(lr) else (lambda count: lr)

    @torch.no_grad()
    def update(updates: PyTree, state: tuple, params: PyTree = None):
        check_chain_state(tx.update, state, len(parts))
        adam_state, lr_state = state[0], state[-1]
        gl, gdef = _leaves.flatten(updates, api, "updates")
        ml = _leaves.leaves_like(adam_state.mu, gdef, updates, ("updates", "state.mu"), api, gl)
        nl = _leaves.leaves_like(adam_state.nu, gdef, updates, ("updates", "state.nu"), api, gl)
        decays = [False] * len(gl)
        pl: list = gl
        if wd != 0.0:
            if params is None:
                raise _leaves.no_params_error(api)
            pl = _leaves.leaves_like(params, gdef, updates, ("updates", "params"), api, gl)
            decays = (
                [True] * len(gl) if mask is None else _checks.mask_leaves(api, mask, params, gdef)
            )
        g_loc, dt = _leaves.local(gl)
        m_loc, _ = _leaves.local(ml)
        n_loc, _ = _leaves.local(nl)
        p_loc = _leaves.local(pl)[0] if dt else pl
        if dt:
            others = (m_loc, n_loc, p_loc) if wd != 0.0 else (m_loc, n_loc)
            _leaves.check_local(api, g_loc, others, updates, ("state.mu", "state.nu", "params"))
        donate = donating()
        count = int(adam_state.count) + 1
        sched = isinstance(lr_state, _t.ScaleByScheduleState)
        rate = float(lr_of(int(lr_state.count) if sched else 0))
        buckets: dict[tuple, list[int]] = {}
        for i, (g, m, v, p) in enumerate(zip(g_loc, m_loc, n_loc, p_loc)):
            key = (g.device, g.dtype, m.dtype, v.dtype, p.dtype, decays[i])
            buckets.setdefault(key, []).append(i)
        out, new_m, new_n = list(g_loc), list(m_loc), list(n_loc)
        for key, idx in buckets.items():
            g, m, v = _leaves.pick(g_loc, idx), _leaves.pick(m_loc, idx), _leaves.pick(n_loc, idx)
            p = _leaves.pick(p_loc, idx) if key[-1] else None
            if not _m.plain_group(g, m, v):  # mu_dtype: the chain's formula, optax's rule
                u, m, v = _m.adam_mixed(g, m, v, b1, b2, count, eps, eps_root, donate)
                if p is not None:
                    torch._foreach_add_(u, [x.to(u[0].dtype) for x in p], alpha=wd)
                torch._foreach_mul_(u, -rate)
                _leaves.put(out, idx, u)
                _leaves.put(new_m, idx, m)
                _leaves.put(new_n, idx, v)
                continue
            if g[0].dtype != m[0].dtype:
                g = [x.to(m[0].dtype) for x in g]
            if p is not None and p[0].dtype != m[0].dtype:
                p = [x.to(m[0].dtype) for x in p]
            if _kernel_ok(key, [*g, *m, *v, *(p or ())], eps_root):
                u, m, v = _kernel(g, m, v, p, count, rate, wd, b1, b2, eps, donate)
            else:
                u, m, v = _foreach(g, m, v, p, count, rate, wd, b1, b2, eps, eps_root, donate)
            _leaves.put(out, idx, u)
            _leaves.put(new_m, idx, m)
            _leaves.put(new_n, idx, v)
        if dt:
            out = _leaves.rewrap(out, gl, g_loc)
            new_m = _leaves.rewrap(new_m, ml, m_loc)
            new_n = _leaves.rewrap(new_n, nl, n_loc)
        unflat = lambda x: optree.tree_unflatten(gdef, x)  # noqa: E731
        new_adam = _m.ScaleByAdamState(count, unflat(new_m), unflat(new_n))
        if sched:
            lr_state = _t.ScaleByScheduleState(int(lr_state.count) + 1)
        return unflat(out), (new_adam, *state[1:-1], lr_state)

    update.parts = parts  # type: ignore[attr-defined]
    update.unfused = tx.update  # type: ignore[attr-defined]
    return GradientTransformation(tx.init, update)
