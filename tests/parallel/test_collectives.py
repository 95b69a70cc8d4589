"""Named-axis collectives: values and gradients against single-process float64 references.

The distributed test runs every collective inside ``fs.shard`` on a 2x2 (dp, tp) gloo mesh.
Rank ``(d, t)`` holds block ``X[2d + t]`` of a global ``X``; each collective's per-rank
result is stacked back into ``Y`` (out spec ``P(("dp", "tp"))``), and ``Y`` and the gradient
of ``(Y * C).sum()`` are compared with the same formula written with plain torch on ``X``.
"""

from __future__ import annotations

import pytest
import torch

from fsharding.parallel.collectives import (
    all_gather,
    axis_index,
    axis_size,
    bind_mesh,
    current_mesh,
    pmax,
    pmean,
    ppermute,
    psum,
    psum_scatter,
)
from fsharding.parallel.mesh import Mesh, P
from fsharding.parallel.shard import shard
from tests.dist_utils import run

# name -> (per-rank op on the block x, reference for rank (d, t) from Xg[d, t] = block)
CASES = {
    "psum dp": (lambda x: psum(x, "dp"), lambda X, d, t: X[:, t].sum(0)),
    "psum tp": (lambda x: psum(x, "tp"), lambda X, d, t: X[d].sum(0)),
    "psum dp,tp": (lambda x: psum(x, ("dp", "tp")), lambda X, d, t: X.sum((0, 1))),
    "pmean dp": (lambda x: pmean(x, "dp"), lambda X, d, t: X[:, t].mean(0)),
    "pmean dp,tp": (lambda x: pmean(x, ("dp", "tp")), lambda X, d, t: X.mean((0, 1))),
    "pmax tp": (lambda x: pmax(x, "tp"), lambda X, d, t: X[d].amax(0)),
    "pmax dp,tp": (lambda x: pmax(x, ("dp", "tp")), lambda X, d, t: X.amax((0, 1))),
    "all_gather dp": (lambda x: all_gather(x, "dp"), lambda X, d, t: X[:, t]),
    "all_gather tp tiled axis=1": (
        lambda x: all_gather(x, "tp", axis=1, tiled=True),
        lambda X, d, t: torch.cat([X[d, 0], X[d, 1]], 1),
    ),
    "all_gather tp axis=-1": (
        lambda x: all_gather(x, "tp", axis=-1),
        lambda X, d, t: torch.stack([X[d, 0], X[d, 1]], -1),
    ),
    "all_gather dp,tp tiled": (
        lambda x: all_gather(x, ("dp", "tp"), tiled=True),
        lambda X, d, t: torch.cat([X[0, 0], X[0, 1], X[1, 0], X[1, 1]]),
    ),
    "psum_scatter dp tiled": (
        lambda x: psum_scatter(x, "dp", tiled=True),
        lambda X, d, t: X[:, t].sum(0)[2 * d : 2 * d + 2],
    ),
    "psum_scatter tp dim=1": (
        lambda x: psum_scatter(x, "tp", scatter_dimension=1),
        lambda X, d, t: X[d].sum(0)[:, t],
    ),
    "psum_scatter tp tiled dim=-2": (
        lambda x: psum_scatter(x, "tp", scatter_dimension=-2, tiled=True),
        lambda X, d, t: X[d].sum(0)[:, t : t + 1],
    ),
    "psum_scatter dp,tp tiled": (
        lambda x: psum_scatter(x, ("dp", "tp"), tiled=True),
        lambda X, d, t: X.sum((0, 1))[2 * d + t : 2 * d + t + 1],
    ),
    "ppermute dp swap": (
        lambda x: ppermute(x, "dp", [(0, 1), (1, 0)]),
        lambda X, d, t: X[1 - d, t],
    ),
    "ppermute tp partial": (
        lambda x: ppermute(x, "tp", [(0, 1)]),
        lambda X, d, t: X[d, 0] if t == 1 else torch.zeros_like(X[d, 0]),
    ),
    "axis_index/axis_size": (
        lambda x: (
            x * (axis_index("tp") + 10 * axis_index("dp") + 100 * axis_index(("dp", "tp")))
            + axis_size(("dp", "tp")) * axis_size("tp")
        ),
        lambda X, d, t: X[d, t] * (t + 10 * d + 100 * (2 * d + t)) + 8,
    ),
    "gather then scatter": (
        lambda x: psum_scatter(all_gather(x, "dp", tiled=True), "dp", tiled=True),
        lambda X, d, t: 2 * X[d, t],
    ),
    "pytree psum": (
        lambda x: psum({"a": x, "b": [x * 2]}, "tp")["b"][0],
        lambda X, d, t: 2 * X[d].sum(0),
    ),
}


def _collectives_worker(names: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    mesh = Mesh(dp=2, tp=2)
    X = torch.randn(4, 4, 2, 3, dtype=torch.float64)  # 4 blocks of shape (4, 2, 3)
    errors = {}
    for name in names:
        op, ref = CASES[name]
        x = X.clone().requires_grad_(True)
        Y = shard(
            lambda b, op=op: op(b[0]).unsqueeze(0),
            mesh=mesh,
            in_specs=P(("dp", "tp")),
            out_specs=P(("dp", "tp")),
        )(x)
        xr = X.clone().requires_grad_(True)
        Xg = xr.view(2, 2, 4, 2, 3)
        Yr = torch.stack([ref(Xg, d, t) for d in range(2) for t in range(2)])
        torch.testing.assert_close(Y, Yr, msg=lambda m, n=name: f"{n} value: {m}")
        C = torch.randn(Y.shape, dtype=torch.float64)
        (gx,) = torch.autograd.grad((Y * C).sum(), x, allow_unused=True)
        (gr,) = torch.autograd.grad((Yr * C).sum(), xr, allow_unused=True)
        gx = torch.zeros_like(X) if gx is None else gx
        gr = torch.zeros_like(X) if gr is None else gr
        torch.testing.assert_close(gx, gr, msg=lambda m, n=name: f"{n} grad: {m}")
        errors[name] = float((gr - gx).abs().max())
    return errors


@pytest.mark.timeout(150)
def test_collectives_values_and_grads_on_2x2_mesh():
    results = run(_collectives_worker, 4, list(CASES))
    assert all(r.keys() == CASES.keys() for r in results)
    assert all(max(r.values()) < 1e-12 for r in results)


# --------------------------------------------------------------------------------------
# single process: local mesh, errors
# --------------------------------------------------------------------------------------


def test_outside_shard_raises_naming_the_axis():
    with pytest.raises(RuntimeError, match=r"fs.psum: axis name 'dp' is not bound.*fs.shard"):
        psum(torch.ones(2), "dp")
    with pytest.raises(RuntimeError, match="'tp'"):
        all_gather(torch.ones(2), "tp")
    assert current_mesh() is None


def test_unknown_axis_lists_the_mesh_axes():
    with bind_mesh(Mesh(dp=1, tp=1)):
        with pytest.raises(ValueError, match=r"unknown axis 'pp'.*\('dp', 'tp'\)"):
            psum(torch.ones(2), "pp")
        with pytest.raises(ValueError, match="unknown axis 'x'"):
            axis_index(("dp", "x"))
        with pytest.raises(TypeError, match="axis_name"):
            psum(torch.ones(2), 3)


def test_local_mesh_collectives_are_identities_with_jax_shapes():
    x = torch.randn(2, 3, requires_grad=True)
    with bind_mesh(Mesh(dp=1)):
        assert torch.equal(psum(x, "dp"), x) and torch.equal(pmean(x, "dp"), x)
        assert torch.equal(pmax(x, "dp"), x)
        assert all_gather(x, "dp").shape == (1, 2, 3)
        assert all_gather(x, "dp", axis=2).shape == (2, 3, 1)
        assert torch.equal(all_gather(x, "dp", axis=1, tiled=True), x)
        assert torch.equal(psum_scatter(x, "dp", tiled=True), x)
        assert psum_scatter(x.unsqueeze(1), "dp", scatter_dimension=1).shape == (2, 3)
        with pytest.raises(ValueError, match="must be equal to the axis size 1"):
            psum_scatter(x, "dp")
        assert torch.equal(ppermute(x, "dp", [(0, 0)]), x)
        assert torch.equal(ppermute(x, "dp", []), torch.zeros(2, 3))
        assert (axis_index("dp"), axis_size("dp"), psum(2, "dp")) == (0, 1, 2)
        y = psum({"a": x, "b": (x * 2,)}, "dp")
        y["b"][0].sum().backward()
    assert torch.equal(x.grad, torch.full((2, 3), 2.0))


def test_ppermute_validates_perm():
    with bind_mesh(Mesh(dp=1, tp=1)):
        with pytest.raises(ValueError, match="no repeated src"):
            ppermute(torch.ones(1), "dp", [(0, 1)])
        with pytest.raises(TypeError, match="pairs"):
            ppermute(torch.ones(1), "dp", [0])
        with pytest.raises(ValueError, match="one axis"):
            ppermute(torch.ones(1), ("dp", "tp"), [])


class _PsumInBackward(torch.autograd.Function):
    """Calls a collective from backward, as a remat region recomputing one does."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return psum(g, "dp") * axis_size("dp") * 3


def test_collective_called_in_backward_finds_the_mesh():
    # backward runs after shard returned (and on CUDA in another thread): collectives
    # called there use the last bound mesh
    x = torch.randn(4, requires_grad=True)
    f = shard(
        lambda t: _PsumInBackward.apply(t).sum(), mesh=Mesh(dp=1), in_specs=P("dp"), out_specs=P()
    )
    f(x).backward()
    assert current_mesh() is None
    torch.testing.assert_close(x.grad, torch.full((4,), 3.0))
