"""optax parity (issue 9): update by keyword on every transform, mu_dtype /
accumulator_dtype, masked, MultiSteps, inject_hyperparams — cases ported from optax's own
tests (optax/transforms/_accumulation_test.py, _masking_test.py, schedules/_inject_test.py)
and checked against float64 / torch.optim references."""

from __future__ import annotations

import inspect

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from optim_trees import grads_for, leaves, make_tree, max_rel_err, run_fs, run_torch, tree_specs

from fsharding import optim

P = {"a": torch.tensor([1.0, -2.0]), "w": torch.tensor([[0.5, 1.5], [2.0, -1.0]])}
G = {"a": torch.tensor([0.1, 0.2]), "w": torch.tensor([[1.0, -1.0], [0.5, 0.25]])}

# every exported factory of a GradientTransformation, with arguments
FACTORIES = {
    "identity": lambda: optim.identity(),
    "chain": lambda: optim.chain(optim.scale(2.0), optim.trace(0.5)),
    "scale": lambda: optim.scale(-0.1),
    "scale_by_adam": lambda: optim.scale_by_adam(),
    "scale_by_lion": lambda: optim.scale_by_lion(),
    "scale_by_learning_rate": lambda: optim.scale_by_learning_rate(0.1),
    "scale_by_schedule": lambda: optim.scale_by_schedule(lambda n: 0.5),
    "scale_by_trust_ratio": lambda: optim.scale_by_trust_ratio(),
    "trace": lambda: optim.trace(0.9),
    "add_decayed_weights": lambda: optim.add_decayed_weights(0.1),
    "clip": lambda: optim.clip(0.5),
    "clip_by_global_norm": lambda: optim.clip_by_global_norm(0.5),
    "apply_if_finite": lambda: optim.apply_if_finite(optim.adam(0.1), 2),
    "adam": lambda: optim.adam(0.1),
    "adamw": lambda: optim.adamw(0.1),
    "sgd": lambda: optim.sgd(0.1, momentum=0.9),
    "lion": lambda: optim.lion(0.1),
    "lamb": lambda: optim.lamb(0.1),
    "masked": lambda: optim.masked(optim.adam(0.1), {"a": False, "w": True}),
    "MultiSteps": lambda: optim.MultiSteps(optim.adam(0.1), 1).gradient_transformation(),
    "inject_hyperparams": lambda: optim.inject_hyperparams(optim.adam)(learning_rate=0.1),
}


def test_every_exported_transform_is_in_the_keyword_test():
    made = set()
    for name in optim.__all__:
        obj = getattr(optim, name)
        if name[0].isupper() or not callable(obj) or "schedule" in name:
            continue
        ret = inspect.signature(obj).return_annotation
        if "GradientTransformation" in str(ret):
            made.add(name)
    assert made - set(FACTORIES) == set(), made - set(FACTORIES)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_update_by_keyword(name):
    tx = FACTORIES[name]()
    sig = inspect.signature(tx.update)
    assert list(sig.parameters)[:3] == ["updates", "state", "params"], sig
    assert sig.parameters["params"].default is None
    s = tx.init(P)
    u1, _ = tx.update(G, s, P)
    u2, _ = tx.update(updates=G, state=tx.init(P), params=P)
    for x, y in zip(leaves(u1), leaves(u2)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# mu_dtype / accumulator_dtype
# --------------------------------------------------------------------------------------


def _ref_adam(params, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, mu_dtype=None):
    """optax's scale_by_adam with mu_dtype in float64 arithmetic: mu is computed from the
    stored (rounded) mu, the update uses the unrounded mu, then mu is stored rounded."""
    p = {k: v.double() for k, v in params.items()}
    mu = {k: torch.zeros_like(v, dtype=mu_dtype or v.dtype) for k, v in params.items()}
    nu = {k: torch.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads_seq, 1):
        for k in p:
            gk = g[k].double()
            m = b1 * mu[k].double() + (1 - b1) * gk
            nu[k] = (b2 * nu[k].double() + (1 - b2) * gk * gk).to(nu[k].dtype)
            mh, vh = m / (1 - b1**t), nu[k].double() / (1 - b2**t)
            p[k] = p[k] - lr * (mh / (vh.sqrt() + eps) + wd * p[k])
            mu[k] = m.to(mu[k].dtype)
    return p, mu


@pytest.mark.parametrize("alias", ["scale_by_adam", "adam", "adamw"])
@pytest.mark.parametrize("donate", [False, True])
def test_mu_dtype_stores_mu_in_that_dtype(alias, donate):
    params = make_tree({"a": (5,), "w": (3, 4)}, 0, torch.float32)
    grads = grads_for({"a": (5,), "w": (3, 4)}, 4, 1, torch.float32)
    wd = 0.1 if alias == "adamw" else 0.0
    tx = {
        "scale_by_adam": lambda: optim.chain(
            optim.scale_by_adam(mu_dtype=torch.bfloat16), optim.scale(-0.01)
        ),
        "adam": lambda: optim.adam(0.01, mu_dtype=torch.bfloat16),
        "adamw": lambda: optim.adamw(0.01, weight_decay=wd, mu_dtype=torch.bfloat16),
    }[alias]()
    state = tx.init(params)
    mu0 = state[0].mu
    assert all(x.dtype == torch.bfloat16 for x in leaves(mu0))
    assert all(x.dtype == torch.float32 for x in leaves(state[0].nu))
    p = params
    for g in grads:
        if donate:
            with optim.donation():
                u, state = tx.update({k: v.clone() for k, v in g.items()}, state, p)
        else:
            u, state = tx.update(g, state, p)
        assert all(x.dtype == torch.float32 for x in leaves(u))  # promoted, as optax
        p = optim.apply_updates(p, u)
    assert all(x.dtype == torch.bfloat16 for x in leaves(state[0].mu))
    ref_p, ref_mu = _ref_adam(params, grads, 0.01, wd=wd, mu_dtype=torch.bfloat16)
    for k in p:
        torch.testing.assert_close(p[k].double(), ref_p[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[0].mu[k], ref_mu[k], rtol=1e-2, atol=1e-3)
    # the result differs from a float32 mu (mu_dtype really is used)
    full, _ = _ref_adam(params, grads, 0.01, wd=wd)
    assert max((ref_p[k] - full[k]).abs().max().item() for k in p) > 1e-7


def test_mu_dtype_float32_with_bf16_params_matches_fp32_reference():
    params = {"w": torch.randn(16, generator=torch.Generator().manual_seed(0)).bfloat16()}
    grads = [{"w": torch.randn(16).bfloat16()} for _ in range(3)]
    tx = optim.adam(0.01, mu_dtype=torch.float32)
    s = tx.init(params)
    assert s[0].mu["w"].dtype == torch.float32 and s[0].nu["w"].dtype == torch.bfloat16
    for g in grads:
        u, s = tx.update(g, s, params)
    assert s[0].mu["w"].dtype == torch.float32


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_accumulator_dtype_on_trace_and_sgd(nesterov, donate):
    params = make_tree({"w": (6,)}, 2, torch.float32)
    grads = grads_for({"w": (6,)}, 4, 3, torch.float32)
    tx = optim.sgd(0.1, momentum=0.9, nesterov=nesterov, accumulator_dtype=torch.bfloat16)
    s = tx.init(params)
    assert s[0].trace["w"].dtype == torch.bfloat16
    p = params
    tr = torch.zeros(6, dtype=torch.bfloat16)
    ref = params["w"].double()
    for g in grads:
        gg = g["w"].double()
        new = gg + 0.9 * tr.double()
        upd = gg + 0.9 * new if nesterov else new
        tr = new.to(torch.bfloat16)
        ref = ref - 0.1 * upd
        with optim.donation() if donate else _Null():
            u, s = tx.update({"w": g["w"].clone()}, s, p)
        assert u["w"].dtype == torch.float32
        p = optim.apply_updates(p, u)
    assert s[0].trace["w"].dtype == torch.bfloat16
    torch.testing.assert_close(s[0].trace["w"], tr, rtol=0, atol=0)
    torch.testing.assert_close(p["w"].double(), ref, rtol=1e-5, atol=1e-6)
    t2 = optim.trace(0.5, accumulator_dtype=torch.float64)
    assert t2.init(params).trace["w"].dtype == torch.float64


def test_dtype_arguments_are_checked():
    with pytest.raises(TypeError, match=r"optim\.adam: mu_dtype must be a floating torch\.dtype"):
        optim.adam(0.1, mu_dtype="bf16x")
    with pytest.raises(TypeError, match=r"optim\.trace: accumulator_dtype"):
        optim.trace(0.9, accumulator_dtype=torch.int32)
    # optax's string names work
    assert optim.scale_by_adam(mu_dtype="bfloat16").init(P).mu["a"].dtype == torch.bfloat16


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------
# masked
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("callable_mask", [False, True])
def test_masked_passes_masked_out_leaves_through_and_keeps_state_only_for_masked_in(
    callable_mask,
):
    mask = {"a": False, "w": True}
    m = (lambda p: {k: v.ndim > 1 for k, v in p.items()}) if callable_mask else mask
    tx = optim.masked(optim.adam(0.1), m)
    s = tx.init(P)
    assert isinstance(s, optim.MaskedState)
    mu = s.inner_state[0].mu
    assert isinstance(mu["a"], optim.MaskedNode) and mu["w"].shape == (2, 2)
    ref_tx = optim.adam(0.1)
    ref_s = ref_tx.init({"w": P["w"]})
    for _ in range(3):
        u, s = tx.update(G, s, P)
        ru, ref_s = ref_tx.update({"w": G["w"]}, ref_s, {"w": P["w"]})
        assert u["a"] is G["a"]  # passed through unchanged
        torch.testing.assert_close(u["w"], ru["w"], rtol=0, atol=0)


def test_masked_prefix_mask_and_nested_trees():
    params = {"enc": {"w": torch.ones(2), "b": torch.ones(1)}, "dec": torch.ones(3)}
    grads = optree.tree_map(lambda x: torch.full_like(x, 2.0), params)
    tx = optim.masked(optim.scale(-1.0), {"enc": True, "dec": False})
    u, _ = tx.update(grads, tx.init(params), params)
    assert u["enc"]["w"].tolist() == [-2.0, -2.0] and u["dec"] is grads["dec"]


def test_masked_weight_decay_like_optax_docs():
    # optax's doc example: no decay on 1-d params
    tx = optim.chain(
        optim.masked(
            optim.add_decayed_weights(0.5), lambda p: {k: v.ndim != 1 for k, v in p.items()}
        ),
        optim.scale(-1.0),
    )
    u, _ = tx.update(G, tx.init(P), P)
    torch.testing.assert_close(u["a"], -G["a"])
    torch.testing.assert_close(u["w"], -(G["w"] + 0.5 * P["w"]))


def test_masked_donated_and_bad_masks():
    tx = optim.masked(optim.trace(0.5), {"a": True, "w": False})
    s = tx.init(P)
    g = {k: v.clone() for k, v in G.items()}
    with optim.donation():
        u, s = tx.update(g, s, P)
    torch.testing.assert_close(u["a"], G["a"]) and torch.testing.assert_close(u["w"], G["w"])
    with pytest.raises(TypeError, match=r"optim\.masked: mask leaf \['a'\] is 1"):
        optim.masked(optim.scale(1.0), {"a": 1, "w": True})
    with pytest.raises(TypeError, match=r"optim\.masked: inner must be a GradientTransformation"):
        optim.masked(lambda g: g, {"a": True})
    with pytest.raises(ValueError, match=r"optim\.masked: .*mask and params differ at \['b'\]"):
        optim.masked(optim.scale(1.0), {"b": True}).init(P)


# --------------------------------------------------------------------------------------
# MultiSteps (cases from optax's _accumulation_test.py)
# --------------------------------------------------------------------------------------


def test_multi_steps_updates_every_k_and_loss_goes_down():
    torch.manual_seed(0)
    k = 4
    params = {"w": torch.randn(7, 10), "b": torch.zeros(10)}
    data = torch.ones(32, 7)

    def loss_fn(p):
        return ((data @ p["w"] + p["b"]) ** 2).sum()

    ms = optim.MultiSteps(
        optim.chain(optim.scale_by_adam(), optim.add_decayed_weights(1e-2), optim.scale(-1e-3)),
        k,
    )
    init, update = ms.gradient_transformation()
    state = init(params)
    prev = loss_fn(params).item()
    for i in range(5 * k):
        p = {n: v.clone().requires_grad_() for n, v in params.items()}
        loss_fn(p).backward()
        grads = {n: v.grad for n, v in p.items()}
        updates, state = update(grads, state, params)
        new = optim.apply_updates(params, updates)
        now = loss_fn(new).item()
        if i % k < k - 1:
            assert all(torch.equal(new[n], params[n]) for n in params) and now == prev
            assert not ms.has_updated(state)
        else:
            assert now < prev and ms.has_updated(state)
            prev = now
        params = new


def test_multi_steps_every_k_schedule():
    ms = optim.MultiSteps(optim.sgd(1e-4), lambda step: 1 if step < 2 else 3)
    init, update = ms.gradient_transformation()
    params, grad = {"a": torch.zeros(())}, {"a": torch.zeros(())}
    state = init(params)
    assert not ms.has_updated(state)
    for _ in range(2):
        _, state = update(grad, state, params)
        assert ms.has_updated(state)
    for _ in range(5):
        for _ in range(2):
            _, state = update(grad, state, params)
            assert not ms.has_updated(state)
        _, state = update(grad, state, params)
        assert ms.has_updated(state)


@pytest.mark.parametrize("donate", [False, True])
def test_multi_steps_computes_mean_and_sum(donate):
    for mean, expected in ((True, 2.5), (False, 10.0)):
        ms = optim.MultiSteps(optim.scale(1.0), 4, use_grad_mean=mean)
        params = {"a": torch.zeros(())}
        state = ms.init(params)
        for i in (1, 2, 3):
            with optim.donation() if donate else _Null():
                u, state = ms.update({"a": torch.tensor(float(i))}, state, params)
            assert u["a"].item() == 0.0 and not ms.has_updated(state)
        u, state = ms.update({"a": torch.tensor(4.0)}, state, params)
        assert ms.has_updated(state) and u["a"].item() == expected
        assert state.acc_grads["a"].item() == 0.0 and state.mini_step == 0


def test_multi_steps_skip_not_finite():
    ms = optim.MultiSteps(optim.sgd(1.0), 2, should_skip_update_fn=optim.skip_not_finite)
    init, update = ms.gradient_transformation()
    params = {"a": torch.zeros(())}
    state = init(params)
    for _ in range(2):
        u, state = update({"a": torch.ones(())}, state, params)
        params = optim.apply_updates(params, u)
    assert state.mini_step == 0 and params["a"].item() == -1.0
    for bad in (float("inf"), float("nan")):
        u, state = update({"a": torch.tensor(bad)}, state, params)
        assert state.mini_step == 0 and state.skip_state["should_skip"]
        params = optim.apply_updates(params, u)
        assert params["a"].item() == -1.0
    for _ in range(2):
        u, state = update({"a": torch.ones(())}, state, params)
        params = optim.apply_updates(params, u)
    assert params["a"].item() == -2.0


def test_skip_large_updates():
    skip, st_ = optim.skip_large_updates([torch.tensor(11.0), torch.zeros(())], 0, None, 100.0)
    assert bool(skip) and float(st_["norm_squared"]) == 121.0
    skip, st_ = optim.skip_large_updates([torch.zeros(()), torch.zeros(())], 0, None, 100.0)
    assert not bool(skip)
    skip, _ = optim.skip_large_updates([torch.tensor(float("nan"))], 0, None, 100.0)
    assert bool(skip)


@given(spec=tree_specs, k=st.integers(1, 4), seed=st.integers(0, 50))
def test_multi_steps_equals_adamw_on_mean_grads(spec, k, seed):
    """MultiSteps(adamw, k) on k microbatch grads == adamw on their mean (float64)."""
    params = make_tree(spec, seed)
    micro = grads_for(spec, 2 * k, seed)
    ms = optim.MultiSteps(optim.adamw(0.01, weight_decay=0.1), k)
    got, _ = run_fs(ms.gradient_transformation(), params, micro)
    means = [
        optree.tree_map(lambda *xs: torch.stack(xs).mean(0), *micro[i : i + k])
        for i in range(0, 2 * k, k)
    ]
    ref = run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), params, means)
    assert max_rel_err(got, ref) < 1e-10


# --------------------------------------------------------------------------------------
# inject_hyperparams (cases from optax's schedules/_inject_test.py)
# --------------------------------------------------------------------------------------


def test_inject_hyperparams_numbers_changeable_between_steps():
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=0.1, weight_decay=0.0)
    s = tx.init(P)
    assert isinstance(s, optim.InjectHyperparamsState)
    assert s.hyperparams["learning_rate"] == 0.1 and s.count == 0
    ref = optim.adamw(0.1, weight_decay=0.0)
    rs = ref.init(P)
    u, s = tx.update(G, s, P)
    ru, rs = ref.update(G, rs, P)
    torch.testing.assert_close(u["w"], ru["w"], rtol=0, atol=0)
    # change lr and wd without rebuilding the state: the moments carry on
    s.hyperparams["learning_rate"] = 0.01
    s.hyperparams["weight_decay"] = 0.5
    u, s = tx.update(G, s, P)
    ref2 = optim.adamw(0.01, weight_decay=0.5)
    ru, _ = ref2.update(G, rs, P)
    torch.testing.assert_close(u["w"], ru["w"], rtol=0, atol=0)
    assert s.count == 2 and s.hyperparams["learning_rate"] == 0.01
    assert optim.learning_rate(tx, s) == 0.01


def test_inject_hyperparams_schedules_match_the_scheduled_optimizer():
    sched = optim.linear_schedule(0.1, 0.0, 4)
    tx = optim.inject_hyperparams(optim.sgd)(learning_rate=sched, momentum=0.9)
    ref = optim.sgd(sched, momentum=0.9)
    s, rs = tx.init(P), ref.init(P)
    for step in range(5):
        assert optim.learning_rate(tx, s) == pytest.approx(sched(step))
        u, s = tx.update(G, s, P)
        ru, rs = ref.update(G, rs, P)
        assert s.hyperparams["learning_rate"] == pytest.approx(sched(step))
        for x, y in zip(leaves(u), leaves(ru)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    # a scheduled value set by hand has no effect (optax)
    s.hyperparams["learning_rate"] = 123.0
    u, s = tx.update(G, s, P)
    assert s.hyperparams["learning_rate"] == pytest.approx(sched(5))


def test_inject_hyperparams_static_args_and_errors():
    mask = lambda p: {k: v.ndim > 1 for k, v in p.items()}  # noqa: E731
    tx = optim.inject_hyperparams(optim.adamw, static_args="mask")(0.1, mask=mask)
    s = tx.init(P)
    assert "mask" not in s.hyperparams and set(s.hyperparams) >= {"learning_rate", "b1"}
    with pytest.raises(
        TypeError, match=r"optim\.inject_hyperparams: mask is callable.*static_args"
    ):
        optim.inject_hyperparams(optim.adamw)(0.1, mask=mask)
    with pytest.raises(ValueError, match=r"static_args.*'nope'"):
        optim.inject_hyperparams(optim.adam, static_args=("nope",))
    with pytest.raises(TypeError, match=r"optim\.inject_hyperparams: .*cosine_decay_schedule"):
        optim.inject_hyperparams(optim.adam)(optim.cosine_decay_schedule)


def test_positional_order_is_optax():
    order = {
        optim.adam: ["learning_rate", "b1", "b2", "eps", "eps_root", "mu_dtype"],
        optim.adamw: [
            "learning_rate", "b1", "b2", "eps", "eps_root", "mu_dtype", "weight_decay", "mask"
        ],
        optim.sgd: ["learning_rate", "momentum", "nesterov", "accumulator_dtype"],
        optim.scale_by_adam: ["b1", "b2", "eps", "eps_root", "mu_dtype"],
        optim.trace: ["decay", "nesterov", "accumulator_dtype"],
    }  # fmt: skip
    for fn, names in order.items():
        assert list(inspect.signature(fn).parameters) == names, fn.__name__


@given(spec=tree_specs, seed=st.integers(0, 30), data=st.data())
def test_masked_property_elementwise_inner(spec, seed, data):
    """masked(adamw) = adamw on the masked-in leaves (adamw is per leaf), the input on the
    others; the inner state has exactly the masked-in leaves."""
    params = make_tree(spec, seed)
    n = len(leaves(params))
    bits = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    treedef = optree.tree_structure(params)
    mask = optree.tree_unflatten(treedef, bits)
    tx, ref = (
        optim.masked(optim.adamw(0.01, weight_decay=0.1), mask),
        optim.adamw(0.01, weight_decay=0.1),
    )
    s, rs = tx.init(params), ref.init(params)
    assert len(leaves(s.inner_state[0].mu)) == sum(bits)
    for g in grads_for(spec, 3, seed):
        u, s = tx.update(g, s, params)
        ru, rs = ref.update(g, rs, params)
        for b, x, y, gi in zip(bits, leaves(u), leaves(ru), leaves(g)):
            if b:
                torch.testing.assert_close(x, y, rtol=0, atol=0)
            else:
                assert x is gi


def test_mu_dtype_equal_to_the_params_dtype_keeps_the_fused_kernel_bitwise():
    params = make_tree({"w": (8, 3)}, 5, torch.float32)
    grads = grads_for({"w": (8, 3)}, 3, 6, torch.float32)
    a, b = optim.adamw(0.01, mu_dtype=torch.float32), optim.adamw(0.01)
    pa, sa = run_fs(a, params, grads)
    pb, sb = run_fs(b, params, grads)
    assert torch.equal(pa["w"], pb["w"]) and torch.equal(sa[0].mu["w"], sb[0].mu["w"])
