"""Aliases against torch.optim (adam, adamw, sgd) and float64 paper references (lion, lamb)."""

from __future__ import annotations

import inspect

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_trees import (
    bitwise_equal,
    grads_for,
    leaves,
    make_tree,
    max_rel_err,
    run_fs,
    run_torch,
    snapshot,
    tree_specs,
)

import fsharding as fs
from fsharding import optim

STEPS = 50
TOL = 1e-10


def _decay_mask(params):
    return optree.tree_map(lambda p: p.ndim > 1, params)


# --------------------------------------------------------------------------------------
# equivalence with torch.optim (float64, >= 50 steps, hypothesis pytrees)
# --------------------------------------------------------------------------------------


@given(spec=tree_specs, seed=st.integers(0, 2**16), lr=st.sampled_from([1e-3, 3e-2]))
def test_adam_matches_torch(spec, seed, lr):
    params = make_tree(spec, seed)
    grads = grads_for(spec, STEPS, seed)
    ours, _ = run_fs(optim.adam(lr, b1=0.8, b2=0.99, eps=1e-6), params, grads)
    ref = run_torch(
        lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.99), eps=1e-6, foreach=True),
        params,
        grads,
    )
    assert max_rel_err(ours, ref) < TOL
    assert max_rel_err(params, ref) > 1e-4 or lr == 0  # it moved


@given(
    spec=tree_specs,
    seed=st.integers(0, 2**16),
    wd=st.sampled_from([0.0, 1e-4, 0.1]),
    foreach=st.booleans(),
)
def test_adamw_matches_torch(spec, seed, wd, foreach):
    params = make_tree(spec, seed)
    grads = grads_for(spec, STEPS, seed)
    ours, _ = run_fs(optim.adamw(1e-2, weight_decay=wd), params, grads)
    ref = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=wd, foreach=foreach),
        params,
        grads,
    )
    assert max_rel_err(ours, ref) < TOL


@given(spec=tree_specs, seed=st.integers(0, 2**16))
def test_adamw_mask_matches_torch_param_groups(spec, seed):
    params = make_tree(spec, seed)
    grads = grads_for(spec, STEPS, seed)
    ours, _ = run_fs(optim.adamw(1e-2, weight_decay=0.5, mask=_decay_mask), params, grads)
    decays = leaves(_decay_mask(params))

    def make(ps):
        groups = [
            {"params": [p for p, d in zip(ps, decays) if d]},
            {"params": [p for p, d in zip(ps, decays) if not d], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-2, weight_decay=0.5)

    assert max_rel_err(ours, run_torch(make, params, grads)) < TOL


@given(
    spec=tree_specs,
    seed=st.integers(0, 2**16),
    momentum=st.sampled_from([None, 0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
)
def test_sgd_matches_torch(spec, seed, momentum, nesterov):
    params = make_tree(spec, seed)
    grads = grads_for(spec, STEPS, seed)
    ours, _ = run_fs(optim.sgd(0.05, momentum=momentum, nesterov=nesterov), params, grads)
    m = momentum or 0.0
    ref = run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=m, nesterov=nesterov and m > 0),
        params,
        grads,
    )
    assert max_rel_err(ours, ref) < TOL


def test_adamw_schedule_matches_torch_with_lr_set_per_step():
    spec = {"w": (4, 3), "b": (3,)}
    params, grads = make_tree(spec, 1), grads_for(spec, STEPS, 1)
    sched = optim.warmup_cosine_decay_schedule(0.0, 0.05, 10, STEPS)
    ours, state = run_fs(optim.adamw(sched, weight_decay=0.1), params, grads)
    ref = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=0.0, weight_decay=0.1), params, grads, lr_at=sched
    )
    assert max_rel_err(ours, ref) < TOL
    assert state[-1].count == STEPS


# --------------------------------------------------------------------------------------
# lion and lamb against their papers (float64 references written here)
# --------------------------------------------------------------------------------------


def _lion_reference(params, grads, lr, b1, b2, wd):
    ps = [p.clone() for p in leaves(params)]
    ms = [torch.zeros_like(p) for p in ps]
    for g in grads:
        for i, gi in enumerate(leaves(g)):
            c = b1 * ms[i] + (1 - b1) * gi
            ps[i] = ps[i] - lr * (torch.sign(c) + wd * ps[i])
            ms[i] = b2 * ms[i] + (1 - b2) * gi
    return ps


@given(spec=tree_specs, seed=st.integers(0, 2**16), wd=st.sampled_from([0.0, 1e-3, 0.3]))
def test_lion_matches_paper(spec, seed, wd):
    params = make_tree(spec, seed)
    grads = grads_for(spec, STEPS, seed)
    ours, state = run_fs(optim.lion(1e-3, weight_decay=wd), params, grads)
    assert max_rel_err(ours, _lion_reference(params, grads, 1e-3, 0.9, 0.99, wd)) < TOL
    assert state[0].count == STEPS


def _lamb_reference(params, grads, lr, b1, b2, eps, wd):
    ps = [p.clone() for p in leaves(params)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(leaves(g)):
            ms[i] = b1 * ms[i] + (1 - b1) * gi
            vs[i] = b2 * vs[i] + (1 - b2) * gi * gi
            r = (ms[i] / (1 - b1**t)) / ((vs[i] / (1 - b2**t)).sqrt() + eps) + wd * ps[i]
            pn, rn = ps[i].norm(), r.norm()
            ratio = 1.0 if pn == 0 or rn == 0 else pn / rn
            ps[i] = ps[i] - lr * ratio * r
    return ps


@given(spec=tree_specs, seed=st.integers(0, 2**16), wd=st.sampled_from([0.0, 0.01]))
def test_lamb_matches_paper(spec, seed, wd):
    params = make_tree(spec, seed)
    grads = grads_for(spec, STEPS, seed)
    ours, _ = run_fs(optim.lamb(1e-2, weight_decay=wd), params, grads)
    ref = _lamb_reference(params, grads, 1e-2, 0.9, 0.999, 1e-6, wd)
    assert max_rel_err(ours, ref) < TOL


# --------------------------------------------------------------------------------------
# the fused adam/adamw path
# --------------------------------------------------------------------------------------


@given(
    spec=tree_specs,
    seed=st.integers(0, 2**16),
    wd=st.sampled_from([0.0, 0.1]),
    eps_root=st.sampled_from([0.0, 1e-10]),
)
def test_fused_adamw_equals_the_unfused_chain(spec, seed, wd, eps_root):
    params = make_tree(spec, seed)
    grads = grads_for(spec, 5, seed)
    sched = optim.linear_schedule(1e-2, 1e-3, 4)
    tx = optim.adamw(sched, weight_decay=wd, mask=_decay_mask, eps_root=eps_root)
    unfused = optim.GradientTransformation(tx.init, tx.update.unfused)
    p1, s1 = run_fs(tx, params, grads)
    p2, s2 = run_fs(unfused, params, grads)
    assert optree.tree_structure(s1) == optree.tree_structure(s2)
    assert max_rel_err(p1, leaves(p2)) < 1e-13
    assert max_rel_err(s1[0].nu, leaves(s2[0].nu)) < 1e-13
    assert s1[0].count == s2[0].count == 5 and s1[-1].count == s2[-1].count == 5


@pytest.mark.parametrize(
    "make",
    [lambda: optim.adamw(1e-2, weight_decay=0.1, mask=_decay_mask), lambda: optim.adam(1e-2)],
)
def test_fused_donated_is_bitwise_equal_and_in_place(make):
    tx = make()
    params = make_tree({"w": (5, 4), "b": (4,), "n": [(3,), (2, 2)]}, 3)
    state = tx.init(params)
    for g in grads_for({"w": (5, 4), "b": (4,), "n": [(3,), (2, 2)]}, 3, 3):
        before = snapshot((g, state, params))
        u1, s1 = tx.update(g, state, params)
        assert bitwise_equal((g, state, params), before)  # nothing mutated
        g2, st2 = snapshot(g), snapshot(state)
        with optim.donation():
            u2, s2 = tx.update(g2, st2, params)
        assert bitwise_equal(u1, u2) and bitwise_equal(s1, s2)
        for a, b in zip(leaves((st2[0].mu, st2[0].nu)), leaves((s2[0].mu, s2[0].nu))):
            assert a is b  # state updated in place
        state = s1
        params = optim.apply_updates(params, u1)


def test_non_contiguous_and_bf16_params_match_torch():
    w = torch.randn(6, 4, dtype=torch.float64).t()  # a transposed (non-contiguous) param
    params = {"w": w, "b": torch.randn(6, dtype=torch.float64)}
    grads = [{"w": torch.randn(6, 4, dtype=torch.float64).t(), "b": torch.randn(6).double()}]
    ours, _ = run_fs(optim.adamw(1e-2, weight_decay=0.1), params, grads * 20)
    ref = run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), params, grads * 20)
    assert max_rel_err(ours, ref) < TOL
    half = optree.tree_map(lambda x: x.contiguous().bfloat16(), params)
    hgrads = [optree.tree_map(lambda x: x.bfloat16(), g) for g in grads * 5]
    ours, _ = run_fs(optim.adamw(1e-2, weight_decay=0.1), half, hgrads)
    up = lambda t: optree.tree_map(lambda x: x.double(), t)  # noqa: E731
    ref, _ = run_fs(optim.adamw(1e-2, weight_decay=0.1), up(half), [up(g) for g in hgrads])
    assert all(a.dtype == torch.bfloat16 for a in leaves(ours))
    for a, r in zip(leaves(ours), leaves(ref)):  # <= 1 bf16 ulp of rounding per step
        assert ((a.double() - r).abs() <= 5 * 2**-7 * r.abs() + 1e-3).all()


def test_adamw_update_output_never_requires_grad():
    params = {"w": torch.randn(3, requires_grad=True)}
    tx = optim.adamw(1e-2)
    u, s = tx.update({"w": torch.randn(3, requires_grad=True)}, tx.init(params), params)
    assert not u["w"].requires_grad and not s[0].mu["w"].requires_grad


def test_train_step_donated_equals_not_donated():
    loss_fn = lambda p, b: ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).mean()  # noqa: E731
    tx = optim.adamw(1e-2, weight_decay=0.1)
    step = fs.train_step(fs.value_and_grad(loss_fn), tx)
    p0 = {"w": torch.randn(4, 2), "b": torch.zeros(2)}
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 2)}
    pa, sa = step.init(snapshot(p0))
    pb, sb = step.init(snapshot(p0))
    for _ in range(3):
        pa, sa, ma = step.step(pa, sa, batch)
        pb, sb, mb = step.step(pb, sb, batch, donate=True)
    assert bitwise_equal(pa, pb) and bitwise_equal(sa, sb)
    assert ma["lr"] == 1e-2


# --------------------------------------------------------------------------------------
# defaults, validation, structure
# --------------------------------------------------------------------------------------

OPTAX_DEFAULTS = {
    optim.sgd: {"momentum": None, "nesterov": False, "accumulator_dtype": None},
    optim.adam: {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "mu_dtype": None},
    optim.adamw: {
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "eps_root": 0.0,
        "mu_dtype": None,
        "weight_decay": 1e-4,
        "mask": None,
    },
    optim.lion: {"b1": 0.9, "b2": 0.99, "weight_decay": 1e-3, "mask": None},
    optim.lamb: {
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-6,
        "eps_root": 0.0,
        "weight_decay": 0.0,
        "mask": None,
    },
}


@pytest.mark.parametrize("alias", list(OPTAX_DEFAULTS), ids=lambda f: f.__name__)
def test_optax_defaults(alias):
    sig = inspect.signature(alias)
    assert list(sig.parameters)[0] == "learning_rate"
    got = {k: v.default for k, v in list(sig.parameters.items())[1:]}
    assert got == OPTAX_DEFAULTS[alias]


def test_adamw_docstring_names_the_torch_default_difference():
    assert "1e-2" in optim.adamw.__doc__ and "1e-4" in optim.adamw.__doc__


def test_state_structures():
    p = {"w": torch.zeros(2)}
    assert [type(s).__name__ for s in optim.adamw(1e-3).init(p)] == [
        "ScaleByAdamState",
        "EmptyState",
        "EmptyState",
    ]
    sched = optim.constant_schedule(1.0)
    assert [type(s).__name__ for s in optim.sgd(sched, momentum=0.9).init(p)] == [
        "TraceState",
        "ScaleByScheduleState",
    ]
    assert optim.adam(1e-3).init(p)[0].count == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: optim.adam(-1e-3),
            r"optim\.adam: learning_rate must be in \[0, inf\), got -0\.001",
        ),
        (lambda: optim.adamw(1e-3, b1=1.0), r"optim\.adamw: b1 must be in \[0, 1\), got 1\.0"),
        (lambda: optim.adam(1e-3, b2=-0.1), r"b2 must be in \[0, 1\)"),
        (lambda: optim.adam(1e-3, eps=-1e-8), r"optim\.adam: eps must be in \[0, inf\)"),
        (lambda: optim.lamb(1e-3, weight_decay=-1.0), r"optim\.lamb: weight_decay"),
        (lambda: optim.sgd(1e-3, momentum=-0.5), r"optim\.sgd: momentum"),
        (lambda: optim.sgd("fast"), r"optim\.sgd: learning_rate must be a float or a schedule"),
        (lambda: optim.lion(float("nan")), r"optim\.lion: learning_rate must be a finite"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_structure_mismatch_names_the_path():
    tx = optim.adamw(1e-3)
    params = {"a": torch.zeros(2), "b": {"c": torch.zeros(1)}}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"optim\.adamw: updates and state\.mu differ .* \['b'\]"):
        tx.update({"a": torch.zeros(2), "b": {"d": torch.zeros(1)}}, state, params)
    with pytest.raises(
        TypeError, match=r"optim\.adamw: updates leaf \['b'\]\['c'\] is a torch\.int64"
    ):
        tx.update(
            {"a": torch.zeros(2), "b": {"c": torch.zeros(1, dtype=torch.long)}}, state, params
        )
    with pytest.raises(TypeError, match=r"params leaf \['n'\] is a torch\.int32 tensor"):
        tx.init({"n": torch.zeros(1, dtype=torch.int32)})


def test_weight_decay_needs_params():
    tx = optim.adamw(1e-3, weight_decay=0.1)
    p = {"w": torch.ones(1)}
    with pytest.raises(ValueError, match=r"optim\.adamw: this transform needs params"):
        tx.update({"w": torch.ones(1)}, tx.init(p))


def test_weight_decay_is_decoupled_and_times_lr():
    # zero grads: adam's direction is 0, so adamw shrinks params by exactly lr * wd.
    p = {"w": torch.full((3,), 2.0, dtype=torch.float64)}
    tx = optim.adamw(0.1, weight_decay=0.5)
    u, _ = tx.update({"w": torch.zeros(3, dtype=torch.float64)}, tx.init(p), p)
    torch.testing.assert_close(u["w"], torch.full((3,), -0.1 * 0.5 * 2.0, dtype=torch.float64))
