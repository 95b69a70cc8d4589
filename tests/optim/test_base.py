"""The data model: chain, identity, apply_updates(_), global_norm, learning_rate, donation,
the public surface, docstring examples, donated memory, DTensor leaves."""

from __future__ import annotations

import doctest
import importlib
import os
import tempfile

import optree
import pytest
import torch
import torch.multiprocessing as mp
from optim_trees import bitwise_equal, grads_for, leaves, make_tree, snapshot
from torch.utils._python_dispatch import TorchDispatchMode

from fsharding import optim

MODULES = [
    "base",
    "_moments",
    "_transforms",
    "_clipping",
    "_wrappers",
    "_inject",
    "_aliases",
    "_schedules",
    "_torch_compat",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"fsharding.optim.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_public_surface():
    assert sorted(optim.__all__) == sorted(
        """EmptyState GradientTransformation apply_updates apply_updates_ chain donating
        donation global_norm identity learning_rate ApplyIfFiniteState ScaleByAdamState
        ScaleByLionState ScaleByScheduleState ScaleByTrustRatioState TraceState
        add_decayed_weights apply_if_finite clip clip_by_global_norm scale scale_by_adam
        scale_by_learning_rate scale_by_lion scale_by_schedule scale_by_trust_ratio trace adam
        adamw lamb lion sgd constant_schedule cosine_decay_schedule exponential_decay
        join_schedules linear_schedule piecewise_constant_schedule warmup_cosine_decay_schedule
        from_torch_state_dict to_torch_state_dict torch_optimizer InjectHyperparamsState
        MaskedNode MaskedState MultiSteps MultiStepsState inject_hyperparams masked
        skip_large_updates skip_not_finite""".split()
    )
    assert all(hasattr(optim, n) for n in optim.__all__)


# --------------------------------------------------------------------------------------
# chain, identity
# --------------------------------------------------------------------------------------


def test_chain_applies_in_order_and_tuples_state():
    tx = optim.chain(optim.scale(2.0), optim.clip(1.0), optim.trace(0.0))
    state = tx.init({"w": torch.zeros(2)})
    assert isinstance(state, tuple) and len(state) == 3
    u, _ = tx.update({"w": torch.tensor([0.4, -3.0])}, state)
    assert u["w"].tolist() == [0.800000011920929, -1.0]  # scaled, then clipped
    u, _ = optim.chain(optim.clip(1.0), optim.scale(2.0)).update(
        {"w": torch.tensor([3.0])}, ((), ())
    )
    assert u["w"].tolist() == [2.0]
    assert tx.update.parts[1] is not None


def test_chain_errors():
    with pytest.raises(TypeError, match=r"optim\.chain: argument 1 is a function"):
        optim.chain(optim.scale(1.0), lambda g: g)
    with pytest.raises(ValueError, match=r"state must be the tuple of 2 states .* length 1"):
        optim.chain(optim.scale(1.0), optim.scale(1.0)).update({}, (optim.EmptyState(),))


def test_identity():
    g = {"w": torch.ones(2)}
    u, s = optim.identity().update(g, optim.identity().init(g))
    assert u is g and s == optim.EmptyState()


# --------------------------------------------------------------------------------------
# apply_updates, apply_updates_
# --------------------------------------------------------------------------------------


def test_apply_updates():
    spec = {"w": (3, 2), "n": [(4,), ()]}
    p = make_tree(spec, 0, dtype=torch.float32)
    p["h"] = torch.ones(3, dtype=torch.bfloat16)
    u = optree.tree_map(lambda x: torch.randn(x.shape, dtype=torch.float64), p)
    before = snapshot((p, u))
    out = optim.apply_updates(p, u)
    assert bitwise_equal((p, u), before)
    for a, x, y in zip(leaves(out), leaves(p), leaves(u)):
        assert a.dtype == x.dtype and torch.equal(a, (x + y).to(x.dtype)) and a is not x
    p2 = optree.tree_map(lambda x: x.clone().requires_grad_(), p)
    assert not any(x.requires_grad for x in leaves(optim.apply_updates(p2, u)))


def test_apply_updates_in_place():
    p = make_tree({"w": (3, 2), "b": (2,)}, 0)
    ids = [id(x) for x in leaves(p)]
    u = make_tree({"w": (3, 2), "b": (2,)}, 1)
    expect = optim.apply_updates(p, u)
    out = optim.apply_updates_(p, u)
    assert out is p and [id(x) for x in leaves(p)] == ids and bitwise_equal(p, expect)


def test_apply_updates_structure_error_names_path():
    with pytest.raises(
        ValueError, match=r"optim\.apply_updates: params and updates differ .* \['b'\]"
    ):
        optim.apply_updates({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match=r"optim\.apply_updates_: params and updates differ"):
        optim.apply_updates_({"a": torch.ones(1)}, {"c": torch.ones(1)})


# --------------------------------------------------------------------------------------
# global_norm, learning_rate, donation
# --------------------------------------------------------------------------------------


def test_global_norm():
    t = make_tree({"a": (3, 4), "b": [(5,), ()]}, 0, dtype=torch.float32)
    ref = torch.sqrt(sum((x.double() ** 2).sum() for x in leaves(t)))
    n = optim.global_norm(t)
    assert n.dtype == torch.float32 and abs(n.item() - ref.item()) < 1e-5 * ref.item()
    t["c"] = torch.ones(2, dtype=torch.float64)
    t["i"] = torch.ones(2, dtype=torch.long)  # non-floating leaves do not count
    n = optim.global_norm(t)
    assert n.dtype == torch.float64 and abs(n.item() ** 2 - (ref.item() ** 2 + 2)) < 1e-4
    assert optim.global_norm({}).item() == 0.0


def test_learning_rate_walks_chains():
    p = {"w": torch.zeros(1)}
    assert optim.learning_rate(optim.adamw(0.3), optim.adamw(0.3).init(p)) == 0.3
    sched = optim.linear_schedule(1.0, 0.0, 4)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.chain(optim.sgd(sched)))
    s = tx.init(p)
    for step in range(6):
        assert optim.learning_rate(tx, s) == sched(step)
        _, s = tx.update({"w": torch.ones(1)}, s, p)
    assert optim.learning_rate(optim.scale(-1.0), optim.EmptyState()) is None
    assert optim.learning_rate(optim.scale_by_adam(), optim.scale_by_adam().init(p)) is None


def test_donation_context():
    assert not optim.donating()
    with optim.donation():
        assert optim.donating()
        with optim.donation():
            assert optim.donating()
        assert optim.donating()
    assert not optim.donating()


class _NewBytes(TorchDispatchMode):
    """Bytes of every tensor an op returns whose storage is not one of its inputs'."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            t.untyped_storage().data_ptr()
            for t in optree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in optree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.bytes += t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("eps_root", [0.0, 1e-12], ids=["kernel", "foreach"])
def test_donated_adamw_step_allocates_one_buffer_not_copies(eps_root):
    spec = {"w": (64, 32), "b": (32,), "e": (100, 16)}
    mask = lambda p: {k: v.ndim > 1 for k, v in p.items()}  # noqa: E731
    tx = optim.adamw(1e-3, weight_decay=0.1, mask=mask, eps_root=eps_root)
    params = make_tree(spec, 0, dtype=torch.float32)
    state = tx.init(params)
    size = sum(x.numel() * 4 for x in leaves(params))
    (g,) = grads_for(spec, 1, 0, dtype=torch.float32)
    with _NewBytes() as plain:
        tx.update(snapshot(g), state, params)
    with _NewBytes() as donated:
        with optim.donation():
            u, state = tx.update(g, state, params)
        optim.apply_updates_(params, u)
    assert plain.bytes >= 3 * size  # new mu, nu and updates
    # one params-sized buffer (the updates, or sqrt(nu_hat) + eps with the updates written
    # into the donated grads): no second mu, nu or params
    assert donated.bytes <= size + 1024


# --------------------------------------------------------------------------------------
# DTensor leaves (2 ranks, gloo): same values as plain tensors, layouts kept
# --------------------------------------------------------------------------------------


def _dtensor_worker(rank: int, world: int, path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        spec = {"w": (5, 3), "b": (3,), "r": (2, 2)}
        params = make_tree(spec, 0)
        grads = grads_for(spec, 3, 0)
        place = {"w": [Shard(0)], "b": [Shard(0)], "r": [Replicate()]}
        dist_tree = lambda t: {k: distribute_tensor(v, mesh, place[k]) for k, v in t.items()}  # noqa: E731
        norm = optim.global_norm(dist_tree(grads[0]))
        assert abs(norm.item() - optim.global_norm(grads[0]).item()) < 1e-12
        for make in (
            lambda: optim.chain(
                optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1)
            ),
            lambda: optim.lamb(1e-2),
            lambda: optim.sgd(0.1, momentum=0.9),
        ):
            tx = make()
            p, s = params, tx.init(params)
            dp = dist_tree(params)
            ds = tx.init(dp)
            for i, g in enumerate(grads):
                u, s = tx.update(g, s, p)
                p = optim.apply_updates(p, u)
                if i % 2:
                    with optim.donation():
                        du, ds = tx.update(dist_tree(g), ds, dp)
                    dp = optim.apply_updates_(dp, du)
                else:
                    du, ds = tx.update(dist_tree(g), ds, dp)
                    dp = optim.apply_updates(dp, du)
                assert all(isinstance(x, DTensor) for x in leaves((du, dp)))
            for k in spec:
                assert dp[k].placements == tuple(place[k])
                torch.testing.assert_close(dp[k].full_tensor(), p[k], rtol=1e-12, atol=1e-14)
        # a nan in rank 0's shard only: every rank skips the step
        tx = optim.apply_if_finite(optim.adam(1e-2), 3)
        bad = {k: v.clone() for k, v in grads[0].items()}
        bad["w"][0, 0] = float("nan")
        u, s = tx.update(dist_tree(bad), tx.init(dist_tree(params)), dist_tree(params))
        assert not s.last_finite and s.inner_state[0].count == 0
        assert all(bool((x.to_local() == 0).all()) for x in leaves(u))
    finally:
        dist.destroy_process_group()


def test_dtensor_leaves_match_plain_tensors():
    with tempfile.TemporaryDirectory() as d:
        env = {"OMP_NUM_THREADS": "1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            mp.start_processes(
                _dtensor_worker, args=(2, os.path.join(d, "store")), nprocs=2, start_method="spawn"
            )
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_sharded_norm_reduces_per_leaf_squares():
    seen = []

    def reduce(per_leaf):
        seen.append([x.item() for x in per_leaf])
        return 4 * torch.stack(per_leaf).sum()  # as if 4 ranks held equal shards

    u = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0, 0.0])}
    with optim.base.sharded_norm(reduce):
        assert optim.global_norm(u).item() == 10.0
        out, _ = optim.clip_by_global_norm(5.0).update(u, optim.EmptyState())
    assert seen == [[9.0, 16.0], [9.0, 16.0]]
    assert out["a"].tolist() == [1.5] and optim.global_norm(u).item() == 5.0  # outside: local


def test_sharded_norm_with_no_leaves_still_calls_the_reduce():
    # a rank whose part holds no floating leaves (a pipeline stage without params) must
    # still enter the reduce: the other ranks wait in its collective
    seen = []

    def reduce(per_leaf):
        seen.append(list(per_leaf))
        return torch.tensor(25.0, dtype=torch.float64)  # the other ranks' squares

    with optim.base.sharded_norm(reduce):
        assert optim.global_norm({}).item() == 5.0
        assert optim.global_norm({"i": torch.tensor([1])}).item() == 5.0  # no floating leaf
        out, _ = optim.clip_by_global_norm(1.0).update({}, optim.EmptyState())
    assert out == {} and seen == [[], [], []]
    assert optim.global_norm({}).item() == 0.0  # outside: no reduce, no leaves
