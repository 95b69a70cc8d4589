"""fs.remat / fs.checkpoint_name: same values and grads as the plain function (bitwise,
float32 CPU, dropout included) for every policy, and proof that each policy changed what
backward keeps."""

from __future__ import annotations

import collections
import functools
import gc
import types

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

import fsharding as fs
from fsharding.introspect import saved_activations
from fsharding.transforms import policies as P
from fsharding.transforms.remat import checkpoint_name, in_remat, remat

POLICIES = {
    "default": None,
    "everything": P.everything_saveable,
    "nothing": P.nothing_saveable,
    "dots": P.dots_saveable,
    "dots_no_batch": P.dots_with_no_batch_dims_saveable,
    "only_names": P.save_only_these_names("q", "mlp"),
    "names_but": P.save_any_names_but_these("q"),
    "offload": P.save_and_offload_only_these_names(
        names_which_can_be_saved=["q"], names_which_can_be_offloaded=["attn", "mlp"]
    ),
}


def block(params, inputs, *, heads=2, p_drop=0.0, sdpa=False):
    """A pre-LN transformer block over pytree arguments, with named values and dropout."""
    x, (scale,) = inputs["x"], inputs["extra"]
    a, m = params["attn"], params["mlp"]
    h = F.layer_norm(x, x.shape[-1:])
    q = checkpoint_name(h @ a["wq"], "q")
    k, v = h @ a["wk"], h @ a["wv"]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    if sdpa:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
    else:
        s = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        o = F.dropout(s, p_drop) @ v
    o = checkpoint_name(o.transpose(1, 2).flatten(-2), "attn")
    x = x + F.linear(o, a["wo"])
    u = checkpoint_name(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:]), m[0], m[1])), "mlp")
    x = x + F.dropout(u @ m[2], p_drop)
    return (x * scale).square().mean()


def make(batch, seq, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    params = {
        "attn": {"wq": r(dim, dim), "wk": r(dim, dim), "wv": r(dim, dim), "wo": r(dim, dim)},
        "mlp": [r(2 * dim, dim), r(2 * dim), r(2 * dim, dim)],
    }
    inputs = {"x": r(batch, seq, dim), "extra": (r(dim).exp(),)}
    return params, inputs


def run(fn, params, inputs, **kw):
    torch.manual_seed(1234)
    return fs.value_and_grad(fn, argnums=(0, 1))(params, inputs, **kw)


def assert_bitwise(a, b):
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(la, lb):
        assert torch.equal(x, y), (x - y).abs().max()


@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([2, 4]),
    p_drop=st.sampled_from([0.0, 0.3]),
    sdpa=st.booleans(),
)
def test_every_policy_is_bitwise_the_plain_function(batch, seq, heads, head_dim, p_drop, sdpa):
    params, inputs = make(batch, seq, heads * head_dim)
    kw = dict(heads=heads, p_drop=p_drop, sdpa=sdpa)
    ref = run(block, params, inputs, **kw)
    for policy in POLICIES.values():
        assert_bitwise(run(remat(block, policy=policy), params, inputs, **kw), ref)


@given(n=st.integers(1, 5), dims=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_mlp_with_pytree_output_and_kwargs(n, dims):
    g = torch.Generator().manual_seed(n)
    ws = [torch.randn(a, b, generator=g) for a, b in zip([4, *dims], [*dims, 3])]
    x = torch.randn(n, 4, generator=g)

    def mlp(ws, x, *, act=torch.tanh):
        hs = []
        for w in ws:
            x = F.dropout(act(x @ w), 0.25)
            hs.append(x)
        return {"out": x, "hidden": tuple(hs)}

    def loss(f):
        def inner(ws, x):
            out = f(ws, x=x, act=torch.sigmoid)
            return out["out"].sum() + sum(h.square().sum() for h in out["hidden"])

        return inner

    torch.manual_seed(5)
    ref = fs.value_and_grad(loss(mlp), argnums=(0, 1))(ws, x)
    for policy in POLICIES.values():
        torch.manual_seed(5)
        assert_bitwise(
            fs.value_and_grad(loss(remat(mlp, policy=policy)), argnums=(0, 1))(ws, x), ref
        )


def test_outputs_pytree_values_equal_and_untouched_inputs():
    params, inputs = make(2, 3, 4)
    before = optree.tree_map(torch.clone, (params, inputs))
    f = lambda p, i: {"a": i["x"] @ p["attn"]["wq"], "b": [i["x"].sin()]}  # noqa: E731
    assert_bitwise(remat(f)(params, inputs), f(params, inputs))
    assert_bitwise((params, inputs), before)


# ----------------------------------------------------------------------------------------
# it did something
# ----------------------------------------------------------------------------------------


def toy(batch=8, seq=64, dim=128):
    return make(batch, seq, dim, seed=3)


def test_saved_bytes_per_policy_on_a_toy_block():
    params, inputs = toy()
    saved = {}
    for name, policy in POLICIES.items():
        f = functools.partial(remat(block, policy=policy), heads=4)
        saved[name] = saved_activations(f, params, inputs).saved_bytes
    plain = saved_activations(functools.partial(block, heads=4), params, inputs).saved_bytes
    x_bytes = inputs["x"].nbytes + inputs["extra"][0].nbytes
    assert saved["everything"] == plain
    assert plain > saved["dots"] > saved["dots_no_batch"] > saved["nothing"]
    assert saved["default"] == saved["nothing"] == x_bytes  # only the region's inputs
    # Named values: exactly the named tensors on top of the inputs.
    q, mlp = 8 * 64 * 128 * 4, 8 * 64 * 256 * 4
    assert saved["only_names"] == x_bytes + q + mlp
    assert saved["names_but"] == x_bytes + 8 * 64 * 128 * 4 + mlp  # attn and mlp
    assert saved["offload"] == x_bytes + q


def _live_after_forward(fn, *args):
    """Independent measurement: bytes of storages created during the forward and still alive
    after it (the output excluded) — what backward really keeps, however it keeps it."""

    class Alloc(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in optree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st_ = t.untyped_storage()
                    self.refs.append((StorageWeakRef(st_), st_.nbytes(), st_.data_ptr()))
            return out

    args = optree.tree_map(lambda t: t.detach().requires_grad_(), args)
    old = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(args)}
    with Alloc() as mode:
        out = fn(*args)
    gc.collect()
    old.add(out.untyped_storage().data_ptr())
    alive = {p: n for r, n, p in mode.refs if not r.expired() and p not in old}
    return sum(alive.values())


@pytest.mark.parametrize("name", ["nothing", "dots", "dots_no_batch", "only_names", "offload"])
def test_report_matches_memory_really_kept(name):
    params, inputs = make(2, 16, 16)
    f = remat(block, policy=POLICIES[name])
    report = saved_activations(f, params, inputs)
    kept = sum(
        e.nbytes for e in report.entries if e.kind == "activation" and e.status != "recomputed"
    )
    assert _live_after_forward(f, params, inputs) == kept
    if name == "nothing":
        assert kept == 0


def test_recomputes_each_backward():
    calls = []

    def f(x):
        calls.append(in_remat())
        return x.sin().sin().sum()

    x = torch.randn(3, requires_grad=True)
    for policy, n in [(None, 2), (P.dots_saveable, 2), (P.everything_saveable, 1)]:
        calls.clear()
        remat(f, policy=policy)(x).backward()
        assert len(calls) == n
        assert all(calls) == (n == 2)  # True inside the region, forward and recompute
    calls.clear()
    with torch.no_grad():
        remat(f)(x)
    assert len(calls) == 1
    assert not in_remat()


def test_offloaded_value_leaves_its_device_storage():
    x = torch.randn(64, 64, requires_grad=True)
    refs = {}

    def f(x):
        h = checkpoint_name(torch.tanh(x @ x), "h")
        refs.setdefault(len(refs), StorageWeakRef(h.untyped_storage()))
        return h.sin().sum()

    def storage_kept(policy):
        refs.clear()
        out = remat(f, policy=policy)(x)
        gc.collect()
        alive = not refs[0].expired()
        out.backward()
        return alive

    saving = P.save_and_offload_only_these_names(
        names_which_can_be_saved=["h"], names_which_can_be_offloaded=[]
    )
    offloading = P.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["h"]
    )
    assert storage_kept(saving) is True
    g_save = x.grad.clone()
    x.grad = None
    assert storage_kept(offloading) is False  # only the host copy remains
    assert torch.equal(x.grad, g_save)
    report = saved_activations(remat(f, policy=offloading), x)
    assert report.offloaded_bytes == 64 * 64 * 4
    assert [e.op for e in report.entries if e.status == "offloaded"] == ["checkpoint_name[h]"]


def test_region_inputs_are_saved_through_saved_tensor_hooks():
    # What offload(remat(f)) relies on: every tensor leaf of the pytree arguments is packed
    # by an outer saved-tensor hook (and nothing from inside the region is).
    params, inputs = make(2, 3, 4)
    leaves = optree.tree_map(lambda t: t.detach().requires_grad_(), (params, inputs))
    packed = []

    def pack(t):
        if t.numel():  # torch <= 2.11's checkpoint also saves an empty placeholder tensor
            packed.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        remat(block)(*leaves)
    expected = {t.untyped_storage().data_ptr() for t in optree.tree_leaves(leaves)}
    assert set(packed) == expected


# ----------------------------------------------------------------------------------------
# state, precision, nesting, modules
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["remat(amp)", "amp(remat)"])
def test_amp_recomputes_in_the_forward_precision(order):
    from fsharding.transforms.amp import amp

    def f(p, x):
        h = F.layer_norm(x @ p["w"], (8,))
        return F.softmax(h @ p["v"], -1).square().sum()

    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(8, 8, generator=g), "v": torch.randn(8, 8, generator=g)}
    x = torch.randn(4, 8, generator=g)
    composed = remat(amp(f)) if order == "remat(amp)" else amp(remat(f, policy=P.dots_saveable))
    assert_bitwise(fs.value_and_grad(composed)(p, x), fs.value_and_grad(amp(f))(p, x))


def test_autocast_inside_the_region():
    def f(w, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (x @ w).float().tanh().sum()

    w, x = torch.randn(8, 8), torch.randn(4, 8)
    assert_bitwise(fs.value_and_grad(remat(f))(w, x), fs.value_and_grad(f)(w, x))


def test_nested_remat():
    inner = remat(lambda w, x: torch.tanh(x @ w), policy=P.dots_saveable)
    outer = remat(lambda w, x: inner(w, inner(w, x)).sum())
    plain = lambda w, x: torch.tanh(torch.tanh(x @ w) @ w).sum()  # noqa: E731
    w, x = torch.randn(5, 5), torch.randn(3, 5)
    assert_bitwise(fs.value_and_grad(outer, (0, 1))(w, x), fs.value_and_grad(plain, (0, 1))(w, x))


@pytest.mark.parametrize("policy", [P.nothing_saveable, P.dots_saveable])
def test_a_huggingface_layer_updating_its_kv_cache(policy):
    """fs.remat directly around a Hugging Face layer called with use_cache=True (issue 9's
    point 13 without fs.functional): the forward updates the DynamicCache once, the
    recomputation runs on the cache as the layer saw it (it failed in backward before);
    values and grads (input and layer params) are those of the plain layer."""
    from transformers import GPT2Config
    from transformers.cache_utils import DynamicCache
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    cfg = GPT2Config(n_embd=16, n_head=2, n_positions=16, resid_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    layer = GPT2Block(cfg, layer_idx=0).double()
    past = torch.randn(2, 3, 16, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)

    def block(h, cache):
        out = layer(h, cache=cache, use_cache=True)
        return out[0] if isinstance(out, tuple) else out

    def run(fn):
        cache = DynamicCache()
        with torch.no_grad():
            block(past, cache)  # a cache that already holds 3 positions
        h = x.clone().requires_grad_(True)
        out = fn(h, cache)
        (out * out).sum().backward()
        grads = [h.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads, cache

    want, want_grads, want_cache = run(block)
    got, got_grads, cache = run(remat(block, policy=policy))
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert cache.get_seq_length() == 3 + 5 == want_cache.get_seq_length()  # updated once
    for a, b in zip(cache.layers, want_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


# ----------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------


def test_decorator_forms_and_wraps():
    def f(x):
        """Doc."""
        return x.sin().sum()

    x = torch.randn(3)
    for g in (remat(f), remat(f, policy=P.dots_saveable), remat(policy=P.dots_saveable)(f)):
        assert g.__wrapped__ is f and g.__name__ == "f" and g.__doc__ == "Doc."
        assert_bitwise(fs.grad(g)(x), fs.grad(f)(x))

    @remat
    def h(x):
        return x.cos().sum()

    @remat(policy=P.save_only_these_names("a"))
    def k(x):
        return checkpoint_name(x.cos(), "a").sum()

    assert h.__name__ == "h" and k.__name__ == "k"
    assert_bitwise(fs.grad(h)(x), fs.grad(k)(x))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match=r"fs.remat: policy=save_only_these_names is a policy"):
        remat(lambda x: x, policy=P.save_only_these_names)
    with pytest.raises(TypeError, match=r"fs.remat: policy must be a callable.*got 'dots'"):
        remat(lambda x: x, policy="dots")
    with pytest.raises(TypeError, match="fs.remat: fn must be callable"):
        remat(3)
    for make_remat in (remat, remat(policy=P.dots_saveable)):
        with pytest.raises(
            TypeError,
            match=r"fs.remat: fn is a torch.nn.Module \(Linear\).*"
            r"fs.functional\(model, wrap=\{Block: fs.remat",
        ):
            make_remat(torch.nn.Linear(2, 2))
    bad = remat(lambda x: x.sin().sum(), policy=lambda op, *a, **k: "yes")
    with pytest.raises(TypeError, match=r"returned 'yes' for aten\.sin"):
        bad(torch.ones(2, requires_grad=True))


def test_checkpoint_name_is_the_identity():
    x = torch.randn(3, requires_grad=True)
    assert checkpoint_name(x, "a") is x  # outside any region
    seen = []

    def f(x):
        seen.append(checkpoint_name(x, "a"))
        return x.sum()

    remat(f, policy=P.dots_saveable)(x)  # a policy blind to names: nothing to tag
    remat(f, policy=POLICIES["only_names"])(x)
    assert seen[0] is x
    assert seen[1] is not x and torch.equal(seen[1], x)  # the op's copy, seen by the policy
    g = fs.grad(remat(lambda x: (checkpoint_name(x, "q") * 3).sum(), policy=POLICIES["only_names"]))
    assert torch.equal(g(x), torch.full((3,), 3.0))
    with pytest.raises(TypeError, match="fs.checkpoint_name: x must be a torch.Tensor"):
        checkpoint_name([x], "a")
    with pytest.raises(TypeError, match="fs.checkpoint_name: name must be a str"):
        checkpoint_name(x, 1)


def _saved_activation_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves over one forward (seen by an outer
    saved-tensor hook, the inputs excluded): what backward keeps, however it was compiled."""
    inputs = {t.untyped_storage().data_ptr() for t in args}
    kept = {}

    def pack(t):
        st_ = t.untyped_storage()
        if st_.data_ptr() not in inputs:
            kept[st_.data_ptr()] = st_.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(kept.values())


@pytest.mark.parametrize("order", ["remat(compile)", "compile(remat)"])
@pytest.mark.parametrize("policy", [None, P.dots_saveable])
def test_torch_compile(order, policy):
    def f(w, x):
        return torch.tanh(torch.tanh(x @ w) @ w).sum()

    compile_ = functools.partial(torch.compile, backend="aot_eager")
    if order == "remat(compile)":
        g = remat(compile_(f), policy=policy)
    else:
        g = compile_(remat(f, policy=policy))
    w, x = torch.randn(32, 32), torch.randn(64, 32)
    torch.testing.assert_close(fs.grad(g)(w, x), fs.grad(f)(w, x), rtol=1e-6, atol=1e-6)
    # Still rematerialised: the compiled plain function saves both tanh outputs (64 x 32
    # floats each) for backward; through remat, compiled inside or outside, backward keeps
    # no activation (dots_saveable's matmul outputs, if cached, bypass saved-tensor hooks).
    w.requires_grad_()
    torch._dynamo.reset()
    _, plain = _saved_activation_bytes(compile_(f), w, x)
    out, kept = _saved_activation_bytes(g, w, x)
    assert plain == 2 * 64 * 32 * 4
    assert kept == 0
    out.backward()
    torch.testing.assert_close(w.grad, fs.grad(f)(w.detach(), x), rtol=1e-6, atol=1e-6)


def test_saved_value_mutated_in_place_raises_rather_than_wrong_grads():
    def f(w, x):
        h = F.dropout(x @ w, 0.5, inplace=True)  # writes the saved matmul output
        return (h @ w).tanh().sum()

    w, x = torch.randn(6, 6, requires_grad=True), torch.randn(4, 6)
    out = remat(f, policy=P.dots_saveable)(w, x)
    with pytest.raises(RuntimeError, match="has been mutated"):
        out.backward()
    remat(f)(w, x).backward()  # nothing saved: fine


def test_remat_of_a_transform_composes():
    """fs.remat(t) for a transform t (e.g. fs.gather) means block -> remat(t(block))."""
    calls = []

    def t(block):
        def run(p, x):
            calls.append(1)
            return block(p, x)

        return run

    t._fs_transform = True
    f = fs.remat(t)(lambda p, x: torch.tanh(x @ p).sum())
    p, x = torch.randn(3, 3), torch.randn(2, 3)
    loss, g = fs.value_and_grad(f)(p, x)
    assert len(calls) == 2  # forward + recompute: remat really wraps t(block)
    loss0, g0 = fs.value_and_grad(lambda p, x: torch.tanh(x @ p).sum())(p, x)
    assert torch.equal(loss, loss0) and torch.equal(g, g0)
    assert callable(fs.remat(fs.gather)) and callable(fs.remat(fs.gather)(lambda p, x: x))


@pytest.mark.parametrize("save", ["rand_like", "native_dropout"])
def test_a_saved_random_draw_is_recomputed_so_later_draws_replay(save):
    """A policy that saves an op drawing random numbers would skip it in recompute, and
    every later draw (dropout) would get other numbers: such ops are recomputed from the
    replayed RNG state whatever the policy says. (On CUDA one fused SDPA kernel draws its
    own dropout mask and dots_saveable saves it: the same case.)"""
    ops = {
        "rand_like": torch.ops.aten.rand_like.default,
        "native_dropout": torch.ops.aten.native_dropout.default,
    }
    saved = ops[save]
    seeded = lambda op, *args, **kwargs: op is saved  # noqa: E731 (a policy saving the draw)

    def f(w, x):
        h = torch.tanh(x @ w)
        if save == "rand_like":
            h = h * (torch.rand_like(h) > 0.5)
        else:
            h = torch.ops.aten.native_dropout.default(h, 0.5, True)[0]
        return (F.dropout(h @ w, 0.5) ** 2).sum()  # a later draw, recomputed

    w, x = torch.randn(4, 4, requires_grad=True), torch.randn(3, 4)
    torch.manual_seed(0)
    (ref,) = torch.autograd.grad(f(w, x), w)
    torch.manual_seed(0)
    (got,) = torch.autograd.grad(remat(f, policy=seeded)(w, x), w)
    assert torch.equal(got, ref), (got - ref).abs().max()


def test_attention_kernels_count_as_random_draws_only_with_dropout():
    """CUDA's fused attention kernels draw their dropout mask themselves (no CPU kernel
    takes dropout_p > 0, so this checks the rule on the schemas)."""
    from fsharding.transforms.remat import _consumes_rng as consumes_rng

    q = torch.empty(0)
    eff = torch.ops.aten._scaled_dot_product_efficient_attention.default
    flash = torch.ops.aten._scaled_dot_product_flash_attention.default
    assert not consumes_rng(eff, (q, q, q, None, True), {})  # dropout_p defaults to 0
    assert consumes_rng(eff, (q, q, q, None, True, 0.1), {})
    assert consumes_rng(flash, (q, q, q), {"dropout_p": 0.1})
    assert not consumes_rng(flash, (q, q, q, 0.0), {})
    assert consumes_rng(torch.ops.aten.rand_like.default, (q,), {})
    assert not consumes_rng(torch.ops.aten.mm.default, (q, q), {})
    assert fs.policies.dots_saveable(eff)  # the policy alone would save it


def _cycle_garbage(step, steps=3):
    """Objects a training step leaves in reference cycles (freed only by the cyclic collector,
    never with ``gc.disable()``, as torchtitan's loop runs): tensors, autograd nodes, frames,
    tracebacks and remat's own objects, counted by type over ``steps`` steps after one."""
    bad = (torch.autograd.graph.Node, types.FrameType, types.TracebackType)
    tensors = (torch.Tensor, torch.nn.Parameter)  # exactly: not the FakeTensors that an
    # earlier torch.compile in this process may leave to the collector meanwhile
    found = collections.Counter()
    enabled = gc.isenabled()
    step()  # warm-up: first-call caches are not per-step garbage
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(steps):
            step()
            gc.collect()
            for o in gc.garbage:
                if (
                    type(o) in tensors
                    or isinstance(o, bad)
                    or type(o).__module__.startswith("fsharding")
                ):
                    found[type(o).__name__] += 1
            gc.garbage.clear()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    return dict(found)


@pytest.mark.parametrize("name", ["nothing", "dots", "only_names", "offload"])
def test_a_training_step_leaves_no_reference_cycles(name):
    # A step's tensors must be freed by reference counting: with the cyclic collector off,
    # anything a cycle holds (a graph, saved activations) stays until the process ends.
    from fsharding import optim
    from fsharding.models.gpt import GPT, Block, GPTConfig

    cfg = GPTConfig.preset("tiny").with_(n_layers=2, dropout=0.1)
    apply, params = fs.functional(GPT(cfg), wrap={Block: remat(policy=POLICIES[name])})

    def loss(p, batch):
        logits = apply(p, batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    train = fs.train_step(fs.value_and_grad(loss), optim.adamw(1e-3))
    box = list(train.init(params))
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))

    def step():
        box[0], box[1], _ = train.step(box[0], box[1], (ids[:, :-1], ids[:, 1:]), donate=True)

    assert _cycle_garbage(step) == {}


def _zero_cycles_worker(stage):
    from fsharding import optim
    from fsharding.models.gpt import GPT, Block, GPTConfig

    cfg = GPTConfig.preset("tiny").with_(n_layers=2)
    apply, params = fs.functional(GPT(cfg), wrap={Block: remat})

    def loss(p, batch):
        logits = apply(p, batch[0])
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())

    mesh = fs.Mesh(dp=torch.distributed.get_world_size())
    step_ = fs.zero(fs.value_and_grad(loss), optim.adamw(1e-3), mesh=mesh, stage=stage)
    box = list(step_.init(params))
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    ids = torch.randint(0, 256, (2, 17), generator=g)

    def step():
        box[0], box[1], _ = step_.step(box[0], box[1], (ids[:, :-1], ids[:, 1:]), donate=True)

    return _cycle_garbage(step)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_zero_step_leaves_no_reference_cycles(stage):
    from tests.dist_utils import run as dist_run

    assert dist_run(_zero_cycles_worker, 2, stage, timeout=240) == [{}, {}]
