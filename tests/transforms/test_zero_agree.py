"""fs.zero on 2 gloo ranks: decisions over all the grads are global, replicas agree at init,
``has_aux`` grad functions work, and the aux / loss metrics are the ones documented.

Every check compares with a single-process reference (``fs.train_step`` on the global
batch, or plain tensors) computed inside each rank.
"""

from __future__ import annotations

import math

import pytest
import torch

import fsharding as fs
from fsharding import optim
from tests.dist_utils import raises, run

ROWS = 2  # rows of the batch per rank
STEPS = 3
POISONED = 1  # the step whose batch carries a NaN in rank 0's rows


def make_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),  # rank 0 holds rows 0-1, rank 1 rows 2-3
        "b": torch.randn(3, generator=g),
        "s": torch.tensor(0.5),  # 0-dim: replicated
    }


def loss_fn(p, batch):
    """A regression plus ``(w * c).sum()``: the grad of ``w`` is the batch mean of ``c``
    plus finite terms, so a NaN in ``c[:, 0]`` poisons exactly row 0 of ``w``'s grad."""
    h = torch.tanh(batch["x"] @ p["w"].T)  # (rows, 4)
    pred = h.sum(1) + (p["b"] * batch["x"]).sum(1) * p["s"]
    return ((pred - batch["y"]) ** 2).mean() + (p["w"] * batch["c"].mean(0)).sum()


def global_batches() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(STEPS):
        b = {
            "x": torch.randn(2 * ROWS, 3, generator=g),
            "y": torch.randn(2 * ROWS, generator=g),
            "c": torch.randn(2 * ROWS, 4, 3, generator=g) * 0.1,
        }
        if i == POISONED:
            b["c"][0, 0, 1] = math.nan  # row 0 of the global batch: rank 0's rows only
        out.append(b)
    return out


def local_batch(b: dict, rank: int) -> dict:
    return {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in b.items()}


OPTIMIZERS = {
    "adam": lambda: optim.apply_if_finite(optim.adam(1e-1), max_consecutive_errors=3),
    # clip inside: one rank entering the clip's norm all-reduce alone would hang
    "clip_adam": lambda: optim.apply_if_finite(
        optim.chain(optim.clip_by_global_norm(0.05), optim.adam(1e-1)),
        max_consecutive_errors=3,
    ),
}


def _full(x):
    return x.full_tensor() if type(x).__name__ == "DTensor" else x


def apply_if_finite_worker(name):
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    batches = global_batches()
    ref = fs.train_step(fs.value_and_grad(loss_fn), OPTIMIZERS[name]())
    ref_p, ref_s = ref.init(make_params())
    ref_states = []
    for b in batches:
        ref_p, ref_s, _ = ref.step(ref_p, ref_s, b)
        ref_states.append(ref_s)
    # the reference skips exactly the poisoned step
    assert [s.last_finite for s in ref_states] == [i != POISONED for i in range(STEPS)]
    out = {}
    for stage in (0, 1, 2, 3):
        step = fs.zero(fs.value_and_grad(loss_fn), OPTIMIZERS[name](), mesh=mesh, stage=stage)
        params, state = step.init(make_params())
        flags = []
        for i, b in enumerate(batches):
            params, state, _ = step.step(params, state, local_batch(b, rank), donate=i == 2)
            flags.append(tuple(state[:3]))  # notfinite_count, last_finite, total_notfinite
            assert flags[-1] == ref_states[i][:3], (stage, i, flags[-1], ref_states[i][:3])
        full = step.gather(params)
        for k, v in ref_p.items():
            torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6, msg=f"{stage} {k}")
        ref_leaves = fs.tree.leaves(ref_s)
        got = [_full(x) for x in fs.tree.leaves(state)]
        assert len(got) == len(ref_leaves)
        for a, e in zip(got, ref_leaves):
            if torch.is_tensor(e):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=f"stage {stage}")
            else:
                assert a == e
        out[stage] = flags
    torch.distributed.barrier()
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_apply_if_finite_under_zero_decides_for_all_ranks(name):
    """NaN in rank 0's rows only: every stage skips that step on both ranks, like the
    single-process run on the global batch (no divergence, and no hang with clipping
    inside: the timeout bounds it)."""
    res = run(apply_if_finite_worker, 2, name, timeout=90)
    assert res[0] == res[1]


# ----------------------------------------------------------------------------- init


def _rank_init_fn(path, meta):
    # unseeded in spirit: every rank draws other values
    g = torch.Generator().manual_seed(1000 + torch.distributed.get_rank())
    return torch.randn(meta.shape, generator=g, dtype=meta.dtype)


def init_worker():
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    batches = global_batches()[:1]
    mine = make_params(seed=10 + rank)  # rank-dependent init
    rank0 = make_params(seed=10)
    out = {}
    for stage in (0, 1, 2, 3):
        step = fs.zero(fs.value_and_grad(loss_fn), optim.adam(1e-1), mesh=mesh, stage=stage)
        params, state = step.init({k: v.clone() for k, v in mine.items()})
        full = step.gather(params)
        for k in rank0:  # every rank now holds rank 0's values (DDP's broadcast)
            torch.testing.assert_close(full[k], rank0[k], rtol=0, atol=0, msg=f"{stage} {k}")
        ref = fs.train_step(fs.value_and_grad(loss_fn), optim.adam(1e-1))
        rp, rs = ref.init({k: v.clone() for k, v in rank0.items()})
        rp, rs, _ = ref.step(rp, rs, batches[0])
        params, state, _ = step.step(params, state, local_batch(batches[0], rank))
        full = step.gather(params)
        for k in rp:
            torch.testing.assert_close(full[k], rp[k], rtol=1e-5, atol=1e-6, msg=f"{stage} {k}")
        # meta init whose init_fn draws other values on every rank
        meta = {k: v.to("meta") for k, v in mine.items()}
        params, _ = step.init(meta, init_fn=_rank_init_fn)
        full = step.gather(params)
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, {k: v.clone() for k, v in full.items()})
        for k in full:
            assert torch.equal(gathered[0][k], gathered[1][k]), (stage, k)
        for k, m in meta.items():  # rank 0's init_fn values (at stage 3: as shards)
            g = torch.Generator().manual_seed(1000)
            want = torch.randn(m.shape, generator=g, dtype=m.dtype)
            torch.testing.assert_close(full[k], want, rtol=0, atol=0, msg=f"{stage} {k}")
        out[stage] = True
    torch.distributed.barrier()
    return out


def test_zero_init_makes_replicas_agree():
    res = run(init_worker, 2, timeout=120)
    assert all(len(r) == 4 for r in res)


# ----------------------------------------------------------------------------- has_aux


def aux_loss(p, batch):
    loss = loss_fn(p, {**batch, "c": torch.zeros_like(batch["c"])})
    return loss, {"rows": batch["x"].sum(1), "n": batch["x"].shape[0]}


def aux_worker():
    """has_aux grad functions under fs.zero: same loop as train_step (no other line
    changed); loss a 0-dim global mean; aux this rank's, stacked over microbatches."""
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    batches = [dict(b, c=torch.zeros_like(b["c"])) for b in global_batches()]
    vg = fs.value_and_grad(aux_loss, has_aux=True)
    fns = {"plain": vg, "accumulate": fs.accumulate(vg, steps=2)}
    out = {}
    for stage in (0, 1, 2, 3):
        for name, gf in fns.items():
            ref = fs.train_step(fs.value_and_grad(loss_fn), optim.adam(1e-1))
            rp, rs = ref.init(make_params())
            for scale in (None, 8.0):  # a number is a static loss scale
                step = fs.zero(gf, optim.adam(1e-1), mesh=mesh, stage=stage, loss_scale=scale)
                params, state = step.init(make_params())
                for b in batches:
                    local = local_batch(b, rank)
                    params, state, m = step.step(params, state, local)
                    assert m["loss"].dim() == 0, m["loss"]
                    float(m["loss"])
                    rows = local["x"].sum(1)
                    if name == "plain":
                        torch.testing.assert_close(m["aux"]["rows"], rows)
                        assert m["aux"]["n"] == ROWS
                    else:  # stacked along a new dim 0: one row per microbatch
                        torch.testing.assert_close(m["aux"]["rows"], rows.reshape(2, ROWS // 2))
                        assert m["aux"]["n"].tolist() == [ROWS // 2] * 2
                    if scale is not None:
                        assert m["loss_scale"] == 8.0 and not m["skipped"]
                    if scale is None:
                        rp, rs, rm = ref.step(rp, rs, b)
                        torch.testing.assert_close(m["loss"], rm["loss"], rtol=1e-5, atol=1e-6)
                full = step.gather(params)
                for k in rp:
                    torch.testing.assert_close(full[k], rp[k], rtol=1e-5, atol=1e-6)
                out[(stage, name, scale)] = True
    torch.distributed.barrier()
    return len(out)


def test_zero_has_aux_metrics_on_2_ranks():
    res = run(aux_worker, 2, timeout=180)
    assert res == [16, 16]


# ----------------------------------------------------------------------------- token weights


def token_loss(p, batch):
    """The mean over valid tokens (mask 1) of a per-row loss: a token-mean loss."""
    h = torch.tanh(batch["x"] @ p["w"].T).sum(1) + (p["b"] * batch["x"]).sum(1) * p["s"]
    per_row = (h - batch["y"]) ** 2
    return (per_row * batch["mask"]).sum() / batch["mask"].sum()


def tokens(batch):
    return batch["mask"].sum()


def weights_worker():
    """Ranks with different numbers of valid tokens: fs.zero over token-weighted
    fs.accumulate gives the global batch's token mean (not the mean of the ranks' means),
    as a single process accumulating the whole global batch does."""
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(5)
    rows = 4  # per rank: 2 microbatches of 2
    batches = []
    for i in range(STEPS):
        mask = torch.ones(2 * rows)
        mask[rows:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # rank 1: 1 valid token, rank 0: 4
        if i == 2:
            mask[rows:] = 0.0  # rank 1: no valid token at all (its accumulate alone: raise)
        batches.append(
            {
                "x": torch.randn(2 * rows, 3, generator=g),
                "y": torch.randn(2 * rows, generator=g),
                "mask": mask,
            }
        )
    vg = fs.value_and_grad(token_loss)
    ref = fs.train_step(fs.accumulate(vg, steps=4, weights=tokens), optim.adam(1e-1))
    rp, rs = ref.init(make_params())
    ref_losses = []
    for b in batches:
        rp, rs, m = ref.step(rp, rs, b)
        ref_losses.append(m["loss"])
    gf = fs.accumulate(vg, steps=2, weights=tokens)
    for stage in (0, 1, 2, 3):
        step = fs.zero(gf, optim.adam(1e-1), mesh=mesh, stage=stage)
        params, state = step.init(make_params())
        for i, b in enumerate(batches):
            local = {k: v[rank * rows : (rank + 1) * rows] for k, v in b.items()}
            params, state, m = step.step(params, state, local)
            torch.testing.assert_close(m["loss"], ref_losses[i], rtol=1e-5, atol=1e-6)
        full = step.gather(params)
        for k in rp:
            torch.testing.assert_close(full[k], rp[k], rtol=1e-5, atol=1e-6, msg=f"{stage} {k}")
    # gather="blocks" reduces inside backward: weights must agree between ranks (else a
    # ValueError on every rank, before any backward); equal ones give the global mean
    gb = fs.accumulate(fs.value_and_grad(fs.gather(token_loss)), steps=2, weights=tokens)
    for stage in (2, 3):
        step = fs.zero(gb, optim.adam(1e-1), mesh=mesh, stage=stage, gather="blocks")
        params, state = step.init(make_params())
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batches[0].items()}
        msg = raises(lambda s=step, a=(params, state, local): s.step(*a), ValueError)
        assert "weights differ between ranks" in msg, msg
        b = dict(batches[0], mask=torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 0]))
        rp, rs = ref.init(make_params())
        rp, rs, rm = ref.step(rp, rs, b)
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in b.items()}
        params, state, m = step.step(params, state, local)
        torch.testing.assert_close(m["loss"], rm["loss"], rtol=1e-5, atol=1e-6)
        full = step.gather(params)
        for k in rp:
            torch.testing.assert_close(full[k], rp[k], rtol=1e-5, atol=1e-6, msg=f"{stage} {k}")
    torch.distributed.barrier()
    return True


def test_zero_token_weights_are_global():
    assert run(weights_worker, 2, timeout=120) == [True, True]
