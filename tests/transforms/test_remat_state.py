"""fs.remat and state: the recomputation never updates state a second time (BatchNorm
running stats, counters, caches and workspaces made outside the region), whatever the
policy, and the recompute-time guard is entered only where a write can happen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fsharding as fs
from fsharding.transforms import policies as P
from fsharding.transforms import remat as remat_module
from fsharding.transforms.remat import remat
from tests.transforms.test_remat import POLICIES, assert_bitwise, block, make, run


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin, self.bn = nn.Linear(d, d), nn.BatchNorm1d(d)

    def forward(self, x):
        return F.relu(self.bn(self.lin(x)))


class Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.b1, self.b2, self.head = Block(d), Block(d), nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.b2(self.b1(x)))


@pytest.mark.parametrize("policy", [None, P.dots_saveable])
def test_batchnorm_state_updates_once_through_functional_wrap(policy):
    torch.manual_seed(0)
    net = Net()
    apply, params, state = fs.functional(net, buffers="state", wrap={Block: remat(policy=policy)})
    apply0, _, _ = fs.functional(net, buffers="state")
    params = {k: v + 0.1 for k, v in params.items()}  # differ from the module's own
    x = torch.randn(8, 6)

    def loss(apply):
        def inner(p, s, x):
            out, new_state = apply(p, s, x)
            return out.square().mean(), new_state

        return inner

    (value, new_state), grads = fs.value_and_grad(loss(apply), has_aux=True)(params, state, x)
    (value0, new_state0), grads0 = fs.value_and_grad(loss(apply0), has_aux=True)(params, state, x)
    assert new_state["b1.bn.num_batches_tracked"].item() == 1
    assert_bitwise((value, new_state, grads), (value0, new_state0, grads0))


@pytest.mark.parametrize("name", ["nothing", "dots", "only_names"])
def test_recompute_never_writes_outside_state(name):
    # Closed-over state, made before the region or by its forward (a lazy module).
    counter, cache, w = torch.zeros(()), torch.zeros(4, 3), torch.randn(3, 3)
    bn, lazy = nn.BatchNorm1d(3), nn.LazyBatchNorm1d()

    def f(x):
        counter.add_(1)
        cache.copy_(x.detach())
        return (lazy(bn(x)) @ w).tanh().sum()

    x = torch.randn(4, 3, requires_grad=True)
    remat(f, policy=POLICIES[name])(x).backward()
    assert counter.item() == 1 and torch.equal(cache, x.detach())
    assert bn.num_batches_tracked.item() == lazy.num_batches_tracked.item() == 1


@pytest.mark.parametrize("name", ["nothing", "dots", "only_names"])
def test_a_write_only_the_recompute_makes_never_reaches_state(name):
    # The forward makes the value, only the recomputation writes it. Full remat redirects the
    # write; selective policies refuse the op (unseen in the forward) before it runs.
    state = {}

    def f(x):
        if "ema" in state:
            state["ema"].mul_(0.5)
        else:
            state["ema"] = x.detach().sum(0)
        return (x @ x.T).tanh().sum()

    x = torch.randn(3, 3, requires_grad=True)
    out = remat(f, policy=POLICIES[name])(x)
    ema = state["ema"].clone()
    if name == "nothing":
        out.backward()
        assert torch.equal(x.grad, fs.grad(lambda x: (x @ x.T).tanh().sum())(x.detach()))
    else:
        with pytest.raises(RuntimeError, match="not found in storage"):
            out.backward()
    assert torch.equal(state["ema"], ema)


def test_selective_recompute_is_guarded_only_after_a_forward_that_writes(monkeypatch):
    # The state guard (a dispatch mode) costs per op: under a selective policy it is left
    # out after a forward that wrote nothing in place. Values stay bitwise.
    seen, real = [], remat_module._RegionMode.__torch_dispatch__
    spy = lambda self, *a, **k: seen.append(self.forward) or real(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(remat_module._RegionMode, "__torch_dispatch__", spy)
    params, inputs = make(2, 3, 4)

    def guarded(name, p_drop=0.0):
        seen.clear()
        out = run(remat(block, policy=POLICIES[name]), params, inputs, p_drop=p_drop)
        assert_bitwise(out, run(block, params, inputs, p_drop=p_drop))
        return False in seen

    assert not any(guarded(n) for n in ("dots", "dots_no_batch", "only_names"))
    assert guarded("nothing") and guarded("offload")  # no forward mode to tell; replays
    assert guarded("dots", p_drop=0.5)  # dropout writes its mask in place


@pytest.mark.parametrize("name", ["nothing", "dots"])
def test_workspace_shared_by_regions_is_copied_on_write(name):
    # Two regions write and read one outside buffer. Recomputing the first must read its own
    # write, not what the second region left there.
    buf = torch.zeros(4)

    def region(x):
        buf.copy_(x.detach() * 3)
        return torch.tanh(x + buf)

    def f(x):
        return (region(region(x) * 2) ** 2).sum()

    x = torch.randn(4)
    ref = fs.grad(f)(x)
    buf.zero_()
    r = remat(region, policy=POLICIES[name])
    g = fs.grad(lambda x: (r(r(x) * 2) ** 2).sum())(x)
    assert torch.equal(g, ref)
    assert torch.equal(buf, (torch.tanh(x + 3 * x) * 2).detach() * 3)  # the forward's write


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("policy", [None, P.dots_saveable])
def test_functional_blocks_guard_only_when_their_state_was_written(train, policy, monkeypatch):
    # fs.functional knows a block's state (its buffers): full remat leaves the recompute
    # guard out when the forward did not write them (BatchNorm in eval mode), keeps it when
    # it did (training mode), and the state is updated exactly once either way.
    seen, real = [], remat_module._RegionMode.__torch_dispatch__
    spy = lambda self, *a, **k: seen.append(self.forward) or real(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(remat_module._RegionMode, "__torch_dispatch__", spy)
    torch.manual_seed(0)
    net = Net().train(train)
    apply, params, state = fs.functional(net, buffers="state", wrap={Block: remat(policy=policy)})
    apply0, _, _ = fs.functional(net, buffers="state")
    x = torch.randn(8, 6)

    def loss(apply):
        def inner(p, s, x):
            out, new_state = apply(p, s, x)
            return out.square().mean(), new_state

        return inner

    got = fs.value_and_grad(loss(apply), has_aux=True)(params, state, x)
    assert (False in seen) == train  # recompute-time ops seen only when state was written
    assert_bitwise(got, fs.value_and_grad(loss(apply0), has_aux=True)(params, state, x))
    assert got[0][1]["b1.bn.num_batches_tracked"].item() == int(train)


class Counting(nn.Module):
    """A block whose state is plain tensor attributes (not params, not buffers)."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = torch.zeros(())
        self.seen = [torch.zeros(4, d)]  # a cache in a list attribute
        self.inner = nn.Sequential(nn.Linear(d, d))
        self.inner.hits = torch.zeros((), dtype=torch.int64)  # on a submodule

    def forward(self, x):
        self.calls.add_(1)
        self.seen[0].copy_(x.detach())
        self.inner.hits += 1
        return torch.tanh(self.inner(self.lin(x)))


class CountingNet(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.b1, self.b2 = Counting(d), Counting(d)

    def forward(self, x):
        return self.b2(self.b1(x) * 2)


@pytest.mark.parametrize("name", ["nothing", "dots", "only_names"])
def test_plain_tensor_attributes_update_once_through_functional_wrap(name):
    # The block's state is neither a param nor a buffer: fs.functional cannot declare it as
    # such, yet the recomputation must not write it a second time (as fs.remat(fn) does not).
    torch.manual_seed(0)
    net = CountingNet()
    apply, params = fs.functional(net, wrap={Counting: remat(policy=POLICIES[name])})
    ref_apply, _ = fs.functional(CountingNet())
    x = torch.randn(4, 5)
    loss = lambda apply: lambda p, x: apply(p, x).square().sum()  # noqa: E731
    value, grads = fs.value_and_grad(loss(apply))(params, x)
    for b in (net.b1, net.b2):
        assert b.calls.item() == 1 and b.inner.hits.item() == 1
    assert torch.equal(net.b1.seen[0], x)  # the forward's write, not the recomputation's
    assert torch.equal(net.b2.seen[0], (torch.tanh(net.b1.inner(net.b1.lin(x))) * 2).detach())
    assert_bitwise((value, grads), fs.value_and_grad(loss(ref_apply))(params, x))


@pytest.mark.parametrize("name", ["dots", "only_names"])
def test_closure_state_updates_once_through_functional_wrap_selective(name):
    # A write to a tensor the block reaches by closure (no module attribute): selective
    # policies see every forward op, so the guard is on after a forward that wrote in place.
    total = torch.zeros(())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            total.add_(x.detach().sum())
            return self.lin(x).tanh()

    net = nn.Sequential(Block(), Block())
    apply, params = fs.functional(net, wrap={Block: remat(policy=POLICIES[name])})
    x = torch.randn(2, 3)
    fs.grad(lambda p: apply(p, x).sum())(params)
    h = net[0].lin(x).tanh().detach()
    assert torch.allclose(total, x.sum() + h.sum())


def test_functional_blocks_with_dropout_stay_unguarded_under_selective_policies(monkeypatch):
    # Dropout writes its own fresh mask in place (bernoulli_): no state, so the guard stays
    # out; a write to an outside tensor (test above) turns it on.
    from fsharding.models.gpt import GPT, Block, GPTConfig

    seen, real = [], remat_module._RegionMode.__torch_dispatch__
    spy = lambda self, *a, **k: seen.append(self.forward) or real(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(remat_module._RegionMode, "__torch_dispatch__", spy)
    model = GPT(GPTConfig.preset("tiny").with_(n_layers=2, dropout=0.3))
    apply, params = fs.functional(model, wrap={Block: remat(policy=P.dots_saveable)})
    plain, _ = fs.functional(model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))

    def run(apply):
        torch.manual_seed(7)
        return fs.value_and_grad(lambda p: apply(p, ids).square().mean())(params)

    got = run(apply)
    assert False not in seen
    assert_bitwise(got, run(plain))
