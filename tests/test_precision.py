"""Loss scales: jmp's rule (against a hand-written loop and torch's GradScaler kernel),
pytrees, scale/unscale, and fp16 training steps that skip on overflow."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding import optim
from fsharding.precision import DynamicLossScale, NoOpLossScale, StaticLossScale
from fsharding.transforms.amp import amp


def jmp_reference(finite_seq, loss_scale, period, factor, min_loss_scale):
    """jmp's DynamicLossScale docstring loop, written out; returns the (scale, counter) trail."""
    counter, trail = 0, []
    for finite in finite_seq:
        if finite:
            counter += 1
            if counter == period:
                counter = 0
                loss_scale = loss_scale * factor
        else:
            counter = 0
            loss_scale = max(min_loss_scale, loss_scale / factor)
        trail.append((loss_scale, counter))
    return trail


@given(
    seq=st.lists(st.booleans(), max_size=60),
    log2_scale=st.integers(0, 20),
    period=st.integers(1, 5),
    factor=st.sampled_from([2, 3, 1.5, 4.0]),
    min_loss_scale=st.sampled_from([1.0, 0.25, 2.0**-80]),
)
def test_dynamic_rule_matches_jmp(seq, log2_scale, period, factor, min_loss_scale):
    init = max(2.0**log2_scale, min_loss_scale)
    s = DynamicLossScale(init, period=period, factor=factor, min_loss_scale=min_loss_scale)
    expected = jmp_reference(seq, init, period, factor, min_loss_scale)
    for finite, (want_scale, want_counter) in zip(seq, expected):
        s = s.adjust(torch.tensor(finite) if len(expected) % 2 else finite)
        assert (s.loss_scale, s.counter) == (want_scale, want_counter)
        assert (s.period, s.factor, s.min_loss_scale) == (period, factor, min_loss_scale)


@given(seq=st.lists(st.booleans(), max_size=50), period=st.integers(1, 4))
def test_dynamic_rule_matches_torch_grad_scaler_kernel(seq, period):
    # torch.amp.GradScaler's update kernel: backoff 0.5, growth 2, growth_interval = period.
    s = DynamicLossScale(2.0**16, period=period, factor=2, min_loss_scale=2.0**-100)
    scale = torch.tensor([2.0**16])
    tracker = torch.zeros(1, dtype=torch.int32)
    for finite in seq:
        found_inf = torch.tensor([0.0 if finite else 1.0])
        torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, period)
        s = s.adjust(finite)
        assert s.loss_scale == scale.item() and s.counter == tracker.item()


def test_defaults_are_grad_scalers_and_growth_never_overflows():
    s = DynamicLossScale()
    assert (s.loss_scale, s.counter, s.period, s.factor, s.min_loss_scale) == (
        65536.0,
        0,
        2000,
        2,
        1.0,
    )
    big = DynamicLossScale(1e308, period=1)
    assert big.adjust(True).loss_scale == 1e308  # x2 is inf: the scale is kept
    assert DynamicLossScale(1.0).adjust(False).loss_scale == 1.0  # min_loss_scale


def test_immutable_values_and_pytrees():
    s = DynamicLossScale(8.0, period=3)
    s2 = s.adjust(True)
    assert s.counter == 0 and s2.counter == 1 and s2 is not s
    with pytest.raises(AttributeError):
        s.loss_scale = 4.0  # type: ignore[misc]
    paths = [p for p, _ in fs.tree.leaves_with_path(fs.TrainState(opt=(), loss_scale=s2))]
    assert paths == [
        ".loss_scale.loss_scale",
        ".loss_scale.counter",
        ".loss_scale.period",
        ".loss_scale.factor",
        ".loss_scale.min_loss_scale",
    ]
    rebuilt = fs.tree.unflatten(fs.tree.structure(s2), fs.tree.leaves(s2))
    assert type(rebuilt) is DynamicLossScale and rebuilt == s2
    assert type(fs.tree.map(lambda x: None, s2)) is DynamicLossScale  # specs etc. rebuild
    assert fs.tree.leaves(StaticLossScale(4.0)) == [4.0]
    assert fs.tree.leaves(NoOpLossScale()) == []


@pytest.mark.parametrize(
    "ls", [NoOpLossScale(), StaticLossScale(3.0), DynamicLossScale(2.0**10)], ids=repr
)
def test_scale_unscale(ls):
    x = torch.randn(5, dtype=torch.float64)
    tree = {
        "f32": x.float(),
        "bf16": x.bfloat16(),
        "f16": x.half(),
        "f64": x,
        "i": torch.arange(3),
        "n": 7,
    }
    scaled = ls.scale(tree)
    unscaled = ls.unscale(tree)
    s = float(ls.loss_scale)
    for k in ("f32", "bf16", "f16", "f64"):
        assert scaled[k].dtype == tree[k].dtype and unscaled[k].dtype == tree[k].dtype
        torch.testing.assert_close(scaled[k], tree[k] * s, rtol=0, atol=0)
        # half-precision leaves: float32 math, then the leaf dtype
        acc = torch.float32 if k in ("bf16", "f16") else tree[k].dtype
        want = (tree[k].to(acc) / s).to(tree[k].dtype)
        torch.testing.assert_close(unscaled[k], want, rtol=0, atol=0)
        torch.testing.assert_close(unscaled[k].double(), x / s, rtol=1e-2, atol=1e-6)
    assert scaled["i"] is tree["i"] and scaled["n"] == 7 and unscaled["i"] is tree["i"]


@pytest.mark.parametrize("ls", [NoOpLossScale(), StaticLossScale(2.0), DynamicLossScale()])
@pytest.mark.parametrize("bad", [1, 0.0, "yes", torch.tensor(1.0), torch.ones(2, dtype=bool)])
def test_adjust_rejects_non_bools(ls, bad):
    with pytest.raises(TypeError, match=r"adjust: grads_finite must be a bool.*fs\.all_finite"):
        ls.adjust(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_scale": 0.0}, r"loss_scale must be a positive finite number, got 0\.0"),
        ({"loss_scale": float("inf")}, "loss_scale must be a positive finite"),
        ({"loss_scale": 0.5}, r"loss_scale=0\.5 is below min_loss_scale=1\.0"),
        ({"period": 0}, "period must be an int >= 1"),
        ({"period": 2.5}, "period must be an int >= 1"),
        ({"factor": 1}, "factor must be a finite number > 1"),
        ({"min_loss_scale": -1.0}, "min_loss_scale must be a positive"),
        ({"counter": 3, "period": 3}, r"counter must be an int in \[0, period=3\)"),
    ],
)
def test_dynamic_validates(kwargs, match):
    with pytest.raises(ValueError, match="fs.DynamicLossScale: " + match):
        DynamicLossScale(**kwargs)


def test_static_validates():
    with pytest.raises(ValueError, match="fs.StaticLossScale: loss_scale must be a positive"):
        StaticLossScale(-2.0)


# --------------------------------------------------------------------------------------
# jmp parity (ported from jmp's loss_scale_test.py). Deviations, stated in the README's
# "Differences from optax and jmp": the numbers are Python scalars and every field is a
# pytree leaf (jmp keeps period/factor static and StaticLossScale leafless), ints are
# accepted as floats without a warning, min_loss_scale must be positive, and there is no
# select_tree (a skipped step returns the old params and state in Python).
# --------------------------------------------------------------------------------------


def test_jmp_no_op_loss_scale_returns_the_tree_itself():
    tree = {"a": torch.ones([])}
    ls = NoOpLossScale()
    assert ls.scale(tree) is tree and ls.unscale(tree) is tree


@pytest.mark.parametrize("cls", [StaticLossScale, DynamicLossScale])
@pytest.mark.parametrize("scale", [2, 3, 4, 2.0, 3.0, 4.0])
def test_jmp_static_loss_scale(cls, scale):
    ls = cls(scale)
    tree = {"a": torch.tensor(1.0)}
    scaled = ls.scale(tree)
    assert torch.equal(scaled["a"], torch.tensor(1.0 * scale))
    assert torch.equal(ls.unscale(scaled)["a"], tree["a"])
    assert ls.loss_scale == scale and type(ls.loss_scale) is float


def test_jmp_dynamic_loss_scale_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicLossScale(2.0**15)


@pytest.mark.parametrize("period, factor", [(20, 2), (30, 3)])
def test_jmp_dynamic_adjust_increases_on_finite(period, factor):
    ls = DynamicLossScale(10.0, 0, period, factor)
    for i in range(1, period):
        ls = ls.adjust(torch.tensor(True))
        assert (ls.loss_scale, ls.counter, ls.period, ls.factor) == (10, i, period, factor)
    ls = ls.adjust(torch.tensor(True))  # the counter wraps, the scale grows
    assert (ls.loss_scale, ls.counter, ls.period, ls.factor) == (10 * factor, 0, period, factor)


@pytest.mark.parametrize("period, factor", [(20, 2), (30, 3)])
def test_jmp_dynamic_adjust_reduces_on_non_finite(period, factor):
    init = 10.0
    ls = DynamicLossScale(init, 0, period, factor)
    assert init / factor**100 < 1  # covers max(1, S)
    for i in range(100):
        ls = ls.adjust(torch.tensor(False))
        assert ls.loss_scale == pytest.approx(max(1, init / factor ** (i + 1)), rel=1e-5)
        assert (ls.counter, ls.period, ls.factor) == (0, period, factor)


@pytest.mark.parametrize("period, factor, min_loss_scale", [(20, 2, 0.3125), (30, 3, 0.37)])
def test_jmp_dynamic_explicit_min_loss_scale(period, factor, min_loss_scale):
    init = 10.0
    ls = DynamicLossScale(init, 0, period, factor, min_loss_scale)
    for i in range(100):
        ls = ls.adjust(False)
        want = max(min_loss_scale, init / factor ** (i + 1))
        assert ls.loss_scale == pytest.approx(want, rel=1e-5)
        assert (ls.counter, ls.period, ls.factor) == (0, period, factor)


@pytest.mark.parametrize("non_finite", [float("inf"), float("nan"), -float("inf")])
def test_jmp_all_finite(non_finite):
    assert bool(fs.all_finite(None)) and bool(fs.all_finite({}))
    assert not bool(fs.all_finite({"a": torch.tensor(non_finite)}))
    assert not bool(fs.all_finite({"a": torch.ones([]), "b": torch.tensor(non_finite)}))
    assert not bool(fs.all_finite({"a": torch.tensor(non_finite), "b": torch.ones([])}))
    assert bool(fs.all_finite({"a": torch.ones([]), "b": torch.ones([])}))
    assert fs.all_finite({"a": torch.ones([])}).dtype == torch.bool


def test_jmp_dynamic_tree_round_trip_keeps_a_custom_minimum():
    # from jmp's MinimumLossScaleTreeTest: unflatten(flatten(s)) == s, fields included
    for minimum in (0.125, 4.0):
        s = DynamicLossScale(4.0, 1, 3, 2, minimum)
        restored = fs.tree.unflatten(fs.tree.structure(s), fs.tree.leaves(s))
        assert restored == s and restored.min_loss_scale == minimum
        assert fs.tree.map(lambda x: x, s) == s
        trail, eager = [], s
        for finite in (False, False, False, True, True, True, False):
            eager = eager.adjust(finite)
            trail.append(eager.loss_scale)
        assert eager.min_loss_scale == minimum and s.loss_scale == 4.0
        low = [max(minimum, x) for x in (2.0, 1.0, 0.5)]
        assert trail == [*low, low[-1], low[-1], 2 * low[-1], max(minimum, low[-1])]


# --------------------------------------------------------------------------------------
# with value_and_grad and train_step, in float16
# --------------------------------------------------------------------------------------


def test_scaling_rescues_fp16_gradients_that_underflow():
    # dL/dw = 1e-4 * 1e-4 = 1e-8 is below float16's smallest subnormal (6e-8): without a
    # loss scale the float16 backward flushes it to 0; scaled by 2**14 it is 1.6e-4 inside
    # the float16 backward (a normal number) and 1e-8 again after unscaling in float32.
    f = amp(lambda w: (w * 1e-4).sum() * 1e-4, policy="fp16")
    w = torch.ones(4)
    _, g_plain = fs.value_and_grad(f)(w)
    _, g_scaled = fs.value_and_grad(f)(w, loss_scale=StaticLossScale(2.0**14))
    assert torch.equal(g_plain, torch.zeros(4))
    torch.testing.assert_close(g_scaled, torch.full((4,), 1e-8), rtol=1e-3, atol=0)
    assert g_scaled.dtype == torch.float32
    # Too large a scale overflows float16 (max 65504) instead: that is what adjust(False) is for.
    _, g_inf = fs.value_and_grad(f)(w, loss_scale=DynamicLossScale(2.0**16))
    assert not fs.all_finite(g_inf)


def _fp16_problem():
    torch.manual_seed(0)
    params = {"w1": torch.randn(8, 16) * 0.3, "w2": torch.randn(16, 4) * 0.3}

    def loss_fn(p, batch):
        h = torch.tanh(batch["x"] @ p["w1"])
        return torch.nn.functional.cross_entropy(h @ p["w2"], batch["y"])

    batch = {"x": torch.randn(32, 8), "y": torch.randint(0, 4, (32,))}
    return params, amp(loss_fn, policy="fp16"), batch


def test_train_step_fp16_overflow_is_skipped_bit_identically():
    params, loss_fn, batch = _fp16_problem()
    schedule = optim.linear_schedule(1e-2, 0.0, 100)
    tx = optim.adamw(schedule, weight_decay=0.1)
    step = fs.train_step(fs.value_and_grad(loss_fn), tx, loss_scale=DynamicLossScale(2.0**8))
    params, state = step.init(params)
    params, state, m0 = step.step(params, state, batch)
    assert not m0["skipped"] and m0["loss_scale"] == 2.0**8 and state.loss_scale.counter == 1
    snapshot = fs.tree.map(lambda x: x.clone() if torch.is_tensor(x) else x, (params, state.opt))

    bad = dict(batch, x=batch["x"].clone())
    bad["x"][3, 2] = float("inf")
    p1, s1, m1 = step.step(params, state, bad)
    assert m1["skipped"] is True and m1["loss_scale"] == 2.0**8
    assert s1.loss_scale == DynamicLossScale(2.0**7, counter=0)
    for a, b in zip(fs.tree.leaves((p1, s1.opt)), fs.tree.leaves(snapshot), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    # The schedule count does not advance on a skipped step: the next good step uses
    # schedule(1), as it would have without the bad batch, and the one after schedule(2).
    p2, s2, m2 = step.step(p1, s1, batch)
    _, _, m3 = step.step(p2, s2, batch)
    assert not m2["skipped"] and m2["loss_scale"] == 2.0**7 and s2.loss_scale.counter == 1
    assert [m0["lr"], m1["lr"], m2["lr"], m3["lr"]] == pytest.approx(
        [schedule(0), schedule(1), schedule(1), schedule(2)], rel=1e-12
    )
    assert not torch.equal(p2["w1"], p1["w1"])


def test_train_step_fp16_too_large_scale_backs_off_until_finite():
    # Scale 2**40: the float16 backward overflows, steps are skipped and the scale halves
    # until gradients fit in float16; after that training proceeds and the loss falls.
    # (The loss op returns float32 inside amp; the float16 backward overflows for large
    # scales, and every `period` steps a try at a doubled scale may be skipped.)
    params, loss_fn, batch = _fp16_problem()
    step = fs.train_step(
        fs.value_and_grad(loss_fn), optim.sgd(0.5), loss_scale=DynamicLossScale(2.0**40, period=5)
    )
    params, state = step.init(params)
    history = []
    for _ in range(40):
        params, state, m = step.step(params, state, batch)
        history.append((m["skipped"], m["loss_scale"], float(m["loss"])))
    skipped = [h[0] for h in history]
    first_ok = skipped.index(False)
    assert first_ok >= 10 and all(skipped[:first_ok])  # 2**40 / 2**k with k >= 10 fits fp16
    scales = [h[1] for h in history]
    assert scales[: first_ok + 1] == [2.0**40 / 2**k for k in range(first_ok + 1)]
    losses = [h[2] for h in history[first_ok:]]
    assert losses[-1] < losses[0]
    # The loss op returns float32, so scales above float16's max (65504) are usable: the
    # scaled loss's gradient enters float16 only after the float32 loss backward.
    assert scales[first_ok] > 65504
