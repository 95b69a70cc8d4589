"""Decisions that depend on all the grads are agreed by every rank holding shards (issue 9
point 2): ``sharded_norm(..., reduce_all=)`` (what ``fs.zero`` passes with plain local
shards), else the DTensor leaves' own mesh, else local."""

from __future__ import annotations

import pytest
import torch

from fsharding import optim
from fsharding.optim import base
from tests.dist_utils import run

NAN = float("nan")


def _sum_sq(sq):
    return torch.stack(sq).sum()


def _leaf_sq(positions, sq):
    return sq


def test_reduce_all_another_rank_saw_nan_skips_finite_local_grads():
    calls = []

    def reduce_all(flag):
        calls.append((flag.dtype, flag.dim(), int(flag)))
        return torch.zeros_like(flag)  # another rank saw a NaN

    tx = optim.apply_if_finite(optim.adam(0.1), max_consecutive_errors=3)
    p = {"w": torch.ones(3)}
    s = tx.init(p)
    with base.sharded_norm(_sum_sq, _leaf_sq, reduce_all=reduce_all):
        u, s2 = tx.update({"w": torch.ones(3)}, s, p)
    assert calls == [(torch.int32, 0, 1)]
    assert torch.equal(u["w"], torch.zeros(3))
    assert s2.inner_state is s.inner_state and not s2.last_finite
    assert (s2.notfinite_count, s2.total_notfinite) == (1, 1)


def test_reduce_all_every_rank_finite_applies():
    tx = optim.apply_if_finite(optim.adam(0.1), max_consecutive_errors=3)
    p = {"w": torch.ones(3)}
    ref, _ = optim.adam(0.1).update({"w": torch.ones(3)}, optim.adam(0.1).init(p), p)
    with base.sharded_norm(_sum_sq, _leaf_sq, reduce_all=lambda f: torch.ones_like(f)):
        u, s = tx.update({"w": torch.ones(3)}, tx.init(p), p)
    assert s.last_finite and s.inner_state[0].count == 1
    torch.testing.assert_close(u["w"], ref["w"], rtol=0, atol=0)


def test_reduce_all_local_nan_skips_and_reports_zero_to_the_reducer():
    seen = []

    def reduce_all(flag):  # a reducer that (wrongly) claims every rank is finite
        seen.append(int(flag))
        return torch.ones_like(flag)

    tx = optim.apply_if_finite(optim.sgd(1.0), max_consecutive_errors=3)
    p = {"w": torch.ones(2)}
    with base.sharded_norm(_sum_sq, _leaf_sq, reduce_all=reduce_all):
        u, s = tx.update({"w": torch.tensor([NAN, 1.0])}, tx.init(p), p)
    assert seen == [0] and not s.last_finite and torch.equal(u["w"], torch.zeros(2))


def test_agree_outside_any_context_is_local():
    assert base.agree(torch.tensor(True)) is True
    assert base.agree(torch.tensor(False)) is False
    assert base.agree(torch.tensor(1, dtype=torch.int32)) is True
    with base.sharded_norm(_sum_sq, reduce_all=lambda f: torch.zeros_like(f)):
        assert base.agree(torch.tensor(True)) is False
    assert base.agree(torch.tensor(True)) is True  # the context is reset on exit


def test_reduce_all_bad_results_are_named():
    with base.sharded_norm(_sum_sq, reduce_all=lambda f: [1]):
        with pytest.raises(TypeError, match=r"reduce_all.*returned list"):
            base.agree(torch.tensor(True))


def test_trust_ratio_refuses_sharded_context_without_leaf_reducer():
    # local per-leaf norms of shards would be silently wrong: refuse, naming the fix
    tx = optim.scale_by_trust_ratio()
    p = {"w": torch.ones(2)}
    with base.sharded_norm(_sum_sq):
        with pytest.raises(ValueError, match=r"reduce_leaves"):
            tx.update({"w": torch.ones(2)}, tx.init(p), p)


# --------------------------------------------------------------------------------------
# 2 gloo ranks
# --------------------------------------------------------------------------------------


def _zero_like_worker() -> dict:
    """The path fs.zero uses: plain local shards inside sharded_norm; a NaN in rank 0's rows
    only. Every rank must skip (and not enter the clip's all-reduce alone: a hang)."""
    import torch.distributed as dist

    rank = dist.get_rank()

    def sq(per_leaf):
        t = torch.stack(per_leaf).sum().double()
        dist.all_reduce(t)
        return t

    def leaf_sq(positions, s):
        s = s.clone()
        dist.all_reduce(s)
        return s

    def reduce_all(flag):
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag

    full_p = torch.arange(8.0).reshape(4, 2)
    full_g = torch.ones(4, 2)
    rows = slice(2 * rank, 2 * rank + 2)
    p = {"w": full_p[rows].clone()}
    g = {"w": full_g[rows].clone()}
    if rank == 0:
        g["w"][0, 0] = NAN
    out = {}
    for name, make in (
        ("adam", lambda: optim.apply_if_finite(optim.adam(0.1), 2)),
        (
            "clip",
            lambda: optim.apply_if_finite(
                optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1)), 2
            ),
        ),
        ("lamb", lambda: optim.apply_if_finite(optim.lamb(0.1), 2)),
    ):
        tx = make()
        s = tx.init(p)
        with base.sharded_norm(sq, leaf_sq, reduce_all=reduce_all):
            u, s = tx.update({"w": g["w"].clone()}, s, p)
            skipped = not s.last_finite and bool((u["w"] == 0).all())
            # then a finite step: every rank runs the clip's all-reduce together
            u2, s = tx.update({"w": full_g[rows].clone()}, s, p)
        out[name] = (skipped, s.last_finite, u2["w"])
    return out


def test_zero_like_local_shards_agree_on_two_ranks():
    res = run(_zero_like_worker, 2)
    for name in ("adam", "clip", "lamb"):
        for rank in (0, 1):
            skipped, last_finite, _ = res[rank][name]
            assert skipped and last_finite, (name, rank)
    # the clip saw the global norm (sqrt(8) > 1): both ranks' halves scaled alike; equals a
    # single-process run on the full tree
    for name, make in (
        ("clip", lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1))),
        ("lamb", lambda: optim.lamb(0.1)),
    ):
        tx = make()
        fp = {"w": torch.arange(8.0).reshape(4, 2)}
        ref, _ = tx.update({"w": torch.ones(4, 2)}, tx.init(fp), fp)
        got = torch.cat([res[0][name][2], res[1][name][2]])
        torch.testing.assert_close(got, ref["w"])


def _own_mesh_worker() -> dict:
    """DTensor leaves on a one-rank mesh each: the flag is agreed over the DTensors' own
    mesh, not the default group (rank 1, finite, must step while rank 0 skips)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    rank = dist.get_rank()
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = DeviceMesh("cpu", [rank])
    g = torch.ones(3)
    if rank == 0:
        g[1] = NAN
    p = {"w": distribute_tensor(torch.ones(3), mesh, [Replicate()])}
    tx = optim.apply_if_finite(optim.adam(0.1), 2)
    u, s = tx.update({"w": distribute_tensor(g, mesh, [Replicate()])}, tx.init(p), p)
    return {"last_finite": s.last_finite, "count": s.inner_state[0].count}


def test_dtensor_flag_agreed_over_their_own_mesh():
    res = run(_own_mesh_worker, 2)
    assert res[0] == {"last_finite": False, "count": 0}
    assert res[1] == {"last_finite": True, "count": 1}


def _two_rank_mesh_worker() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("a", "b"))
    g = torch.ones(4, 2)
    g[0, 0] = NAN  # in rank 0's rows only
    p = {"w": distribute_tensor(torch.ones(4, 2), mesh, [Shard(0), Shard(1)])}
    tx = optim.apply_if_finite(optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1)), 2)
    u, s = tx.update({"w": distribute_tensor(g, mesh, [Shard(0), Shard(1)])}, tx.init(p), p)
    # one global shape, other placements: other local shapes, named before any kernel
    errors = []
    rep = {"w": distribute_tensor(torch.ones(4, 2), mesh, [Replicate(), Replicate()])}
    for fn in (
        lambda: optim.apply_updates(p, rep),
        lambda: optim.apply_updates_(p, rep),
        lambda: optim.adam(0.1).update(rep, optim.adam(0.1).init(p), p),
    ):
        try:
            fn()
        except ValueError as e:
            errors.append(str(e))
    return {"last_finite": s.last_finite, "count": s.inner_state[1][0].count, "errors": errors}


def test_dtensor_flag_agreed_over_a_2d_mesh():
    res = run(_two_rank_mesh_worker, 2)
    for r in res:
        assert (r["last_finite"], r["count"]) == (False, 0)
        assert len(r["errors"]) == 3, r["errors"]
        for e in r["errors"]:
            assert "['w'] has shape (4, 2) but" in e and "(local shard)" in e and "(2, 2)" in e, e


def test_decision_in_a_sharded_block_without_reduce_all_is_refused():
    # each rank would decide on its own shards: refuse rather than diverge or hang
    tx = optim.apply_if_finite(optim.adam(0.1), 2)
    p = {"w": torch.ones(2)}
    with base.sharded_norm(_sum_sq, _leaf_sq):
        with pytest.raises(RuntimeError, match=r"reduce_all"):
            tx.update({"w": torch.ones(2)}, tx.init(p), p)


def test_multi_steps_skip_is_agreed_through_reduce_all():
    ms = optim.MultiSteps(optim.sgd(1.0), 1, should_skip_update_fn=optim.skip_not_finite)
    p = {"w": torch.ones(2)}
    s = ms.init(p)
    with base.sharded_norm(_sum_sq, _leaf_sq, reduce_all=lambda f: torch.zeros_like(f)):
        u, s = ms.update({"w": torch.ones(2)}, s, p)  # finite here, not on another rank
    assert torch.equal(u["w"], torch.zeros(2)) and s.gradient_step == 0
    with base.sharded_norm(_sum_sq, _leaf_sq, reduce_all=lambda f: f):
        u, s = ms.update({"w": torch.ones(2)}, s, p)
    assert torch.equal(u["w"], -torch.ones(2)) and s.gradient_step == 1
