"""fs.accumulate: exact (also token-weighted) gradient accumulation over microbatches."""

from __future__ import annotations

import functools
import weakref

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fsharding as fs
from fsharding import optim
from fsharding.transforms.accumulate import accumulate

RTOL, ATOL = 1e-5, 1e-6


def _close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# --------------------------------------------------------------------------------------
# Equal weights: accumulate(value_and_grad(f), steps=k) == value_and_grad(f) on the batch
# --------------------------------------------------------------------------------------


def _mlp_loss(params, batch, *, scale=None, seen=None, has_aux=False):
    """Per-sample mean loss over pytree params/batch; non-tensor leaf ``batch['c']``."""
    if seen is not None:
        seen.append((batch["x"].shape, None if scale is None else scale.shape, batch["c"]))
    z = torch.tanh(batch["x"] @ params["w"])
    for m in params["layers"]:
        z = torch.tanh(z @ m)
    out = z @ params["head"]["v"] + params["head"]["b"]
    per = (out - batch["y"]) ** 2 + batch["img"].flatten(1).sum(1) * out
    if scale is not None:
        per = per * scale
    loss = per.mean() * batch["c"]
    return (loss, {"out": out.detach(), "n": batch["x"].shape[0]}) if has_aux else loss


@st.composite
def _problems(draw):
    k, b = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    d, h = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n_layers = draw(st.integers(0, 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    params = {
        "w": _rand(gen, d, h),
        "layers": [_rand(gen, h, h) for _ in range(n_layers)],
        "head": {"v": _rand(gen, h), "b": _rand(gen, ())},
    }
    n = k * b
    batch = {
        "x": _rand(gen, n, d),
        "y": _rand(gen, n),
        "img": _rand(gen, n, 2, draw(st.integers(1, 3))),
        "c": draw(st.sampled_from([1.0, 0.5, 3.0])),
    }
    scale = _rand(gen, n).abs() if draw(st.booleans()) else None
    return k, b, params, batch, scale, draw(st.booleans())


@given(_problems())
def test_equals_whole_batch(problem):
    k, b, params, batch, scale, has_aux = problem
    kwargs = {} if scale is None else {"scale": scale}
    seen = []
    f = functools.partial(_mlp_loss, seen=seen, has_aux=has_aux)
    (value, grads) = accumulate(fs.value_and_grad(f, has_aux=has_aux), steps=k)(
        params, batch, **kwargs
    )
    calls = list(seen)
    seen.clear()
    ref_value, ref_grads = fs.value_and_grad(f, has_aux=has_aux)(params, batch, **kwargs)
    if has_aux:
        (loss, auxes), (ref_loss, ref_aux) = value, ref_value
        assert isinstance(auxes, list) and len(auxes) == k
        for i, aux in enumerate(auxes):  # aux i belongs to rows i*b .. (i+1)*b - 1
            _close(aux["out"], ref_aux["out"][i * b : (i + 1) * b])
            assert aux["n"] == b
    else:
        loss, ref_loss = value, ref_value
    _close(loss, ref_loss)
    assert optree.tree_structure(grads) == optree.tree_structure(ref_grads)
    for g, r in zip(optree.tree_leaves(grads), optree.tree_leaves(ref_grads), strict=True):
        assert g.dtype == r.dtype
        _close(g, r)
    # It split: k calls, each with b rows of every tensor leaf (kwargs too); the non-tensor
    # leaf reached every microbatch unchanged.
    sshape = None if scale is None else torch.Size([b])
    assert calls == [(torch.Size([b, batch["x"].shape[1]]), sshape, batch["c"])] * k


# --------------------------------------------------------------------------------------
# Token weights: the 2024 gradient-accumulation bug
# --------------------------------------------------------------------------------------


def _token_loss(params, batch, calls=None):
    """sum(token losses) / count(valid tokens) of this call (0/0 = NaN with no tokens)."""
    if calls is not None:
        calls.append(int(batch["mask"].sum()))
    pred = torch.tanh(batch["x"] @ params["w"]) @ params["v"]  # (B, T)
    per_token = (pred - batch["y"]) ** 2
    mask = batch["mask"]
    return (per_token * mask).sum() / mask.sum(), {"tokens": mask.sum()}


def _tokens(batch):
    return batch["mask"].sum()


def _token_problem(gen, k, b, t, d, density, empty=None):
    n = k * b
    mask = torch.rand(n, t, generator=gen) < density
    if empty is not None:
        mask[empty * b : (empty + 1) * b] = False
    if not mask.any():
        mask[-1, -1] = True
    batch = {"x": _rand(gen, n, t, d), "y": _rand(gen, n, t), "mask": mask}
    return {"w": _rand(gen, d, 3), "v": _rand(gen, 3)}, batch


@given(
    k=st.integers(2, 4),
    b=st.integers(1, 3),
    t=st.integers(1, 6),
    density=st.floats(0.1, 0.9),
    empty=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_token_weighted_equals_full_batch_token_mean(k, b, t, density, empty, seed):
    gen = torch.Generator().manual_seed(seed)
    params, batch = _token_problem(gen, k, b, t, 2, density, empty=seed % k if empty else None)
    calls = []
    vg = fs.value_and_grad(functools.partial(_token_loss, calls=calls), has_aux=True)
    (loss, auxes), grads = accumulate(vg, steps=k, weights=_tokens)(params, batch)
    counts = batch["mask"].reshape(k, -1).sum(1).tolist()
    assert calls == [c for c in counts if c > 0]  # weight-0 microbatches never ran
    assert [a is None for a in auxes] == [c == 0 for c in counts]
    (ref_loss, _), ref_grads = fs.value_and_grad(_token_loss, has_aux=True)(params, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    _close(loss, ref_loss)
    _close(grads, ref_grads)


def test_token_weights_fix_the_mean_of_means_bug():
    gen = torch.Generator().manual_seed(1)
    params, batch = _token_problem(gen, 2, 2, 8, 2, 0.5)
    batch["mask"][:2] = False
    batch["mask"][:2, 0] = True  # microbatch 0: 2 tokens, microbatch 1: many
    (ref, _), ref_grads = fs.value_and_grad(_token_loss, has_aux=True)(params, batch)
    vg = fs.value_and_grad(_token_loss, has_aux=True)
    (naive, _), naive_grads = accumulate(vg, steps=2)(params, batch)
    (fixed, _), fixed_grads = accumulate(vg, steps=2, weights=_tokens)(params, batch)
    assert not torch.allclose(naive, ref, rtol=1e-2)  # the bug: mean of per-microbatch means
    assert not torch.allclose(naive_grads["w"], ref_grads["w"], rtol=1e-2)
    _close(fixed, ref)
    _close(fixed_grads, ref_grads)


def test_all_padding_microbatch_is_skipped_and_gives_no_nan():
    gen = torch.Generator().manual_seed(2)
    params, batch = _token_problem(gen, 3, 2, 4, 2, 0.6, empty=1)
    calls, weight_calls = [], []

    def weights(batch):
        weight_calls.append(batch["x"].shape[0])
        return batch["mask"].sum()

    vg = fs.value_and_grad(functools.partial(_token_loss, calls=calls), has_aux=True)
    (loss, auxes), grads = accumulate(vg, steps=3, weights=weights)(params, batch)
    assert weight_calls == [2, 2, 2] and len(calls) == 2 and auxes[1] is None
    assert auxes[0] is not None and auxes[2] is not None
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    # Without skipping, the empty microbatch's 0/0 would poison everything:
    (nan_loss, _), _ = vg(params, {k: v[2:4] for k, v in batch.items()})
    assert torch.isnan(nan_loss)


def test_all_weights_zero_raises():
    gen = torch.Generator().manual_seed(3)
    params, batch = _token_problem(gen, 2, 2, 3, 2, 0.5)
    batch["mask"][:] = False
    calls = []
    vg = fs.value_and_grad(functools.partial(_token_loss, calls=calls), has_aux=True)
    with pytest.raises(ValueError, match=r"fs.accumulate: every microbatch has weight 0"):
        accumulate(vg, steps=2, weights=_tokens)(params, batch)
    assert calls == []


def test_one_live_microbatch_returns_its_result_unchanged():
    gen = torch.Generator().manual_seed(4)
    params, batch = _token_problem(gen, 3, 2, 4, 2, 0.7, empty=0)
    batch["mask"][4:] = False  # only microbatch 1 has tokens
    vg = fs.value_and_grad(_token_loss, has_aux=True)
    (loss, auxes), grads = accumulate(vg, steps=3, weights=_tokens)(params, batch)
    (ref, ref_aux), ref_grads = vg(params, {k: v[2:4] for k, v in batch.items()})
    assert torch.equal(loss, ref) and auxes[0] is None and auxes[2] is None
    assert torch.equal(auxes[1]["tokens"], ref_aux["tokens"])
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


# --------------------------------------------------------------------------------------
# It did something: memory, float32 buffer
# --------------------------------------------------------------------------------------


class _SavedBytes:
    """Live / peak bytes packed by saved-tensor hooks, parameters excluded."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in optree.tree_leaves(params)}
        self.live = self.peak = 0

    def pack(self, t):
        if t.untyped_storage().data_ptr() in self.skip:
            return t
        return _Packed(self, t)

    @staticmethod
    def unpack(p):
        return p.t if isinstance(p, _Packed) else p

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Packed:
    def __init__(self, meter, t):
        self.meter, self.t, self.n = meter, t, t.numel() * t.element_size()
        meter.live += self.n
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.n


def _mlp(params, batch):
    h = torch.tanh(batch["x"] @ params["w1"])
    return ((h @ params["w2"] - batch["y"]) ** 2).mean()


@pytest.mark.parametrize("k", [2, 4, 8])
def test_peak_saved_activations_shrink_by_steps(k):
    gen = torch.Generator().manual_seed(5)
    params = {"w1": _rand(gen, 32, 64), "w2": _rand(gen, 64, 16)}
    batch = {"x": _rand(gen, 64, 32), "y": _rand(gen, 64, 16)}
    vg = fs.value_and_grad(_mlp)
    full, acc = _SavedBytes(params), _SavedBytes(params)
    with full.hooks():
        vg(params, batch)
    with acc.hooks():
        accumulate(vg, steps=k)(params, batch)
    assert full.live == 0 and acc.live == 0  # every graph was freed
    ratio = acc.peak / full.peak
    print(f"k={k}: peak saved {acc.peak} B vs full batch {full.peak} B, ratio {ratio:.4f}")
    assert abs(ratio - 1 / k) < 0.01


def test_each_microbatch_grads_are_freed_before_the_next_runs():
    refs = []

    def grad_fn(params, batch):
        assert all(r() is None for r in refs), "an earlier microbatch's grads are still alive"
        g = batch.sum(0) * params["w"]
        refs.append(weakref.ref(g))
        return g.sum(), {"w": g}

    loss, grads = accumulate(grad_fn, steps=4)({"w": torch.ones(3)}, torch.ones(8, 3))
    assert len(refs) == 4 and all(r() is None for r in refs)
    assert grads["w"].tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("contribs", "expected"), [((768.0, 3.0, -768.0), 1.0), ((256.0, 1.0, -256.0), 1 / 3)]
)
def test_bf16_grads_accumulate_in_float32(contribs, expected):
    def grad_fn(params, batch):
        return batch.float().sum(), {"w": batch.to(torch.bfloat16), "f": batch.float()}

    params = {"w": torch.zeros(1, dtype=torch.bfloat16), "f": torch.zeros(1)}
    batch = torch.tensor(contribs)
    loss, grads = accumulate(grad_fn, steps=3)(params, batch)
    assert grads["w"].dtype == torch.bfloat16 and grads["f"].dtype == torch.float32
    assert grads["w"].item() == torch.tensor(expected).to(torch.bfloat16).item()
    assert grads["f"].item() == torch.tensor(expected).item()
    assert loss.item() == torch.tensor(expected).item()
    naive = torch.zeros(1, dtype=torch.bfloat16)
    for c in contribs:  # what a bf16 buffer would give
        naive += torch.tensor([c], dtype=torch.bfloat16)
    assert (naive / 3).item() != grads["w"].item()


# --------------------------------------------------------------------------------------
# Calling convention, steps=1, decorator forms
# --------------------------------------------------------------------------------------


def test_microbatch_arguments_reach_grad_fn_and_weights_identically():
    seen_g, seen_w = [], []
    tag = object()

    def grad_fn(params, batch, n, *, mask, note):
        seen_g.append((batch, n, mask, note))
        return (params["w"] * batch["x"].sum()).sum(), {"w": batch["x"].sum(0)}

    def weights(batch, n, *, mask, note):
        seen_w.append((batch, n, mask, note))
        return 1

    x = torch.arange(12.0).reshape(6, 2)
    mask = torch.arange(6) % 2 == 0
    batch = {"x": x, "tag": tag}
    accumulate(grad_fn, steps=3, weights=weights)(
        {"w": torch.ones(2)}, batch, 5, mask=mask, note="a"
    )
    assert len(seen_g) == len(seen_w) == 3
    for i, ((bg, ng, mg, tg), (bw, nw, mw, tw)) in enumerate(zip(seen_g, seen_w, strict=True)):
        assert torch.equal(bg["x"], x[2 * i : 2 * i + 2]) and torch.equal(bw["x"], bg["x"])
        assert torch.equal(mg, mask[2 * i : 2 * i + 2]) and torch.equal(mw, mg)
        assert bg["tag"] is tag and bw["tag"] is tag and ng == nw == 5 and tg == tw == "a"


def test_steps_1_is_exactly_grad_fn():
    out_loss, out_grads, aux = torch.tensor(2.0), {"w": torch.ones(3)}, {"a": 1}

    def plain(params, batch):
        assert batch is sentinel_batch  # not even split
        return out_loss, out_grads

    sentinel_batch = {"x": torch.ones(5, 2)}
    loss, grads = accumulate(plain, steps=1)({"w": torch.zeros(3)}, sentinel_batch)
    assert loss is out_loss and grads is out_grads
    (loss, auxes), grads = accumulate(lambda p, b: ((out_loss, aux), out_grads), steps=1)(
        {"w": torch.zeros(3)}, sentinel_batch
    )
    assert loss is out_loss and grads is out_grads and auxes == [aux] and auxes[0] is aux


def test_decorator_forms_and_wraps():
    vg = fs.value_and_grad(_mlp)
    gen = torch.Generator().manual_seed(6)
    params = {"w1": _rand(gen, 3, 4), "w2": _rand(gen, 4, 2)}
    batch = {"x": _rand(gen, 4, 3), "y": _rand(gen, 4, 2)}

    @accumulate(steps=2)
    def decorated(params, batch):
        """Docs."""
        return vg(params, batch)

    assert decorated.__name__ == "decorated" and decorated.__doc__ == "Docs."
    assert decorated.__wrapped__.__name__ == "decorated"
    assert accumulate(vg, steps=2).__wrapped__ is vg
    ref_loss, ref_grads = vg(params, batch)
    for fn in (decorated, accumulate(vg, steps=2), accumulate(steps=4)(vg)):
        loss, grads = fn(params, batch)
        _close(loss, ref_loss)
        _close(grads, ref_grads)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _never(*args, **kwargs):
    raise AssertionError("grad_fn must not run")


def test_non_divisible_batch_names_leaf_and_size():
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"args\[1\]\['x'\] of shape \(10, 3\).*size 10.*steps=4"):
        accumulate(_never, steps=4)(params, {"x": torch.ones(10, 3), "y": torch.ones(8)})
    with pytest.raises(ValueError, match=r"kwargs\['mask'\] of shape \(6,\).*size 6.*steps=4"):
        accumulate(_never, steps=4)(params, {"x": torch.ones(8)}, mask=torch.ones(6))
    with pytest.raises(ValueError, match=r"args\[2\]\[1\] of shape \(\).*0-dim"):
        accumulate(_never, steps=2)(params, torch.ones(4), (torch.ones(4), torch.tensor(1.0)))


@pytest.mark.parametrize(
    ("steps", "exc"), [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_steps(steps, exc):
    with pytest.raises(exc, match=r"fs.accumulate: steps must be"):
        accumulate(_never, steps=steps)


def test_bad_weights_and_grad_fn():
    params, batch = {"w": torch.ones(2)}, torch.ones(4, 2)
    vg = fs.value_and_grad(lambda p, b: (b @ p["w"]).mean())
    with pytest.raises(TypeError, match=r"weights must be None .* got int"):
        accumulate(vg, steps=2, weights=3)
    with pytest.raises(TypeError, match=r"fs.accumulate: grad_fn must be callable"):
        accumulate("f", steps=2)
    with pytest.raises(TypeError, match=r"shape \(2,\) for microbatch 0"):
        accumulate(vg, steps=2, weights=lambda b: b.sum(1))(params, batch)
    with pytest.raises(TypeError, match=r"returned 'a' of type str for microbatch 0"):
        accumulate(vg, steps=2, weights=lambda b: "a")(params, batch)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"for microbatch 0; weights must be finite"):
            accumulate(vg, steps=2, weights=lambda b, bad=bad: torch.tensor(bad))(params, batch)
    with pytest.raises(TypeError, match=r"grads leaf \['w'\] of type float"):
        accumulate(lambda p, b: (b.sum(), {"w": 1.0}), steps=2)(params, batch)
    with pytest.raises(TypeError, match=r"grad_fn must return \(loss, grads\).*a Tensor"):
        accumulate(lambda p, b: b.sum(), steps=2)(params, batch)


# --------------------------------------------------------------------------------------
# Composition: loss_scale, fs.train_step
# --------------------------------------------------------------------------------------


class _Scale:
    """A static loss scale (the LossScale protocol train_step and value_and_grad use)."""

    def __init__(self, s):
        self.loss_scale = torch.tensor(s)

    def scale(self, x):
        return x * self.loss_scale

    def unscale(self, tree):
        return optree.tree_map(lambda g: g / self.loss_scale, tree)

    def adjust(self, finite):
        return self


def _sgd(lr):
    return optim.GradientTransformation(
        init=lambda params: optim.EmptyState(),
        update=lambda u, s, p=None: (optree.tree_map(lambda g: -lr * g, u), s),
    )


def test_loss_scale_is_forwarded_and_grads_come_back_unscaled():
    gen = torch.Generator().manual_seed(7)
    params = {"w1": _rand(gen, 3, 4), "w2": _rand(gen, 4, 2)}
    batch = {"x": _rand(gen, 8, 3), "y": _rand(gen, 8, 2)}
    vg, got = fs.value_and_grad(_mlp), []

    def grad_fn(params, batch, *, loss_scale=None):
        got.append(loss_scale)
        return vg(params, batch, loss_scale=loss_scale)

    scale = _Scale(1024.0)
    loss, grads = accumulate(grad_fn, steps=4)(params, batch, loss_scale=scale)
    assert got == [scale] * 4
    ref_loss, ref_grads = vg(params, batch)
    _close(loss, ref_loss)
    _close(grads, ref_grads)


def test_train_step_with_accumulate_equals_full_batch():
    gen = torch.Generator().manual_seed(8)
    params, _ = _token_problem(gen, 4, 2, 5, 3, 0.5)
    batches = [_token_problem(gen, 4, 2, 5, 3, 0.5, empty=i % 4)[1] for i in range(3)]
    loss_fn = lambda p, b: _token_loss(p, b)[0]  # noqa: E731
    full = fs.train_step(fs.value_and_grad(loss_fn), _sgd(0.1))
    acc = fs.train_step(accumulate(fs.value_and_grad(loss_fn), steps=4, weights=_tokens), _sgd(0.1))
    p_full, s_full = full.init(params)
    p_acc, s_acc = acc.init(params)
    for batch in batches:
        p_full, s_full, m_full = full.step(p_full, s_full, batch)
        p_acc, s_acc, m_acc = acc.step(p_acc, s_acc, batch)
        _close(m_acc["loss"], m_full["loss"])
    assert not torch.equal(p_acc["w"], params["w"])
    _close(p_acc, p_full)


def test_train_step_skips_when_one_microbatch_overflows():
    gen = torch.Generator().manual_seed(9)
    params = {"w1": _rand(gen, 3, 4), "w2": _rand(gen, 4, 2)}
    batch = {"x": _rand(gen, 8, 3), "y": _rand(gen, 8, 2)}
    batch["x"][5, 0] = float("inf")  # microbatch 2 of 4 overflows
    step = fs.train_step(
        accumulate(fs.value_and_grad(_mlp), steps=4), _sgd(0.1), loss_scale=_Scale(8.0)
    )
    p0, state = step.init(params)
    p1, _, metrics = step.step(p0, state, batch)
    assert metrics["skipped"] is True
    assert all(p1[k] is p0[k] for k in p0)


def test_docstring_sections_parse():
    """The Google-style sections start at the docstring's own margin (they were indented 4
    spaces more than the summary, so inspect.getdoc left them indented: no Args section)."""
    import inspect

    lines = inspect.getdoc(fs.accumulate).splitlines()
    for section in ("Args:", "Returns:", "Raises:", "Example:"):
        assert section in lines, section
    assert "    grad_fn: ``grad_fn(params, *args, **kwargs) -> (loss, grads)``, or" in lines
