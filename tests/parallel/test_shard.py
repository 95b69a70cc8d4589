"""fs.shard: values and gradients equal the unsharded computation (plain torch, float64).

Distributed checks run on gloo ranks through fs.launch, many checks per launch. Hypothesis
runs *inside* the ranks (derandomized, no shrinking: every rank draws the same examples).
"""

from __future__ import annotations

import functools

import pytest
import torch

from fsharding.parallel.collectives import all_gather, axis_index, pmean, psum
from fsharding.parallel.mesh import Mesh, P, from_local
from fsharding.parallel.shard import shard
from tests.dist_utils import assert_close, raises, run

F64 = torch.float64


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _leaf(*shape, g):
    return torch.randn(*shape, dtype=F64, generator=g).requires_grad_(True)


def _property_cases(mesh):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=6,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(b=st.integers(1, 3), k=st.integers(1, 4), m=st.integers(1, 3), seed=st.integers(0, 999))
    def prop(b, k, m, seed):
        g = torch.Generator().manual_seed(seed)
        x, w = _leaf(2 * b, k, g=g), _leaf(k, 2 * m, g=g)
        w2, cot = _leaf(2 * m, k, g=g), torch.randn(2 * b, 2 * m, dtype=F64, generator=g)

        # data parallel: batch split, weight replicated, output split
        f = shard(lambda x, w: x @ w, mesh=mesh, in_specs=(P("dp"), P()), out_specs=P("dp"))
        y = f(x, w)
        assert_close(y, x @ w, "dp matmul")
        for a, r in zip(_grads((y * cot).sum(), x, w), _grads((x @ w * cot).sum(), x, w)):
            assert_close(a, r, "dp matmul grad")

        # a scalar loss replicated through pmean, P() output
        def loss(x, w):
            return pmean(torch.tanh(x @ w).square().mean(), "dp")

        f = shard(loss, mesh=mesh, in_specs=(P("dp"), P()), out_specs=P())
        ref = torch.tanh(x @ w).square().mean()
        assert_close(f(x, w), ref, "pmean loss")
        for a, r in zip(_grads(f(x, w), x, w), _grads(ref, x, w)):
            assert_close(a, r, "pmean loss grad")

        # Megatron MLP over the axis, pytree arguments with prefix specs, tuple outputs
        def mlp(params, x):
            h = torch.relu(x @ params["w1"])
            return psum(h @ params["w2"], "dp"), h

        f = shard(
            mlp,
            mesh=mesh,
            in_specs=({"w1": P(None, "dp"), "w2": P("dp")}, P()),
            out_specs=(P(), P(None, "dp")),
        )
        params = {"w1": w, "w2": w2}
        out, h = f(params, x)
        h_ref = torch.relu(x @ w)
        assert_close(out, h_ref @ w2, "mlp out")
        assert_close(h, h_ref, "mlp hidden")
        loss_s, loss_r = (out.sin().sum() + h.sum()), ((h_ref @ w2).sin().sum() + h_ref.sum())
        for a, r in zip(_grads(loss_s, w, w2, x), _grads(loss_r, w, w2, x)):
            assert_close(a, r, "mlp grad")

    prop()


def _dp2_worker():
    torch.manual_seed(0)
    mesh = Mesh(dp=2)
    rank = mesh.coordinate["dp"]
    _property_cases(mesh)
    out = {}

    # DESIGN's example: gradient w w.r.t. x on every rank; fn sees half of x
    w, x = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64, requires_grad=True)
    seen = []

    def fn(t):
        seen.append(tuple(t.shape))
        return (all_gather(t, "dp", tiled=True) * w).sum()

    y = shard(fn, mesh=mesh, in_specs=P("dp"), out_specs=P())(x)
    (gx,) = torch.autograd.grad(y, x)
    assert_close(y, (x * w).sum(), "example value")
    assert_close(gx, w, "example grad")
    assert seen == [(3,)]
    out["example_grad"] = gx

    # replicated input, replicated output, no collective: grad 2x (not 2x * N or / N)
    (g,) = torch.autograd.grad(
        shard(lambda t: (t * t).sum(), mesh=mesh, in_specs=P(), out_specs=P())(x), x
    )
    assert_close(g, 2 * x.detach(), "replicated grad")

    # check=True: a per-rank value under P() is caught on every rank; a psum passes
    bad = shard(lambda t: t.sum(), mesh=mesh, in_specs=P("dp"), out_specs=P(), check=True)
    out["check"] = raises(lambda: bad(x), ValueError)
    good = shard(
        lambda t: psum(t.sum(), "dp"), mesh=mesh, in_specs=P("dp"), out_specs=P(), check=True
    )
    assert_close(good(x), x.sum(), "check=True on a replicated output")

    # errors on every rank, before any communication (the psum after them must not hang)
    z = torch.randn(3, 4)
    ident = functools.partial(shard, lambda t: t, mesh=mesh, out_specs=P())
    out["errors"] = [
        raises(lambda: ident(in_specs=P("dp"))(z), ValueError),
        raises(lambda: ident(in_specs=({"a": P(), "c": P()},))({"a": z, "b": z}), ValueError),
        raises(lambda: ident(in_specs=P(None, None, "dp"))(z), ValueError),
        raises(lambda: ident(in_specs=P("tp")), ValueError),
    ]
    s = shard(lambda t: psum(t, "dp"), mesh=mesh, in_specs=P(), out_specs=P())(torch.ones(1))
    assert s.item() == 2.0

    out["rank"] = rank
    return out


@pytest.mark.timeout(200)
def test_shard_on_two_ranks():
    results = run(_dp2_worker, 2)
    for r in results:  # the same global gradient on every rank: w of the example
        assert r["example_grad"].shape == (6,)
        assert torch.equal(r["example_grad"], results[0]["example_grad"])
        assert r["check"].startswith("fs.shard(check=True): output has spec P()")
        assert "leaves out axis 'dp'" in r["check"]
        m0, m1, m2, m3 = r["errors"]
        assert "args[0]" in m0 and "size 3 in dim 0" in m0 and "'dp'" in m0
        assert "in_specs does not match args at args[0]" in m1 and "'b'" in m1
        assert "3 entries but the tensor has 2 dims" in m2
        assert "unknown axis 'tp'" in m3 and "('dp',)" in m3
    assert [r["rank"] for r in results] == [0, 1]


def _dp_tp_worker():
    torch.manual_seed(0)
    mesh = Mesh(dp=2, tp=2)
    g = torch.Generator().manual_seed(1)
    out = {}

    # data x tensor parallel MLP: batch over dp, hidden over tp, mean loss
    x, w1, w2 = _leaf(4, 3, g=g), _leaf(3, 4, g=g), _leaf(4, 3, g=g)

    def loss(x, w1, w2):
        h = torch.relu(x @ w1)
        return pmean(psum(h @ w2, "tp").square().mean(), "dp")

    f = shard(loss, mesh=mesh, in_specs=(P("dp"), P(None, "tp"), P("tp")), out_specs=P())
    ref = (torch.relu(x @ w1) @ w2).square().mean()
    assert_close(f(x, w1, w2), ref, "dp x tp loss")
    for a, r in zip(_grads(f(x, w1, w2), x, w1, w2), _grads(ref, x, w1, w2)):
        assert_close(a, r, "dp x tp grad")

    # one dim over two axes, either order: block i along dim 0 is axis_index of the tuple
    for axes in (("dp", "tp"), ("tp", "dp")):
        v = _leaf(8, 2, g=g)
        f = shard(
            lambda t, axes=axes: t * (axis_index(axes) + 1),
            mesh=mesh,
            in_specs=P(axes),
            out_specs=P(axes),
        )
        scale = torch.arange(1.0, 5.0, dtype=F64).repeat_interleave(2)[:, None]
        y = f(v)
        assert_close(y, v * scale, f"{axes} value")
        assert_close(_grads(y.sum(), v)[0], scale.expand(8, 2), f"{axes} grad")

    # an output replicated over tp (unmentioned): cotangent divided by 2, input psum'd over tp
    v = _leaf(4, 2, g=g)
    y = shard(lambda t: t * 2, mesh=mesh, in_specs=P("dp"), out_specs=P("dp"))(v)
    assert_close(_grads((y * v.detach()).sum(), v)[0], 2 * v.detach(), "replicated over tp")

    # per-rank data through from_local (replicated over tp): fn sees it as is; the grads are
    # DTensors with the same layout, on the whole mesh and on the dp sub-mesh
    rank = mesh.coordinate["dp"]
    block = torch.arange(6.0, dtype=F64).reshape(3, 2) + 10 * rank
    full = torch.cat([torch.arange(6.0, dtype=F64).reshape(3, 2) + 10 * r for r in range(2)])
    seen = []

    def cubes(t):
        seen.append(t.detach().clone())
        return pmean(psum((t**3).sum(), "dp"), "tp")

    for dmesh in (mesh, mesh["dp"]):
        leaf = from_local(block, dmesh, P("dp")).requires_grad_(True)
        loss = shard(cubes, mesh=mesh, in_specs=P("dp"), out_specs=P())(leaf)
        (gd,) = torch.autograd.grad(loss, leaf)
        assert torch.equal(seen.pop(), block)
        assert type(gd).__name__ == "DTensor" and gd.device_mesh == leaf.device_mesh
        assert tuple(gd.placements) == tuple(leaf.placements)
        assert_close(gd.to_local(), 3 * block**2, f"dtensor grad on {dmesh}")
        assert_close(loss, (full**3).sum(), "dtensor loss")
    wrong = from_local(block[:2], mesh, P(None, "tp"))  # global (4, 4): divisible
    ident = functools.partial(shard, lambda t: t, mesh=mesh, out_specs=P())
    out["wrong"] = raises(lambda: ident(in_specs=P("dp"))(wrong), ValueError)
    out["dp_only"] = raises(lambda: ident(in_specs=P("tp"))(leaf), ValueError)
    return out


@pytest.mark.timeout(200)
def test_shard_on_a_2x2_mesh():
    for r in run(_dp_tp_worker, 4):
        assert "which is not the layout of its spec P('dp',)" in r["wrong"]
        assert "args[0]" in r["dp_only"]


# --------------------------------------------------------------------------------------
# single process: local mesh, API shape, errors
# --------------------------------------------------------------------------------------


def test_local_mesh_runs_fn_once_on_whole_values():
    calls = []

    @shard(mesh=Mesh(dp=1, tp=1), in_specs=P("dp", "tp"), out_specs=P("dp"))
    def f(t):
        """Doc."""
        calls.append(t.shape)
        return psum(t, ("dp", "tp")) * 2

    x = torch.randn(4, 6, requires_grad=True)
    y = f(x)
    assert calls == [(4, 6)] and f.__doc__ == "Doc." and f.__wrapped__ is not None
    assert torch.equal(y, x * 2)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((4, 6), 2.0))
    g = shard(lambda a, n: a * n, mesh=Mesh(dp=1), in_specs=(P(), P()), out_specs=P())
    assert torch.equal(g(x, 3), x * 3)


def test_spec_errors_name_the_path():
    mesh = Mesh(dp=1)
    ident = functools.partial(shard, lambda *a: a[0], mesh=mesh)
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"at args\[0\]: entries \['a', 'b'\] in in_specs"):
        ident(in_specs=({"a": P(), "b": P()},), out_specs=P())({"a": x, "c": x})
    with pytest.raises(ValueError, match=r"args: entries \[0, 1\] in in_specs vs \[0\]"):
        ident(in_specs=(P(), P()), out_specs=P())(x)
    with pytest.raises(ValueError, match=r"args\[0\]\['w'\] has 3 entries but the tensor has 2"):
        ident(in_specs=P("dp", None, None), out_specs=P())({"w": x})
    with pytest.raises(ValueError, match=r"in_specs\[0\] names unknown axis 'tp'.*\('dp',\)"):
        ident(in_specs=(P("tp"),), out_specs=P())
    with pytest.raises(TypeError, match=r"in_specs\[0\] must be fs.P"):
        ident(in_specs=("dp",), out_specs=P())
    with pytest.raises(TypeError, match=r"args\[1\] is a int"):
        shard(lambda a, n: a, mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())(x, 3)
    with pytest.raises(TypeError, match="positional arguments only"):
        ident(in_specs=P(), out_specs=P())(x=x)
    with pytest.raises(ValueError, match=r"out_specs does not match output at output"):
        ident(in_specs=P(), out_specs=(P(), P()))(x)
    with pytest.raises(ValueError, match=r"out_specs entry P\(None, 'dp'\) for output"):
        ident(in_specs=P(), out_specs=P(None, "dp"))(torch.ones(2))
