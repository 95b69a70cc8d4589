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
