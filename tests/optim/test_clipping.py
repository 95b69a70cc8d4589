"""clip and clip_by_global_norm against optax's formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_trees import leaves, make_tree, tree_specs

from fsharding import optim


@given(spec=tree_specs, seed=st.integers(0, 2**16), max_delta=st.sampled_from([0.0, 0.3, 2.0]))
def test_clip_formula(spec, seed, max_delta):
    u = make_tree(spec, seed)
    out, state = optim.clip(max_delta).update(u, optim.EmptyState())
    for a, b in zip(leaves(out), leaves(u)):
        assert torch.equal(a, b.clamp(-max_delta, max_delta))
    assert state == optim.EmptyState()


@given(spec=tree_specs, seed=st.integers(0, 2**16), max_norm=st.sampled_from([0.1, 1.0, 50.0]))
def test_clip_by_global_norm_formula(spec, seed, max_norm):
    u = make_tree(spec, seed)
    norm = torch.sqrt(sum((x**2).sum() for x in leaves(u)))
    out, _ = optim.clip_by_global_norm(max_norm).update(u, optim.EmptyState())
    for a, b in zip(leaves(out), leaves(u)):
        if norm < max_norm:
            assert torch.equal(a, b)  # untouched, bitwise
        else:
            torch.testing.assert_close(a, (b / norm) * max_norm, rtol=1e-14, atol=0)
    new_norm = torch.sqrt(sum((x**2).sum() for x in leaves(out)))
    assert new_norm <= max_norm * (1 + 1e-12) or norm < max_norm


def test_clip_by_global_norm_clips_raw_grads_before_adam_in_a_chain():
    p = {"w": torch.zeros(2, dtype=torch.float64)}
    g = {"w": torch.tensor([30.0, 40.0], dtype=torch.float64)}
    tx = optim.chain(optim.clip_by_global_norm(5.0), optim.sgd(1.0))
    u, _ = tx.update(g, tx.init(p), p)
    torch.testing.assert_close(u["w"], torch.tensor([-3.0, -4.0], dtype=torch.float64))


def test_clip_by_global_norm_bf16_and_mixed_dtypes():
    u = {"a": torch.full((4,), 3.0, dtype=torch.bfloat16), "b": torch.full((4,), 4.0)}
    out, _ = optim.clip_by_global_norm(1.0).update(u, optim.EmptyState())
    assert out["a"].dtype == torch.bfloat16 and out["b"].dtype == torch.float32
    total = torch.sqrt(out["a"].float().square().sum() + out["b"].square().sum())
    assert abs(total.item() - 1.0) < 1e-2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: optim.clip(-1.0), r"optim\.clip: max_delta must be in \[0, inf\), got -1\.0"),
        (lambda: optim.clip_by_global_norm("1"), r"optim\.clip_by_global_norm: max_norm must"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
