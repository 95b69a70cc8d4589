"""fs.functional, fs.value_and_grad, fs.grad against plain torch.autograd on the module."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fsharding as fs

# ----------------------------------------------------------------------------- helpers


def param_trees():
    shape = st.lists(st.integers(1, 4), min_size=0, max_size=3)
    leaf = shape.map(lambda s: torch.randn(tuple(s), dtype=torch.float64))
    return st.recursive(
        leaf,
        lambda sub: st.one_of(
            st.lists(sub, min_size=1, max_size=3),
            st.dictionaries(
                st.sampled_from(["w", "b", "blocks", "ln"]), sub, min_size=1, max_size=3
            ),
        ),
        max_leaves=6,
    )


def nonlinear(p):
    """A scalar that depends nonlinearly on every leaf (so every grad is distinctive)."""
    leaves = fs.tree.leaves(p)
    return sum((torch.sin(x) * (i + 1)).sum() + (x**2).sum() for i, x in enumerate(leaves))


def snapshot(t):
    return [(x.clone(), x._version, x.requires_grad, x.grad) for x in fs.tree.leaves(t)]


def assert_untouched(t, snap):
    for x, (v, ver, rg, g) in zip(fs.tree.leaves(t), snap):
        assert torch.equal(x, v) and x._version == ver and x.requires_grad == rg and x.grad is g


# ----------------------------------------------------------------------------- value_and_grad


@given(param_trees())
def test_value_and_grad_matches_autograd_on_nested_pytrees(p):
    snap = snapshot(p)
    loss, g = fs.value_and_grad(nonlinear)(p)
    assert_untouched(p, snap)
    leaves = [x.detach().clone().requires_grad_() for x in fs.tree.leaves(p)]
    ref = fs.tree.unflatten(fs.tree.structure(p), leaves)
    ref_loss = nonlinear(ref)
    ref_loss.backward()
    fs.tree.check_same_structure(p, g)
    assert torch.equal(loss, ref_loss.detach()) and not loss.requires_grad
    for x, gx in zip(leaves, fs.tree.leaves(g)):
        torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
        assert not gx.requires_grad


def test_tuple_argnums_and_has_aux():
    a, b, c = torch.randn(3), torch.randn(2, 3), torch.randn(2)

    def f(a, b, c):
        y = b @ a + c
        return (y**2).sum(), {"y": y}

    (loss, aux), (ga, gc) = fs.value_and_grad(f, argnums=(0, 2), has_aux=True)(a, b, c)
    ar, cr = a.clone().requires_grad_(), c.clone().requires_grad_()
    lr, _ = f(ar, b, cr)
    lr.backward()
    torch.testing.assert_close(ga, ar.grad)
    torch.testing.assert_close(gc, cr.grad)
    assert not aux["y"].requires_grad and torch.equal(loss, lr.detach())
    grads, aux2 = fs.grad(f, argnums=1, has_aux=True)(a, b, c)
    assert grads.shape == b.shape and torch.equal(aux2["y"], aux["y"])
    assert fs.grad(lambda x: (x**3).sum())(torch.tensor([2.0])).tolist() == [12.0]


def test_unused_leaf_gets_zeros_and_requires_grad_inputs_untouched():
    p = {"used": torch.randn(3, requires_grad=True), "unused": torch.randn(2)}
    snap = snapshot(p)
    _, g = fs.value_and_grad(lambda p: p["used"].sum())(p)
    assert torch.equal(g["unused"], torch.zeros(2)) and torch.equal(g["used"], torch.ones(3))
    assert_untouched(p, snap)


def test_errors_name_paths():
    with pytest.raises(TypeError, match=r"\['step'\].*torch.int64"):
        fs.value_and_grad(lambda p: p["w"].sum())({"w": torch.ones(2), "step": torch.tensor(3)})
    with pytest.raises(TypeError, match=r"\['n'\].*int"):
        fs.value_and_grad(lambda p: p["w"].sum())({"w": torch.ones(2), "n": 3})
    with pytest.raises(TypeError, match="scalar floating tensor"):
        fs.value_and_grad(lambda p: p["w"])({"w": torch.ones(2)})
    with pytest.raises(TypeError, match="has_aux=True requires"):
        fs.value_and_grad(lambda p: p.sum(), has_aux=True)(torch.ones(2))
    with pytest.raises(TypeError, match="argnums"):
        fs.value_and_grad(lambda p: p.sum(), argnums=1)(torch.ones(2))


class Scale:
    """A minimal loss scale (the real ones live in fs.DynamicLossScale & co)."""

    def __init__(self, s):
        self.s = s

    def scale(self, x):
        return fs.tree.map(lambda t: t * self.s, x)

    def unscale(self, x):
        return fs.tree.map(lambda t: t / self.s, x)


def test_loss_scale_keyword():
    p = {"w": torch.randn(4)}
    f = lambda p: (p["w"] ** 2).sum()
    loss, g = fs.value_and_grad(f)(p, loss_scale=Scale(1024.0))
    loss0, g0 = fs.value_and_grad(f)(p)
    assert torch.equal(loss, loss0) and torch.equal(g["w"], g0["w"])


# ----------------------------------------------------------------------------- functional


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mid = nn.Linear(5, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def test_functional_params_tied_once_share_storage_and_match_module():
    torch.manual_seed(1)
    m = Tied().double()
    apply, params = fs.functional(m)
    assert list(params) == [n for n, _ in m.named_parameters()]
    assert "head.weight" not in params
    for n, p in m.named_parameters():
        assert params[n].data_ptr() == p.data_ptr() and not params[n].requires_grad
    x = torch.randint(0, 7, (3, 4))
    loss_fn = lambda p, x: F.cross_entropy(apply(p, x).flatten(0, 1), x.flatten())
    loss, g = fs.value_and_grad(loss_fn)(params, x)
    ref = F.cross_entropy(m(x).flatten(0, 1), x.flatten())
    ref.backward()
    assert torch.equal(loss, ref.detach())
    for n, p in m.named_parameters():  # tied weight: summed gradient (emb + head use)
        torch.testing.assert_close(g[n], p.grad, rtol=1e-12, atol=1e-12)
    assert m.emb.weight.grad is not None  # from the reference backward only
    assert all(v.grad is None for v in params.values())


def test_tied_weights_follow_the_passed_value_by_either_name():
    """apply finds the ties once (torch's functional_call finds them per call): a value
    passed under either name reaches both uses, two different values for one tied weight
    raise as torch's tie_weights=True does, and the module keeps its own weights."""
    torch.manual_seed(1)
    m = Tied().double()
    apply, params = fs.functional(m)
    x = torch.randint(0, 7, (3, 4))
    w = torch.randn(7, 5, dtype=torch.float64)
    want = F.linear(torch.tanh(m.mid(F.embedding(x, w))), w).detach()
    by_first = apply({**params, "emb.weight": w}, x)
    rest = {k: v for k, v in params.items() if k != "emb.weight"}
    by_alias = apply({**rest, "head.weight": w}, x)
    assert torch.equal(by_first, want) and torch.equal(by_alias, want)
    with pytest.raises(ValueError, match="tied"):
        apply({**params, "head.weight": w}, x)
    assert m.head.weight is m.emb.weight and not torch.equal(m.emb.weight, w)


def test_apply_uses_passed_params_not_the_module_ones():
    m = nn.Linear(3, 2)
    apply, params = fs.functional(m)
    p2 = {k: torch.zeros_like(v) for k, v in params.items()}
    assert torch.equal(apply(p2, torch.randn(4, 3)), torch.zeros(4, 2))
    assert not torch.equal(m.weight, torch.zeros(2, 3))  # the module is untouched
    with pytest.raises(KeyError, match="not parameters of Linear"):
        apply({"weight": params["weight"], "nope": params["bias"]}, torch.randn(1, 3))


class InnerCheckpoint(nn.Module):
    """Checkpoints a closure over module attributes: the trap of DESIGN.md."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = cp.checkpoint(lambda x: torch.tanh(self.a(x)), x, use_reentrant=False)
        return self.b(h).sum()


def test_checkpoint_inside_module_uses_passed_params_in_backward():
    torch.manual_seed(0)
    m = InnerCheckpoint().double()
    apply, params = fs.functional(m)
    p2 = {k: v + 0.5 for k, v in params.items()}  # an out-of-place update
    x = torch.randn(5, 4, dtype=torch.float64)
    _, g = fs.value_and_grad(apply)(p2, x)
    ref = InnerCheckpoint().double()
    ref.load_state_dict(p2)
    ref(x).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=1e-12, atol=1e-12)
    # ... and the module's own parameters are back in place after backward.
    assert m.a.weight is dict(m.named_parameters())["a.weight"]
    assert torch.equal(m.a.weight, params["a.weight"])


def test_huggingface_gpt2_with_gradient_checkpointing_and_perturbed_params():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = GPT2LMHeadModel(cfg).double().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    apply, params = fs.functional(model)
    g_ = torch.Generator().manual_seed(1)
    p2 = {
        k: v + 0.05 * torch.randn(v.shape, generator=g_, dtype=v.dtype) for k, v in params.items()
    }
    x = torch.randint(0, 64, (2, 8), generator=g_)
    loss, g = fs.value_and_grad(lambda p, x: apply(p, input_ids=x, labels=x).loss)(p2, x)

    ref = GPT2LMHeadModel(cfg).double().train()  # no checkpointing, perturbed weights loaded
    ref.load_state_dict(p2, strict=False)
    out = ref(input_ids=x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-12, atol=0)
    err = max((g[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    assert err < 1e-10, err


def test_frozen_buffers_raise_on_update_and_leave_module_intact():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    apply, params = fs.functional(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="buffers='state'"):
        apply(params, torch.randn(8, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    m.eval()
    torch.testing.assert_close(apply(params, torch.ones(2, 3)), m(torch.ones(2, 3)))


def test_state_buffers_thread_through_and_match_module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    apply, params, state = fs.functional(m, buffers="state")
    assert set(state) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    x = torch.randn(8, 3, dtype=torch.float64)
    snap = {k: v.clone() for k, v in state.items()}
    out, new_state = apply(params, state, x)
    for k in state:
        assert torch.equal(state[k], snap[k])  # input state never mutated
    ref = m(x)
    torch.testing.assert_close(out, ref)
    for k, v in m.state_dict().items():
        if k in new_state:
            torch.testing.assert_close(new_state[k], v)
    assert int(new_state["1.num_batches_tracked"]) == 1
    _, g = fs.value_and_grad(lambda p: apply(p, state, x)[0].sum())(params)
    assert set(g) == set(params)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self, d=4, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x).sum()


def recording(log):
    """A transform that records the block params it receives and scales nothing."""

    def transform(block_apply):
        def run(block_params, *args):
            log.append(sorted(block_params))
            return block_apply(block_params, *args)

        return run

    return transform


@pytest.mark.parametrize("form", ["mapping", "callable"])
def test_wrap_passes_block_params_explicitly_and_keeps_grads(form):
    torch.manual_seed(0)
    m = Net().double()
    log: list = []
    wrap = (
        {Block: recording(log)}
        if form == "mapping"
        else (lambda name, sub: recording(log) if isinstance(sub, Block) else None)
    )
    apply_w, params = fs.functional(m, wrap=wrap)
    apply, _ = fs.functional(m)
    p2 = {k: v * 1.5 for k, v in params.items()}
    x = torch.randn(5, 4, dtype=torch.float64)
    lw, gw = fs.value_and_grad(apply_w)(p2, x)
    lp, gp = fs.value_and_grad(apply)(p2, x)
    assert log == [["fc.bias", "fc.weight"]] * 3
    assert torch.equal(lw, lp)
    for k in gp:
        torch.testing.assert_close(gw[k], gp[k], rtol=0, atol=0)
    assert "forward" not in m.blocks[0].__dict__  # patches removed after apply


def test_wrap_callable_may_select_nested_modules():
    m = Net().double()
    log: list = []
    apply_w, params = fs.functional(
        m, wrap=lambda n, s: recording(log) if "blocks.0" in n else None
    )
    apply, _ = fs.functional(m)
    x = torch.randn(2, 4, dtype=torch.float64)
    _, gw = fs.value_and_grad(apply_w)(params, x)
    _, gp = fs.value_and_grad(apply)(params, x)
    assert log == [["fc.bias", "fc.weight"], ["bias", "weight"]]  # blocks.0, then blocks.0.fc
    for k in gp:
        torch.testing.assert_close(gw[k], gp[k], rtol=0, atol=0)


def test_wrap_transform_changes_the_block():
    """Proof that wrap really routes the block through the transform."""
    m = Net().double()
    zero_blocks = lambda block_apply: lambda bp, x: x  # skip the block entirely
    apply_w, params = fs.functional(m, wrap={Block: zero_blocks})
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(apply_w(params, x), m.out(x).sum())


def test_functional_argument_errors():
    with pytest.raises(ValueError, match="buffers must be 'frozen' or 'state'"):
        fs.functional(nn.Linear(2, 2), buffers="mutable")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fs.functional(lambda x: x)
    with pytest.raises(ValueError, match="wrap must map module classes"):
        fs.functional(Net(), wrap={"Block": lambda f: f})


# ----------------------------------------------------------------------------- issue 9


def test_apply_missing_param_keys_raise_naming_the_paths():
    """Point 5: a missing key used to run the module's own tensor silently (no grad)."""
    torch.manual_seed(0)
    m = Tied()
    apply, params = fs.functional(m)
    x = torch.randint(0, 7, (2, 3))
    partial = {k: v for k, v in params.items() if k != "mid.bias"}
    with pytest.raises(KeyError, match=r"missing.*\['mid.bias'\]"):
        apply(partial, x)
    with pytest.raises(KeyError, match=r"\['emb.weight'\]"):  # the tied weight, by its name
        apply({k: v for k, v in params.items() if k != "emb.weight"}, x)
    # the tie's other name is accepted in place of the first one
    alias = {("head.weight" if k == "emb.weight" else k): v for k, v in params.items()}
    torch.testing.assert_close(apply(alias, x), apply(params, x))
    # a typo is an unknown key, with the closest real name suggested
    typo = {("mid.bais" if k == "mid.bias" else k): v for k, v in params.items()}
    with pytest.raises(KeyError, match=r"mid\.bais.*did you mean.*mid\.bias"):
        apply(typo, x)
    with pytest.raises(KeyError, match="buffer"):
        bn = nn.BatchNorm1d(3).eval()
        apply_bn, p_bn = fs.functional(bn)
        apply_bn({**p_bn, "running_mean": torch.zeros(3)}, torch.ones(2, 3))
    # ... and the full dict still works after an error (the key check is cached by key tuple)
    apply(params, x)
    apply(dict(params), x)


class Rope(nn.Module):
    """A submodule whose non-persistent buffer is computed in __init__ (as rotary tables)."""

    def __init__(self, d, *, reset=True):
        super().__init__()
        self.d = d
        self.register_buffer("inv_freq", self._compute(), persistent=False)
        if not reset:
            self.reset_parameters = None

    def _compute(self, device=None):
        return 1.0 / (10.0 ** (torch.arange(0, self.d, 2, device=device).double() / self.d))

    def reset_parameters(self):
        self.inv_freq.copy_(self._compute())

    def forward(self, x):
        return torch.cat([torch.sin(x[..., ::2] * self.inv_freq), torch.cos(x[..., 1::2])], -1)


class RopeNet(nn.Module):
    def __init__(self, reset=True):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rope = Rope(4, reset=reset)
        self.bn = nn.BatchNorm1d(4)  # persistent buffers (running stats)

    def forward(self, x):
        return self.bn(self.rope(self.fc(x))).sum()


def bn_buffers(m):
    return {k: v for k, v in m.state_dict().items() if k.startswith("bn.")}


def test_meta_built_module_buffers_are_materialised_for_apply():
    """Point 12: non-persistent buffers left on meta by meta-device construction are
    recomputed (on the params' device) through the owner's reset_parameters; the module is
    not modified. Persistent ones (checkpoint values) raise until loaded."""
    torch.manual_seed(0)
    ref = RopeNet().double().train()
    ref(torch.randn(8, 4, dtype=torch.float64))  # running stats away from their init
    ref.eval()
    with torch.device("meta"):
        m = RopeNet().double().eval()
    apply, params = fs.functional(m)
    real = {k: v.clone() for k, v in ref.named_parameters()}
    with pytest.raises(RuntimeError, match=r"\['bn.running_mean'\].*persistent.*assign=True"):
        apply(real, torch.ones(2, 4, dtype=torch.float64))
    m.load_state_dict(bn_buffers(ref), strict=False, assign=True)
    apply, params = fs.functional(m)
    x = torch.randn(3, 4, dtype=torch.float64)
    loss, g = fs.value_and_grad(apply)(real, x)
    ref(x).backward()
    torch.testing.assert_close(loss, ref(x).detach(), rtol=0, atol=0)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g[n], p.grad, rtol=0, atol=0)
    assert m.rope.inv_freq.is_meta  # the module itself is not modified
    # buffers="state": the meta state entries are materialised the same way
    apply_s, params_s, state = fs.functional(m, buffers="state")
    out, new_state = apply_s(real, state, x)
    torch.testing.assert_close(out, ref(x))
    torch.testing.assert_close(new_state["rope.inv_freq"], ref.rope.inv_freq)
    assert not any(v.is_meta for v in new_state.values())


def test_meta_built_module_with_persistent_buffers_passed_in_state_runs():
    """buffers='state': the persistent buffers the error message says to pass in state are
    used; only the buffers still on meta (non-persistent inv_freq) are recomputed. Before,
    apply raised about bn.running_mean even though state held it."""
    torch.manual_seed(0)
    ref = RopeNet().double().train()
    ref(torch.randn(8, 4, dtype=torch.float64))
    ref.eval()
    with torch.device("meta"):
        m = RopeNet().double().eval()
    apply, params, state = fs.functional(m, buffers="state")
    assert state["bn.running_mean"].is_meta and state["rope.inv_freq"].is_meta
    bn_state = {k: v.clone() for k, v in ref.named_buffers() if k.startswith("bn.")}
    state = {**state, **bn_state}
    real = {k: v.clone() for k, v in ref.named_parameters()}
    x = torch.randn(3, 4, dtype=torch.float64)
    out, new_state = apply(real, state, x)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(new_state["rope.inv_freq"], ref.rope.inv_freq, rtol=0, atol=0)
    for k, v in bn_state.items():
        assert torch.equal(new_state[k], v), k
    # a persistent buffer still on meta in state raises, naming only that one
    state2 = {**state, "bn.running_var": torch.empty(4, device="meta", dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=r"\['bn.running_var'\] of RopeNet.*persistent"):
        apply(real, state2, x)


def test_meta_buffers_without_a_recipe_raise_naming_them():
    with torch.device("meta"):
        m = RopeNet(reset=False)
    m.load_state_dict(bn_buffers(RopeNet()), strict=False, assign=True)
    apply, params = fs.functional(m)
    real = {k: torch.zeros(v.shape) for k, v in params.items()}
    with pytest.raises(RuntimeError, match=r"\['rope.inv_freq'\].*meta.*reset_parameters"):
        apply(real, torch.ones(2, 4))


def test_module_moved_to_meta_after_functional_keeps_its_buffers():
    """fs.zero's docstring: model.to('meta') after init frees the module; apply must still
    see the buffer values the module had (not re-initialised ones)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    m.train()
    m(torch.randn(16, 3, dtype=torch.float64))  # running stats move away from their init
    m.eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    want = m(x)
    apply, params = fs.functional(m)
    params = {k: v.clone() for k, v in params.items()}
    m.to("meta")
    torch.testing.assert_close(apply(params, x), want, rtol=0, atol=0)


def test_donation_updates_the_module_in_place_a_plain_step_never_writes_it():
    """Point 11: fs.functional's params alias the module's tensors (documented)."""
    from fsharding import optim

    assert "donate=True" in fs.functional.__doc__
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    versions = {k: v._version for k, v in m.named_parameters()}
    apply, params = fs.functional(m)
    loss_fn = lambda p, b: ((apply(p, b) - 1.0) ** 2).mean()
    step = fs.train_step(fs.value_and_grad(loss_fn), optim.sgd(0.1))
    p, s = step.init(params)
    b = torch.randn(4, 3)
    p1, s, _ = step.step(p, s, b)
    for k, v in m.named_parameters():  # a non-donated step never writes the module
        assert torch.equal(v, before[k]) and v._version == versions[k]
    assert not torch.equal(p1["weight"], before["weight"])
    p2, s, _ = step.step(p, s, b, donate=True)  # the same update, donated
    for k, v in m.named_parameters():  # the module sees the trained weights, same storage
        assert torch.equal(v, p1[k]) and v.data_ptr() == p2[k].data_ptr()


def test_value_and_grad_and_grad_of_a_module_point_to_functional():
    m = nn.Linear(2, 1)
    for api, t in (("fs.value_and_grad", fs.value_and_grad), ("fs.grad", fs.grad)):
        with pytest.raises(TypeError, match=rf"{api}.*Linear.*fs\.functional"):
            t(m)


def test_wrap_mapping_with_unmatched_classes_warns_and_raises_only_if_none_match():
    """A mapping shared across model families ({GPT2Block: remat, LlamaDecoderLayer:
    remat}) is fine: classes that match nothing warn (named); only a mapping where no
    class matches anything raises."""
    log: list = []
    with pytest.warns(UserWarning, match=r"Tied.*matches no submodule of Net"):
        apply, params = fs.functional(Net(), wrap={Block: recording(log), Tied: recording([])})
    apply(params, torch.randn(2, 4))
    assert log  # the matching entry still wraps its blocks
    with pytest.raises(ValueError, match=r"Tied, Conv1d match no submodule.*Block"):
        fs.functional(Net(), wrap={Tied: recording([]), nn.Conv1d: recording([])})
    with pytest.raises(ValueError, match="selected no submodule"):
        fs.functional(Net(), wrap=lambda n, s: None)


def test_loss_scale_number_is_a_static_scale():
    from fsharding.precision import StaticLossScale

    p = {"w": torch.randn(4, dtype=torch.float64)}
    f = lambda p: (p["w"] ** 3).sum()
    loss, g = fs.value_and_grad(f)(p, loss_scale=1024.0)
    loss_s, g_s = fs.value_and_grad(f)(p, loss_scale=StaticLossScale(1024.0))
    assert torch.equal(loss, loss_s) and torch.equal(g["w"], g_s["w"])
    torch.testing.assert_close(g["w"], 3 * p["w"] ** 2)
    assert torch.equal(fs.grad(f)(p, loss_scale=8)["w"], g_s["w"])
    with pytest.raises(TypeError, match=r"loss_scale.*StaticLossScale"):
        fs.value_and_grad(f)(p, loss_scale="1024")
    with pytest.raises(ValueError, match="positive"):
        fs.value_and_grad(f)(p, loss_scale=-1.0)


# ------------------------------------------------------- KV caches updated in place (remat)


def roll_cache():
    """A Hugging Face ``Cache`` whose state is written in place (``copy_``), as
    StaticCache / StaticSlidingWindowLayer do."""
    from transformers.cache_utils import Cache

    class RollCache(Cache):
        def __init__(self):
            self.state = torch.arange(4.0, dtype=torch.float64)

        def update(self, x):
            new = torch.cat([self.state[1:], x.detach().sum(0, keepdim=True)[:, 0]])
            self.state.copy_(new)
            return self.state.clone()

    return RollCache()


class CacheBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x, cache=None):
        return torch.tanh(self.lin(x) * cache.update(x))


class CacheNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.ModuleList([CacheBlock(), CacheBlock()])

    def forward(self, x, cache):
        for blk in self.b:
            x = blk(x, cache=cache)
        return x.sum()


def test_remat_with_a_cache_updated_in_place_raises_instead_of_wrong_grads():
    """The recomputation must start from the cache as the block saw it; a cache written in
    place (StaticCache's index_copy_) has lost that state: a clear error, never the wrong
    grads (they differed by 2.08 before) nor a second update of the cache."""
    torch.manual_seed(0)
    m = CacheNet()
    x = torch.randn(3, 4, dtype=torch.float64)
    apply, params = fs.functional(m)
    cache = roll_cache()
    loss, g_ref = fs.value_and_grad(lambda p: apply(p, x, cache))(params)
    want_state = cache.state.clone()
    # no recomputation (a transform that runs the block once): in-place caches are fine
    apply_a, _ = fs.functional(m, wrap={CacheBlock: lambda f: f})
    cache = roll_cache()
    loss_a, g_a = fs.value_and_grad(lambda p: apply_a(p, x, cache))(params)
    assert torch.equal(loss_a, loss) and torch.equal(cache.state, want_state)
    for k in g_ref:
        assert torch.equal(g_a[k], g_ref[k]), k
    # remat recomputes: the cache's entry state is gone, so it raises
    apply_r, _ = fs.functional(m, wrap={CacheBlock: fs.remat()})
    cache = roll_cache()
    with pytest.raises(RuntimeError, match=r"RollCache.*in place.*DynamicCache.*use_cache=False"):
        fs.value_and_grad(lambda p: apply_r(p, x, cache))(params)
    assert torch.equal(cache.state, want_state)  # updated once, by the forward
