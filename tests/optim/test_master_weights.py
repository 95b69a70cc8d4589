"""fs.amp on an optimizer: float32 master weights for pure half-precision training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding import optim
from fsharding.optim.master_weights import AmpState
from fsharding.precision import DynamicLossScale, Policy
from fsharding.transforms.amp import amp

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
PURE = Policy.parse("pure_bf16")


def test_updates_accumulate_in_float32():
    # SGD(lr=1) with bf16 grads -256, -1, +256: the param moves by +256, +1, -256.
    def run(tx):
        params = {"w": torch.zeros(3, dtype=BF16)}
        state = tx.init(params)
        for g in (-256.0, -1.0, 256.0):
            updates, state = tx.update({"w": torch.full((3,), g, dtype=BF16)}, state, params)
            params = optim.apply_updates(params, updates)
        return params["w"], state

    w, state = run(amp(optim.sgd(1.0), policy=PURE))
    assert torch.equal(w, torch.ones(3, dtype=BF16))
    assert state.master["w"].dtype == F32 and torch.equal(state.master["w"], torch.ones(3))
    w_plain, _ = run(optim.sgd(1.0))  # in bf16, 256 + 1 rounds to 256: the +1 is lost
    assert torch.equal(w_plain, torch.zeros(3, dtype=BF16))


def test_state_layout_and_errors():
    params = {"w": torch.randn(4, 3).to(BF16), "norm": torch.ones(3), "h": torch.ones(2, dtype=F16)}
    tx = amp(optim.adamw(1e-3), policy=PURE)
    state = tx.init(params)
    assert isinstance(state, AmpState)
    assert state.master["w"].dtype == F32 and state.master["h"].dtype == F32
    assert state.master["norm"] is None  # a float32 param is its own master
    assert torch.equal(state.master["w"], params["w"].float())
    adam_state = state.inner[0]
    assert adam_state.mu["w"].dtype == F32 and adam_state.nu["h"].dtype == F32
    with pytest.raises(ValueError, match=r"update: params are required"):
        tx.update(params, state)
    with pytest.raises(TypeError, match=r"state must be the AmpState returned by init"):
        tx.update(params, state.inner, params)
    with pytest.raises(ValueError, match=r"stores params in torch.bfloat16 but no params leaf"):
        tx.init({"w": torch.ones(2)})
    with pytest.raises(TypeError, match="fn_or_optimizer must be a function or an optim"):
        amp(object(), policy=PURE)
    assert amp(optim.sgd(0.1), policy="bf16").init({"w": torch.ones(2)}).master == {"w": None}


@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
    lr=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    dtype=st.sampled_from([BF16, F16]),
)
def test_updates_take_params_to_the_cast_master(shape, seed, lr, dtype):
    # Large learning rates move params across zero and by many binades: the edge cases.
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(shape, generator=g).to(dtype)}
    tx = amp(optim.sgd(lr, momentum=0.9), policy=Policy(dtype, dtype, dtype))
    state = tx.init(params)
    for _ in range(3):
        grads = {"w": torch.randn(shape, generator=g).to(dtype)}
        updates, state = tx.update(grads, state, params)
        p, u, want = params["w"], updates["w"], state.master["w"].to(dtype)
        assert u.dtype == F32
        # Exact when the sum is rounded once (optax's apply_updates: p + u, then cast) and
        # the float32 difference is exact: always unless |new| < 2**-12 |old|.
        once = (p + u).to(dtype)
        assert once.dtype == dtype
        stated = (want.float().abs() >= 2**-12 * p.float().abs()) | (want == 0)
        assert torch.equal(once[stated], want[stated])
        # optim.apply_updates adds with type promotion and rounds once: the same exactness.
        new = optim.apply_updates(params, updates)["w"]
        assert new.dtype == dtype
        assert torch.equal(new[stated], want[stated])
        new_ = optim.apply_updates_({"w": p.clone()}, updates)["w"]
        assert torch.equal(new_[stated], want[stated])
        params = {"w": want}


def _problem():
    torch.manual_seed(0)
    d, h, c, b = 16, 32, 8, 64
    params = {
        "w1": torch.randn(d, h) / d**0.5,
        "b1": torch.zeros(h),
        "g": torch.ones(h),
        "w2": torch.randn(h, c) / h**0.5,
    }
    x = torch.randn(b, d)
    batch = {"x": x, "y": (x @ torch.randn(d, c)).argmax(-1)}

    def loss_fn(p, batch):
        hid = F.layer_norm(torch.tanh(batch["x"] @ p["w1"] + p["b1"]), (h,), p["g"])
        return F.cross_entropy(hid @ p["w2"], batch["y"])

    return params, loss_fn, batch


def _train(step, params, batch, n, donate=False):
    params, state = step.init(params)
    losses = []
    for _ in range(n):
        params, state, m = step.step(params, state, batch, donate=donate)
        losses.append(float(m["loss"]))
    return params, state, losses, m


def _rel(a, b):
    fa = torch.cat([a[k].double().flatten() for k in sorted(a)])
    fb = torch.cat([b[k].double().flatten() for k in sorted(b)])
    return ((fa - fb).norm() / fb.norm()).item()


# Measured (40 adamw steps, lr 3e-3, loss 2.39 -> 0.62): final params rel. error vs float32
# training 3.0e-3 with master weights, 5.4e-2 without; max |loss difference| 7.1e-3 with,
# 3.4e-2 without.
def test_pure_bf16_with_master_weights_follows_float32_training():
    params, loss_fn, batch = _problem()
    n = 40
    tx = lambda: optim.adamw(3e-3, weight_decay=0.01)  # noqa: E731
    p32, _, l32, _ = _train(fs.train_step(fs.value_and_grad(loss_fn), tx()), params, batch, n)
    bf_loss = fs.value_and_grad(amp(loss_fn, policy=PURE))
    start = PURE.cast_to_param(params)
    pm, sm, lm, mm = _train(fs.train_step(bf_loss, amp(tx(), policy=PURE)), start, batch, n)
    pn, _, ln, _ = _train(fs.train_step(bf_loss, tx()), start, batch, n)

    assert all(p.dtype == BF16 for p in pm.values())
    assert l32[-1] < 0.5 * l32[0]
    assert max(abs(a - b) for a, b in zip(l32, lm)) < 2e-2
    assert _rel(pm, p32) < 1e-2
    # params are the masters cast to bf16 (apply_updates rounds once)
    for k in pm:
        cast = sm.master[k].to(BF16)
        tiny = cast.float().abs() < 2**-12 * pm[k].float().abs()  # the stated exception
        assert torch.equal(pm[k][~tiny], cast[~tiny])
    assert "lr" in mm and mm["lr"] == pytest.approx(3e-3)
    # without master weights, bf16 params drift: updates below half an ulp are lost
    assert _rel(pn, p32) > 10 * _rel(pm, p32)
    assert max(abs(a - b) for a, b in zip(l32, ln)) > 2 * max(abs(a - b) for a, b in zip(l32, lm))


def test_donation_gives_the_same_result_in_place():
    params, loss_fn, batch = _problem()
    step = fs.train_step(
        fs.value_and_grad(amp(loss_fn, policy=PURE)), amp(optim.adamw(1e-2), policy=PURE)
    )
    start = PURE.cast_to_param(params)
    p_ref, s_ref, _, _ = _train(step, start, batch, 3)
    p, s = step.init(fs.tree.map(torch.clone, start))
    master = s.master["w1"]
    for _ in range(3):
        p, s, _ = step.step(p, s, batch, donate=True)
    assert s.master["w1"] is master  # updated in place
    for a, b in zip(fs.tree.leaves((p, s)), fs.tree.leaves((p_ref, s_ref))):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_with_fp16_loss_scale_skips_keep_the_master():
    params, loss_fn, batch = _problem()
    policy = Policy.parse("p=f16,c=f16,o=f32")
    step = fs.train_step(
        fs.value_and_grad(amp(loss_fn, policy=policy)),
        amp(optim.adamw(1e-2), policy=policy),
        loss_scale=DynamicLossScale(2.0**12),
    )
    p, s = step.init(policy.cast_to_param(params))
    p, s, m = step.step(p, s, batch)
    assert not m["skipped"]
    bad = dict(batch, x=batch["x"].clone())
    bad["x"][0, 0] = float("nan")
    p2, s2, m2 = step.step(p, s, bad)
    assert m2["skipped"] and s2.opt is s.opt and p2 is p
    assert s2.loss_scale.loss_scale == 2.0**11
