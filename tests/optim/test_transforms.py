"""Transforms: formulas against float64 references, the donation contract, errors."""

from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_trees import bitwise_equal, grads_for, leaves, make_tree, snapshot

from fsharding import optim


def _run(tx, params, grads):
    state = tx.init(params)
    outs = []
    for g in grads:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs, state


# --------------------------------------------------------------------------------------
# formulas (float64 references written from optax's definitions)
# --------------------------------------------------------------------------------------


def test_scale_and_learning_rate_signs():
    g = {"w": torch.tensor([2.0, -4.0])}
    assert optim.scale(0.5).update(g, optim.EmptyState())[0]["w"].tolist() == [1.0, -2.0]
    tx = optim.scale_by_learning_rate(0.5)
    assert tx.update(g, tx.init({}))[0]["w"].tolist() == [-1.0, 2.0]
    tx = optim.scale_by_learning_rate(0.5, flip_sign=False)
    assert tx.update(g, tx.init({}))[0]["w"].tolist() == [1.0, -2.0]


def test_scale_by_learning_rate_schedule_first_update_uses_step_0():
    sched = lambda step: 0.1 * (step + 1)  # noqa: E731
    tx = optim.scale_by_learning_rate(sched)
    state = tx.init({})
    assert optim.learning_rate(tx, state) == pytest.approx(0.1)
    for step in range(3):
        u, state = tx.update({"w": torch.ones(1, dtype=torch.float64)}, state)
        assert u["w"].item() == pytest.approx(-0.1 * (step + 1))
        assert optim.learning_rate(tx, state) == pytest.approx(0.1 * (step + 2))
    assert state == optim.ScaleByScheduleState(count=3)


def test_scale_by_schedule_tensor_step():
    tx = optim.scale_by_schedule(lambda step: torch.tensor(3.0))
    assert tx.update({"w": torch.ones(2)}, tx.init({}))[0]["w"].tolist() == [3.0, 3.0]


def test_add_decayed_weights_mask_forms():
    p = {"w": torch.ones(2, 2), "b": torch.ones(2), "ln": {"g": torch.ones(2)}}
    g = optree.tree_map(torch.zeros_like, p)
    masks = [
        {"w": True, "b": False, "ln": {"g": False}},  # full tree
        {"w": True, "b": False, "ln": False},  # prefix
        lambda params: optree.tree_map(lambda x: x.ndim > 1, params),  # callable
    ]
    for mask in masks:
        tx = optim.add_decayed_weights(0.5, mask=mask)
        u, _ = tx.update(g, tx.init(p), p)
        assert torch.equal(u["w"], torch.full((2, 2), 0.5))
        assert u["b"] is g["b"] and u["ln"]["g"] is g["ln"]["g"]  # masked leaves untouched
    u, _ = optim.add_decayed_weights(0.5).update(g, optim.EmptyState(), p)
    assert all(torch.equal(x, torch.full_like(x, 0.5)) for x in leaves(u))


def test_add_decayed_weights_bad_mask():
    p = {"w": torch.ones(2), "b": torch.ones(2)}
    tx = optim.add_decayed_weights(0.1, mask={"w": True, "c": False})
    with pytest.raises(ValueError, match=r"mask and params differ at \['c'\]"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(TypeError, match=r"optim\.add_decayed_weights: mask leaf \['b'\] is 'yes'"):
        optim.add_decayed_weights(0.1, mask={"w": True, "b": "yes"})
    tx = optim.add_decayed_weights(0.1, mask=lambda p: {"w": True, "b": 1})
    with pytest.raises(TypeError, match=r"mask leaf for params \['b'\] is 1 \(int\)"):
        tx.update(p, tx.init(p), p)


@given(seed=st.integers(0, 2**16), min_norm=st.sampled_from([0.0, 0.5]))
def test_scale_by_trust_ratio_formula(seed, min_norm):
    gen = torch.Generator().manual_seed(seed)
    p = {"a": torch.randn(3, 2, generator=gen, dtype=torch.float64), "z": torch.zeros(4).double()}
    u = {"a": torch.randn(3, 2, generator=gen, dtype=torch.float64), "z": torch.ones(4).double()}
    tx = optim.scale_by_trust_ratio(min_norm=min_norm, trust_coefficient=0.5, eps=1e-3)
    out, _ = tx.update(u, tx.init(p), p)
    pn, un = max(p["a"].norm(), min_norm), max(u["a"].norm(), min_norm)
    torch.testing.assert_close(out["a"], u["a"] * (0.5 * pn / (un + 1e-3)), rtol=1e-14, atol=0)
    expect_z = u["z"] if min_norm == 0 else u["z"] * (0.5 * 0.5 / (2.0 + 1e-3))
    torch.testing.assert_close(out["z"], expect_z, rtol=1e-14, atol=0)  # ratio 1 at |p| = 0


# --------------------------------------------------------------------------------------
# the generic contract: no mutation, donation in place and bitwise equal, no grad
# --------------------------------------------------------------------------------------

TRANSFORMS = {
    "scale": lambda: optim.scale(-0.3),
    "scale_by_adam": lambda: optim.scale_by_adam(eps_root=1e-8),
    "scale_by_lion": lambda: optim.scale_by_lion(),
    "trace": lambda: optim.trace(0.9),
    "trace_nesterov": lambda: optim.trace(0.9, nesterov=True),
    "add_decayed_weights": lambda: optim.add_decayed_weights(0.1, mask={"w": True, "b": False}),
    "scale_by_trust_ratio": lambda: optim.scale_by_trust_ratio(),
    "scale_by_schedule": lambda: optim.scale_by_schedule(lambda s: 1.0 / (s + 1)),
    "clip": lambda: optim.clip(0.5),
    "clip_by_global_norm": lambda: optim.clip_by_global_norm(1.0),
    "apply_if_finite": lambda: optim.apply_if_finite(optim.adam(1e-2), 2),
    "sgd": lambda: optim.sgd(0.1, momentum=0.9),
    "lion": lambda: optim.lion(1e-3),
    "lamb": lambda: optim.lamb(1e-3, weight_decay=0.1),
    "chain": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)),
}


def _state_tensors(state):
    return [x for x in optree.tree_leaves(state) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_contract(name):
    tx = TRANSFORMS[name]()
    spec = {"w": (3, 4), "b": (4,)}
    params = make_tree(spec, 0, dtype=torch.float32)
    state = tx.init(params)
    changed = False
    for g in grads_for(spec, 3, 0, dtype=torch.float32):
        g = optree.tree_map(lambda x: x.requires_grad_(), g)
        before = snapshot((g, state, params))
        u1, s1 = tx.update(g, state, params)
        assert bitwise_equal((g, state, params), before), "non-donated update mutated an input"
        assert not any(x.requires_grad for x in leaves((u1, _state_tensors(s1))))
        changed = changed or not bitwise_equal(u1, g)
        g2, st2 = snapshot(g), snapshot(state)
        old = _state_tensors(st2)
        with optim.donation():
            u2, s2 = tx.update(g2, st2, params)
        assert bitwise_equal(u1, u2) and bitwise_equal(s1, s2), "donation changed the result"
        new = _state_tensors(s2)
        assert len(old) == len(new) and all(a is b for a, b in zip(old, new)), "not in place"
        state, params = s1, optim.apply_updates(params, u1)
    assert changed, "the transform did nothing"


def test_donated_updates_never_alias_state():
    # trace (no nesterov) returns its buffer as the update; a later in-place scaling must
    # not corrupt the state under donation.
    tx = optim.chain(optim.trace(0.5), optim.scale(-1.0))
    p = {"w": torch.zeros(2)}
    s = tx.init(p)
    with optim.donation():
        u, s = tx.update({"w": torch.ones(2)}, s, p)
    assert u["w"].tolist() == [-1.0, -1.0] and s[0].trace["w"].tolist() == [1.0, 1.0]


def test_mixed_devices_and_dtypes_group_correctly():
    tx = optim.adamw(1e-2, weight_decay=0.1)
    p = {"a": torch.randn(3), "b": torch.randn(3, dtype=torch.float64), "c": torch.randn(2)}
    p["h"] = torch.randn(4).to(torch.bfloat16)
    g = optree.tree_map(torch.randn_like, p)
    u, s = tx.update(g, tx.init(p), p)
    assert {k: v.dtype for k, v in u.items()} == {k: v.dtype for k, v in p.items()}
    ref = optim.GradientTransformation(tx.init, tx.update.unfused)
    u2, _ = ref.update(g, ref.init(p), p)
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}
    for k in p:
        torch.testing.assert_close(u[k].double(), u2[k].double(), rtol=rtol[p[k].dtype], atol=0)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_errors_name_the_path():
    p = {"layers": [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}]}
    tx = optim.trace(0.9)
    s = tx.init(p)
    bad = {"layers": [{"w": torch.zeros(2)}]}
    with pytest.raises(ValueError, match=r"optim\.trace: updates and state\.trace differ"):
        tx.update(bad, s)
    with pytest.raises(TypeError, match=r"updates leaf \['layers'\]\[1\]\['w'\] is 2"):
        tx.update({"layers": [{"w": torch.zeros(2)}, {"w": 2}]}, s)
    tx = optim.scale_by_trust_ratio()
    with pytest.raises(ValueError, match=r"optim\.scale_by_trust_ratio: this transform needs"):
        tx.update(p, tx.init(p))
    with pytest.raises(ValueError, match=r"updates and params differ in pytree structure at"):
        tx.update(bad, tx.init(p), p)
    with pytest.raises(TypeError, match=r"optim\.scale_by_schedule: step_size_fn must be"):
        optim.scale_by_schedule(0.1)
    with pytest.raises(ValueError, match=r"optim\.trace: decay must be in \[0, inf\)"):
        optim.trace(-0.1)
