"""fs.train_step: the one-process Step against a plain PyTorch training loop."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsharding as fs
from fsharding import optim


class CountState(NamedTuple):
    count: int


def plain_sgd(lr: float) -> optim.GradientTransformation:
    """SGD written against the base interface only (independent of optim's aliases)."""

    def update(updates, state, params=None):
        return fs.tree.map(lambda g: -lr * g, updates), CountState(state.count + 1)

    return optim.GradientTransformation(lambda p: CountState(0), update)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(6, 4, generator=g, dtype=torch.float64),
            "y": torch.randint(0, 3, (6,), generator=g),
        }
        for _ in range(n)
    ]


def make_loss(apply):
    return lambda p, b: F.cross_entropy(apply(p, b["x"]), b["y"])


@pytest.mark.parametrize("donate", [False, True])
def test_train_step_equals_plain_pytorch_sgd(donate):
    model = mlp()
    ref = mlp()
    apply, params = fs.functional(model)
    step = fs.train_step(fs.value_and_grad(make_loss(apply)), plain_sgd(0.1))
    params, opt_state = step.init(params)
    params = {k: v.clone() for k, v in params.items()}  # donation must not touch the module
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for b in batches(10):
        before = {k: v.clone() for k, v in params.items()}
        new_params, opt_state, metrics = step.step(params, opt_state, b, donate=donate)
        torch_opt.zero_grad()
        loss = F.cross_entropy(ref(b["x"]), b["y"])
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        torch_opt.step()
        torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(metrics["grad_norm"], norm, rtol=1e-12, atol=0)
        if donate:  # the old params were reused in place
            assert all(new_params[k] is params[k] for k in params)
        else:  # the old params are untouched
            assert all(torch.equal(params[k], before[k]) for k in params)
        params = new_params
    for n, p in ref.named_parameters():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-12, atol=1e-14)
    assert opt_state.count == 10
    assert step.gather(params) is params


def test_train_step_with_adamw_equals_torch_adamw():
    model, ref = mlp(), mlp()
    apply, params = fs.functional(model)
    step = fs.train_step(
        fs.value_and_grad(make_loss(apply)),
        optim.adamw(optim.linear_schedule(1e-2, 1e-3, 20), b1=0.9, b2=0.95, weight_decay=0.1),
    )
    params, opt_state = step.init(params)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        torch_opt, lambda t: (1e-2 - 9e-3 * min(t, 20) / 20) / 1e-2
    )
    lrs = []
    for b in batches(20):
        params, opt_state, metrics = step.step(params, opt_state, b, donate=True)
        lrs.append(metrics["lr"])
        torch_opt.zero_grad()
        F.cross_entropy(ref(b["x"]), b["y"]).backward()
        torch_opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2) and lrs[10] == pytest.approx(5.5e-3)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-10, atol=1e-12)


def test_step_errors_name_paths():
    step = fs.train_step(fs.value_and_grad(lambda p, b: p["w"].sum()), plain_sgd(0.1))
    with pytest.raises(TypeError, match=r"\['n'\]"):
        step.init({"w": torch.ones(2), "n": torch.tensor(1)})
    bad = fs.train_step(lambda p, b: (p["w"].sum(), {"v": p["w"]}), plain_sgd(0.1))
    params, st = bad.init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"params and grads differ .*\['v'\]|\['w'\]"):
        bad.step(params, st, None)
    with pytest.raises(TypeError, match="GradientTransformation"):
        fs.train_step(lambda p, b: None, torch.optim.SGD)


class HalvingScale(NamedTuple):
    """A loss scale with jmp's interface (the real ones come with fs.amp)."""

    loss_scale: float

    def scale(self, t):
        return fs.tree.map(lambda x: x * self.loss_scale, t)

    def unscale(self, t):
        return fs.tree.map(lambda x: x / self.loss_scale, t)

    def adjust(self, finite):
        return self if bool(finite) else HalvingScale(self.loss_scale / 2)


def test_nonfinite_step_is_skipped_bit_identically():
    loss_fn = lambda p, b: (p["w"] * b).sum()
    step = fs.train_step(fs.value_and_grad(loss_fn), plain_sgd(0.1), loss_scale=HalvingScale(8.0))
    params, state = step.init({"w": torch.ones(3)})
    assert isinstance(state, fs.TrainState)
    p1, s1, m1 = step.step(params, state, torch.tensor([1.0, float("inf"), 2.0]))
    assert m1["skipped"] and p1["w"] is params["w"] and torch.equal(p1["w"], torch.ones(3))
    assert s1.opt is state.opt and s1.loss_scale.loss_scale == 4.0
    p2, s2, m2 = step.step(p1, s1, torch.ones(3))
    assert not m2["skipped"] and s2.opt.count == 1 and m2["loss_scale"] == 4.0
    torch.testing.assert_close(p2["w"], torch.full((3,), 0.9))


def aux_loss(apply):
    def f(p, b):
        logits = apply(p, b["x"])
        return F.cross_entropy(logits, b["y"]), {"logits": logits, "n": b["x"].shape[0]}

    return f


def test_has_aux_goes_to_metrics_aux_and_loss_stays_a_scalar():
    """aux in metrics["aux"] (stacked over microbatches under fs.accumulate, a skipped one
    a NaN row); loss a 0-dim tensor equal to plain PyTorch's."""
    model, ref = mlp(), mlp()
    apply, params = fs.functional(model)
    vg = fs.value_and_grad(aux_loss(apply), has_aux=True)
    b = batches(1)[0]
    want_logits = ref(b["x"]).detach()
    want_loss = F.cross_entropy(want_logits, b["y"])
    skip_second = lambda mb: float(mb["x"][0, 0] != b["x"][2, 0])  # noqa: E731
    cases = {
        "plain": vg,
        "accumulate": fs.accumulate(vg, steps=3),
        "weighted": fs.accumulate(vg, steps=3, weights=skip_second),
    }
    for name, gf in cases.items():
        step = fs.train_step(gf, plain_sgd(0.1))
        p, s = step.init({k: v.clone() for k, v in params.items()})
        p, s, m = step.step(p, s, b)
        assert isinstance(m["loss"], torch.Tensor) and m["loss"].dim() == 0, name
        if name != "weighted":
            assert float(m["loss"]) == pytest.approx(float(want_loss), rel=1e-12)
        aux = m["aux"]
        if name == "plain":
            torch.testing.assert_close(aux["logits"], want_logits, rtol=1e-12, atol=0)
            assert aux["n"] == 6
            continue
        # one row per microbatch along a new dim 0
        assert aux["logits"].shape == (3, 2, 3)
        want = want_logits.reshape(3, 2, 3)
        rows = [0, 2] if name == "weighted" else [0, 1, 2]
        torch.testing.assert_close(aux["logits"][rows], want[rows], rtol=1e-12, atol=0)
        if name == "weighted":  # microbatch 1 had weight 0: skipped, a NaN row
            assert torch.isnan(aux["logits"][1]).all() and aux["n"].tolist() == [2, 0, 2]
        else:
            assert aux["n"].tolist() == [2, 2, 2]


def test_loss_scale_number_is_a_static_scale():
    model = mlp()
    apply, params = fs.functional(model)
    vg = fs.value_and_grad(make_loss(apply))
    plain = fs.train_step(vg, plain_sgd(0.1))
    scaled = fs.train_step(vg, plain_sgd(0.1), loss_scale=1024.0)
    p0, s0 = plain.init({k: v.clone() for k, v in params.items()})
    p1, s1 = scaled.init({k: v.clone() for k, v in params.items()})
    assert s1.loss_scale == fs.StaticLossScale(1024.0)
    for b in batches(3):
        p0, s0, _ = plain.step(p0, s0, b)
        p1, s1, m = scaled.step(p1, s1, b)
        assert m["loss_scale"] == 1024.0 and m["skipped"] is False
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match=r"loss_scale must be .*fs\.StaticLossScale\(1024\.0\)"):
        fs.train_step(vg, plain_sgd(0.1), loss_scale="1024")
    with pytest.raises(TypeError, match=r"fs\.zero: loss_scale must be"):
        fs.zero(vg, plain_sgd(0.1), mesh=fs.Mesh(dp=1), stage=0, loss_scale=[2.0])


def test_init_with_a_module_says_to_pass_functional_params():
    model = mlp()
    vg = fs.value_and_grad(make_loss(fs.functional(model)[0]))
    for step, api in (
        (fs.train_step(vg, plain_sgd(0.1)), "fs.train_step.init"),
        (fs.zero(vg, plain_sgd(0.1), mesh=fs.Mesh(dp=1), stage=3), "fs.zero.init"),
    ):
        for bad, what in ((model, "nn.Module"), (model.parameters(), "iterator")):
            with pytest.raises(TypeError, match=rf"{api}: params is an? {what}") as e:
                step.init(bad)
            assert "apply, params = fs.functional(model)" in str(e.value)


def test_donated_step_updates_the_module_through_functional_params():
    """As documented: fs.functional's params alias the module's tensors, so a donated step
    (in place) updates the module; a non-donated one leaves it alone."""
    for donate in (False, True):
        model = mlp()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        apply, params = fs.functional(model)
        step = fs.train_step(fs.value_and_grad(make_loss(apply)), plain_sgd(0.1))
        p, s = step.init(params)
        p, s, _ = step.step(p, s, batches(1)[0], donate=donate)
        for k, v in model.state_dict().items():
            assert torch.equal(v, p[k] if donate else before[k]), (donate, k)
            assert not torch.equal(p[k], before[k])


def test_update_tail_skips_on_every_rank_when_reduce_all_says_so():
    """The one update tail (train_step, zero, pipeline): a step that some rank finds not
    finite (``reduce_all``'s MIN) returns params and state as given, the scale backed off,
    and runs no update; otherwise the step's ``update`` runs, once, and the state comes
    back in a TrainState with the scale adjusted."""
    from fsharding.step import update_tail

    tx = plain_sgd(0.1)
    params = {"w": torch.ones(2)}
    opt = tx.init(params)
    calls = []

    def update(grads, donate):
        calls.append((grads, donate))
        return {"w": params["w"] - 0.1 * grads["w"]}, opt

    scale = fs.DynamicLossScale(8.0)
    for others_finite, want_skip in ((0, True), (1, False)):
        grads = {"w": torch.ones(2)}
        p, s, m = update_tail(
            tx,
            params,
            opt,
            [grads],
            loss=torch.tensor(1.0),
            grad_norm=torch.tensor(2.0),
            loss_scale=scale,
            donate=True,
            reduce_all=lambda flag, x=others_finite: torch.minimum(flag, torch.tensor(x)),
            update=update,
        )
        assert list(m) == ["loss", "grad_norm", "loss_scale", "skipped"]
        assert m["skipped"] is want_skip and m["loss_scale"] == 8.0
        assert s.loss_scale == scale.adjust(not want_skip)
        if want_skip:
            assert p is params and s.opt is opt and not calls
        else:
            assert len(calls) == 1 and calls[0][0] is grads and calls[0][1] is True
            assert torch.equal(p["w"], torch.full((2,), 0.9))
    with pytest.raises(TypeError, match=r"fs\.train_step\.step: with loss_scale=, opt_state"):
        step = fs.train_step(fs.value_and_grad(lambda p, b: p["w"].sum()), tx, loss_scale=8.0)
        step.step(params, opt, None)


def test_grads_are_freed_before_the_new_params_are_allocated(monkeypatch):
    """Without donation the tail drops the grads once the optimizer has read them: they
    are gone when ``apply_updates`` allocates the new params (one grads-sized peak less)."""
    import weakref

    from fsharding.optim import base

    grads_alive = []
    alive_at_apply = []

    def grad_fn(p, b):
        g = {"w": torch.ones(3)}
        grads_alive.append(weakref.ref(g["w"]))
        return torch.tensor(1.0), g

    apply_updates = base.apply_updates

    def spy(params, updates):
        alive_at_apply.append(grads_alive[-1]() is not None)
        return apply_updates(params, updates)

    monkeypatch.setattr(base, "apply_updates", spy)
    step = fs.train_step(grad_fn, optim.sgd(0.1))
    p, s = step.init({"w": torch.zeros(3)})
    p, s, _ = step.step(p, s, None)
    assert alive_at_apply == [False]


def test_a_pipeline_grad_fn_takes_batch_inputs_targets_and_steps_like_its_composition():
    """fs.pipeline's f(params, inputs, targets) (a local mesh: every stage here) plugs into
    fs.train_step directly: batch = (inputs, targets); params, loss and norm equal the
    step on the unpipelined composition (float64); another batch raises a clear error."""
    g = torch.Generator().manual_seed(0)
    embed = lambda p, x: torch.tanh(x @ p["w"])  # noqa: E731
    head = lambda p, h: h @ p["v"]  # noqa: E731
    mse = lambda y, t: ((y - t) ** 2).mean()  # noqa: E731
    params = [
        {"w": torch.randn(3, 4, generator=g, dtype=torch.float64)},
        {"v": torch.randn(4, 2, generator=g, dtype=torch.float64)},
    ]
    x, t = (torch.randn(6, k, generator=g, dtype=torch.float64) for k in (3, 2))
    opt = optim.chain(optim.clip_by_global_norm(0.1), optim.sgd(0.5))
    f = fs.pipeline(
        [embed, head], mse, mesh=fs.Mesh(pp=1), virtual_stages=2, microbatches=2, schedule="gpipe"
    )
    step = fs.train_step(f, opt)
    composed = lambda ps, b: mse(head(ps[1], embed(ps[0], b[0])), b[1])  # noqa: E731
    ref = fs.train_step(fs.accumulate(fs.value_and_grad(composed), steps=2), opt)
    p, s = step.init(params)
    q, r = ref.init(params)
    for _ in range(3):
        p, s, m = step.step(p, s, (x, t))
        q, r, e = ref.step(q, r, (x, t))
        torch.testing.assert_close(m["loss"], e["loss"])
        torch.testing.assert_close(m["grad_norm"], e["grad_norm"])
        assert float(m["grad_norm"]) > 0.1  # the clip acts
    torch.testing.assert_close(p, q)
    with pytest.raises(TypeError, match=r"batch must be \(inputs, targets\).*got a dict"):
        step.step(p, s, {"x": x, "t": t})


def test_a_partitioned_grad_fn_counts_tied_copies_once_in_the_norm_and_the_clip():
    """A part holding a copy of a leaf another part counts (tied weights) marks it with
    ``copies``: grad_norm and clip_by_global_norm count it once, like the one shared
    weight of the unpartitioned model; without the mark it would count twice."""
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)

    def grad_fn(params, inputs, targets):  # "a" and its tied copy "b" get the summed grad
        return torch.tensor(0.0), {"a": g.clone(), "b": g.clone()}

    grad_fn.mesh, grad_fn.axis = fs.Mesh(pp=1), "pp"
    params = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(1.0))
    _, _, m = fs.train_step(grad_fn, opt).step(params, opt.init(params), (None, None))
    assert float(m["grad_norm"]) == pytest.approx(50**0.5)  # two leaves counted
    grad_fn.copies = lambda grads: [False, True]
    p, _, m = fs.train_step(grad_fn, opt).step(params, opt.init(params), (None, None))
    assert float(m["grad_norm"]) == pytest.approx(5.0)  # the weight once
    torch.testing.assert_close(p["a"], -g / 5.0)  # clipped by the shared weight's norm
    torch.testing.assert_close(p["b"], p["a"])  # the copies stay identical
    grad_fn.copies = lambda grads: [False]
    with pytest.raises(ValueError, match="1 flags for 2 grads leaves"):
        fs.train_step(grad_fn, opt).step(params, opt.init(params), (None, None))
