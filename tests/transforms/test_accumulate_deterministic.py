"""fs.accumulate(deterministic=True): one canonical pairwise tree, whatever the grouping.

One process: ``accumulate(steps=K)`` and ``accumulate(accumulate(steps=K/m), steps=m)``
(the grouping ``fs.zero`` makes of K microbatches over m ranks) give bitwise the same loss
and grads for random models, shapes and K; the default sequential mode does not (which
makes the property non-trivial); the tree is the documented one (checked against a
recursive reference sum); the result stays the float64 mean. The multi-rank half is
tests/parallel/test_deterministic.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fsharding as fs
from fsharding.transforms.accumulate import CanonicalSum


def _wide(gen, *shape):
    """float32 values spanning six orders of magnitude (rounding order matters)."""
    return torch.randn(*shape, generator=gen) * 10 ** (torch.rand(*shape, generator=gen) * 6 - 3)


def _problem(seed, k, rows, d_in, hid):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(d_in, hid, generator=gen),
        "layers": [torch.randn(hid, hid, generator=gen) / hid],
        "s": torch.tensor(0.5),
    }
    n = k * rows
    mask = (torch.rand(n, generator=gen) < 0.6).float()
    mask[0] = 1.0
    batch = {"x": _wide(gen, n, d_in), "y": torch.randn(n, hid, generator=gen), "mask": mask}
    return params, batch


def _loss(p, b):
    z = torch.tanh(b["x"] @ p["w"])
    for m in p["layers"]:
        z = torch.tanh(z @ m)
    row = ((z * p["s"] - b["y"]) ** 2).mean(-1)
    return (row * b["mask"]).sum() / b["mask"].sum().clamp_min(1.0)


def _count(b):
    return b["mask"].sum()


def _leaves(out):
    loss, grads = out
    return [loss, grads["w"], *grads["layers"], grads["s"]]


def _bitwise(a, b):
    return all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


vg = fs.value_and_grad(_loss)


@given(
    seed=st.integers(0, 2**16),
    log_k=st.integers(1, 3),
    data=st.data(),
    rows=st.integers(1, 3),
    d_in=st.integers(1, 5),
    hid=st.integers(1, 5),
)
def test_grouping_does_not_change_a_bit(seed, log_k, data, rows, d_in, hid):
    k = 2**log_k  # K in {2, 4, 8}
    m = 2 ** data.draw(st.integers(1, log_k), label="log_groups")  # groups (ranks)
    params, batch = _problem(seed, k, rows, d_in, hid)
    one = fs.accumulate(vg, steps=k, deterministic=True)(params, batch)
    inner = fs.accumulate(vg, steps=k // m, deterministic=True)
    grouped = fs.accumulate(inner, steps=m, deterministic=True)(params, batch)
    assert _bitwise(one, grouped)


def test_default_order_depends_on_the_grouping():
    """Without deterministic=True the same comparison fails for some problem: the
    property above is not one every accumulation has."""
    differs = 0
    for seed in range(8):
        params, batch = _problem(seed, 8, 2, 4, 4)
        one = fs.accumulate(vg, steps=8)(params, batch)
        grouped = fs.accumulate(fs.accumulate(vg, steps=2), steps=4)(params, batch)
        differs += not _bitwise(one, grouped)
    assert differs >= 1


@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 8),
    weighted=st.booleans(),
    rows=st.integers(1, 3),
)
@settings(max_examples=15)
def test_equals_the_float64_mean(seed, k, weighted, rows):
    params, batch = _problem(seed, k, rows, 3, 4)
    got = fs.accumulate(vg, steps=k, weights=_count if weighted else None, deterministic=True)(
        params, batch
    )
    p64 = {
        "w": params["w"].double(),
        "layers": [params["layers"][0].double()],
        "s": params["s"].double(),
    }
    b64 = {n: v.double() for n, v in batch.items()}
    if weighted:  # the token mean of the whole batch
        want = vg(p64, b64)
    else:  # the mean of the microbatches' losses
        chunks = [{n: v.chunk(k)[i] for n, v in b64.items()} for i in range(k)]
        want = fs.value_and_grad(lambda p: torch.stack([_loss(p, c) for c in chunks]).mean())(p64)
    for a, b in zip(_leaves(got), _leaves(want), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def _reference_tree(xs):
    """The documented tree, written recursively: split off the largest power-of-two
    prefix, sum it by halves, and add the sum of the rest (folded from the right)."""
    n = len(xs)
    if n == 1:
        return xs[0]
    p = 2 ** int(math.log2(n))
    if p == n:
        return _reference_tree(xs[: n // 2]) + _reference_tree(xs[n // 2 :])
    return _reference_tree(xs[:p]) + _reference_tree(xs[p:])


@given(n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_canonical_sum_is_the_documented_tree(n, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [_wide(gen, 16) for _ in range(n)]
    tree = CanonicalSum()
    for x in xs:
        tree.push([x.clone()])
    (got,) = tree.result()
    assert torch.equal(got, _reference_tree(xs))


def test_canonical_sum_is_not_the_sequential_sum():
    gen = torch.Generator().manual_seed(0)
    xs = [_wide(gen, 64) for _ in range(8)]
    seq = xs[0].clone()
    for x in xs[1:]:
        seq = seq + x
    assert not torch.equal(_reference_tree(xs), seq)


def test_empty_leaves_keep_the_shape_of_the_tree():
    """A microbatch of weight 0 is an empty leaf: the others keep their places."""
    gen = torch.Generator().manual_seed(0)
    xs = [_wide(gen, 32) for _ in range(4)]
    tree = CanonicalSum()
    for i, x in enumerate(xs):
        tree.push(None if i == 1 else [x.clone()])
    (got,) = tree.result()
    assert torch.equal(got, xs[0] + (xs[2] + xs[3]))


def test_steps_1_is_bitwise_grad_fn_and_zero_weights_are_skipped():
    params, batch = _problem(0, 4, 2, 3, 3)
    assert _bitwise(
        fs.accumulate(vg, steps=1, deterministic=True)(params, batch), vg(params, batch)
    )
    batch["mask"][2:4] = 0.0  # microbatch 1 (rows 2-3) has no tokens: 0/0 must not appear
    out = fs.accumulate(vg, steps=4, weights=_count, deterministic=True)(params, batch)
    assert all(torch.isfinite(x).all() for x in _leaves(out))
    torch.testing.assert_close(out[1]["w"], vg(params, batch)[1]["w"], rtol=1e-5, atol=1e-6)


def test_an_overflow_in_one_microbatch_stays_non_finite():
    """The loss-scale finite check sees an overflowing microbatch through the tree."""
    params, batch = _problem(1, 4, 2, 3, 3)
    batch["x"][5, 0] = math.inf  # microbatch 2
    loss, grads = fs.accumulate(vg, steps=4, deterministic=True)(params, batch)
    assert not torch.isfinite(grads["w"]).all()


def test_aux_and_bad_arguments():
    params, batch = _problem(2, 2, 2, 3, 3)
    aux_vg = fs.value_and_grad(lambda p, b: (_loss(p, b), b["x"].shape[0]), has_aux=True)
    (loss, auxes), _ = fs.accumulate(aux_vg, steps=2, deterministic=True)(params, batch)
    assert list(auxes) == [2, 2]
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        fs.accumulate(vg, steps=2, deterministic="yes")
    dec = fs.accumulate(steps=2, deterministic=True)(vg)
    assert _bitwise(
        dec(params, batch), fs.accumulate(vg, steps=2, deterministic=True)(params, batch)
    )
