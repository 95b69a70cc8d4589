"""Moment transforms (scale_by_adam, scale_by_lion, trace) against float64 references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_trees import grads_for, leaves, make_tree, tree_specs

from fsharding import optim


def _run(tx, params, grads):
    state = tx.init(params)
    outs = []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs, state


@given(spec=tree_specs, seed=st.integers(0, 2**16), b1=st.sampled_from([0.0, 0.5, 0.9]))
def test_scale_by_adam_formula(spec, seed, b1):
    b2, eps, eps_root = 0.99, 1e-6, 1e-9
    params = make_tree(spec, seed)
    grads = grads_for(spec, 4, seed)
    outs, state = _run(optim.scale_by_adam(b1, b2, eps, eps_root), params, grads)
    mu = [torch.zeros_like(p) for p in leaves(params)]
    nu = [torch.zeros_like(p) for p in leaves(params)]
    for t, (g, u) in enumerate(zip(grads, outs), start=1):
        for i, (gi, ui) in enumerate(zip(leaves(g), leaves(u))):
            mu[i] = (1 - b1) * gi + b1 * mu[i]
            nu[i] = (1 - b2) * gi**2 + b2 * nu[i]
            ref = (mu[i] / (1 - b1**t)) / ((nu[i] / (1 - b2**t) + eps_root).sqrt() + eps)
            torch.testing.assert_close(ui, ref, rtol=1e-12, atol=1e-14)
    assert state.count == 4
    for a, b in zip(leaves(state.nu), nu):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_scale_by_lion_formula():
    g, m = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    tx = optim.scale_by_lion(b1=0.8, b2=0.95)
    u, s = tx.update({"w": g}, optim.ScaleByLionState(3, {"w": m}))
    assert torch.equal(u["w"], torch.sign(0.8 * m + 0.2 * g))
    torch.testing.assert_close(s.mu["w"], 0.95 * m + 0.05 * g, rtol=1e-14, atol=0)
    assert s.count == 4


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_formula(nesterov):
    g = [torch.randn(6, dtype=torch.float64) for _ in range(3)]
    outs, state = _run(optim.trace(0.7, nesterov=nesterov), {"w": g[0]}, [{"w": x} for x in g])
    t = torch.zeros(6, dtype=torch.float64)
    for x, u in zip(g, outs):
        t = x + 0.7 * t
        torch.testing.assert_close(u["w"], x + 0.7 * t if nesterov else t, rtol=1e-14, atol=0)
    torch.testing.assert_close(state.trace["w"], t, rtol=1e-14, atol=0)


def test_donated_bf16_momentum_equals_non_donated():
    """In-place foreach ops must round like the out-of-place ones (scalar not pre-rounded)."""
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(257, generator=g).to(torch.bfloat16)}
    grads = [{"w": torch.randn(257, generator=g).to(torch.bfloat16)} for _ in range(4)]
    tx = optim.sgd(0.1, momentum=0.9)
    s_plain, s_don = tx.init(p), tx.init(p)
    for gr in grads:
        u1, s_plain = tx.update(gr, s_plain, p)
        with optim.donation():
            u2, s_don = tx.update({"w": gr["w"].clone()}, s_don, p)
        assert torch.equal(u1["w"], u2["w"])
