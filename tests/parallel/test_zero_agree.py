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


# ------------------------------------------------------------- review: one bad rank's weights


def bad_weights_worker(kind, blocks):
    """Rank 1's weights are bad (NaN, inf, negative, a string, a raising callable); rank 0's
    fine. Both ranks must raise together (before: rank 1 raised alone, rank 0 hung in the
    weights' all-reduce), rank 1 naming its own weight."""
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    bad = {
        "nan": lambda n: n * math.nan,
        "inf": lambda n: n * math.inf,
        "negative": lambda n: -n,
        "string": lambda n: "many",
        "raises": lambda n: {}["no such key"],
    }[kind]

    def weights(b):
        n = b["mask"].sum()
        return bad(n) if rank == 1 else n

    loss = fs.gather(token_loss) if blocks else token_loss
    gf = fs.accumulate(fs.value_and_grad(loss), steps=2, weights=weights)
    step = fs.zero(
        gf, optim.sgd(0.1), mesh=mesh, stage=2, gather="blocks" if blocks else "boundary"
    )
    params, state = step.init(make_params())
    g = torch.Generator().manual_seed(0)
    b = {"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, generator=g)}
    b["mask"] = torch.ones(4)
    try:
        step.step(params, state, b)
        out = ("returned", "")
    except Exception as e:  # noqa: BLE001
        out = (type(e).__name__, str(e))
    # the ranks are still in step: a collective after the error goes through
    flag = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(flag)
    return out, float(flag)


@pytest.mark.parametrize(
    "kind, blocks",
    [("nan", False), ("inf", False), ("negative", False), ("string", False)]
    + [("raises", False), ("nan", True)],
)
def test_one_rank_with_bad_weights_raises_on_every_rank(kind, blocks):
    res = run(bad_weights_worker, 2, kind, blocks, timeout=60)
    (t0, m0), s0 = res[0]
    (t1, m1), s1 = res[1]
    assert s0 == s1 == 3.0
    assert t0 == "ValueError" and "another rank" in m0 and "fs.zero.step" in m0, m0
    want = {"string": "TypeError", "raises": "KeyError"}.get(kind, "ValueError")
    assert t1 == want, (t1, m1)
    if kind not in ("string", "raises"):
        assert "microbatch 0" in m1 and "fs.accumulate: weights returned" in m1, m1


# ------------------------------------------------------ review: token-weight factor, exactly


def bf16_token_loss(p, b):
    return (p["w"] * b["x"]).sum() / b["mask"].sum()


def factor_worker(stage):
    """Rank 0 holds 1 token, rank 1 holds 2: rank 0's bf16 grads are scaled by
    1·2/3 (its share of the global token mean). The factor is applied as a float (the
    product rounded once to bf16; before, the factor itself was rounded to bf16 first:
    2/3 -> 0.66797, a 2e-3 bias) and in place on the grads grad_fn returned (no copy)."""
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4096, generator=g).to(torch.bfloat16)
    b = {
        "x": x if rank == 0 else torch.zeros_like(x),
        "mask": torch.tensor([1.0 if rank == 0 else 2.0]),
    }
    returned = []

    def grad_fn(p, b):
        loss, grads = fs.value_and_grad(bf16_token_loss)(p, b)
        returned.append(grads["w"])
        return loss, grads

    gf = fs.accumulate(grad_fn, steps=1, weights=lambda b: b["mask"].sum())
    step = fs.zero(gf, optim.sgd(1.0), mesh=mesh, stage=stage)
    params, state = step.init({"w": torch.zeros(4096, dtype=torch.bfloat16)})
    params, state, m = step.step(params, state, b)
    f = 1.0 * 2 / 3  # rank 0: T·dp / W = 1·2/3
    grad0 = x[0]  # d loss / d w on rank 0 (mask sum 1)
    scaled = (grad0.float() * torch.tensor(f, dtype=torch.float32)).to(torch.bfloat16)
    want = -(scaled / 2)  # mean over the 2 ranks (rank 1's grads are 0), sgd(1.0)
    got = _full(step.gather(params)["w"])
    exact = torch.equal(got, want)
    in_place = rank != 0 or torch.equal(returned[0], scaled)
    bias = float((got.double() - want.double()).abs().max())
    return exact, in_place, bias


@pytest.mark.parametrize("stage", [0, 3])
def test_token_weight_factor_is_exact_and_in_place(stage):
    res = run(factor_worker, 2, stage, timeout=60)
    assert res[0] == res[1]
    exact, in_place, bias = res[0]
    assert exact, f"bias {bias}"
    assert in_place


# ------------------------------------------- review: a rank whose weights are all 0, metrics


def aux_token_loss(p, b):
    per = (b["x"] @ p["w"] - b["y"]) ** 2
    return (per * b["mask"]).sum() / b["mask"].sum(), {"n": b["mask"].sum(), "rows": per}


def empty_rank_worker(stage):
    """Rank 1 has no valid token: it must return the same metrics as rank 0 (aux with NaN
    rows, loss of the same dtype and device). Before: no 'aux', and a float32 loss where
    rank 0's was bfloat16."""
    mesh = fs.Mesh(dp=2)
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(1)
    b = {
        "x": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "y": torch.randn(4, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([1.0, 1.0, 0.0, 1.0] if rank == 0 else [0.0] * 4).to(torch.bfloat16),
    }
    gf = fs.accumulate(
        fs.value_and_grad(aux_token_loss, has_aux=True), steps=2, weights=lambda b: b["mask"].sum()
    )
    step = fs.zero(gf, optim.sgd(0.1), mesh=mesh, stage=stage)
    params, state = step.init({"w": torch.ones(3, dtype=torch.bfloat16)})
    out = []
    for _ in range(2):
        params, state, m = step.step(params, state, b)
        aux = m.get("aux")
        out.append(
            (
                sorted(m),
                m["loss"].dtype,
                m["loss"].device.type,
                float(m["loss"]),
                None if aux is None else {k: (v.shape, v.dtype) for k, v in aux.items()},
                None if aux is None else bool(aux["rows"].isnan().all()),
            )
        )
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_rank_with_no_tokens_returns_the_same_metrics(stage):
    r0, r1 = run(empty_rank_worker, 2, stage, timeout=90)
    for a, b in zip(r0, r1):
        assert a[0] == b[0] == ["aux", "grad_norm", "loss", "lr"], (a[0], b[0])
        assert a[1:4] == b[1:4], (a[1:4], b[1:4])
        assert a[1] == torch.bfloat16
        assert a[4] == b[4], (a[4], b[4])
        assert a[5] is False and b[5] is True  # rank 1's rows: NaN (skipped microbatches)


# --------------------------------------- review: init writes in place, buckets stay bounded


def init_buckets_worker(stage):
    """Rank-dependent params, one non-contiguous (a transpose) and one bigger than the
    bucket. Every rank ends with rank 0's values; at stages 0-2 written into the given
    tensors, the non-contiguous one too (before: a copy on ranks != 0). Broadcast buffers
    never exceed max(bucket, the largest leaf): the bucket is flushed before a leaf that
    would overflow it, and a leaf as big as the bucket is broadcast directly (before:
    torch.cat of the pending leaves with it)."""
    import torch.distributed as dist

    from fsharding.parallel import _buckets as lay

    rank = torch.distributed.get_rank()
    mesh = fs.Mesh(dp=2)
    g = torch.Generator().manual_seed(100 + rank)
    mine = {
        "a": torch.randn(10, generator=g),
        "b": torch.randn(4, 3, generator=g).t(),  # non-contiguous
        "big": torch.randn(40, generator=g),  # 160 bytes > the 100-byte bucket
        "c": torch.randn(10, generator=g),
    }
    g0 = torch.Generator().manual_seed(100)
    rank0 = {
        "a": torch.randn(10, generator=g0),
        "b": torch.randn(4, 3, generator=g0).t(),
        "big": torch.randn(40, generator=g0),
        "c": torch.randn(10, generator=g0),
    }
    before = {k: v.clone() for k, v in mine.items()}
    sizes, ptrs = [], []
    orig_bytes, orig_bcast = lay.BUCKET_BYTES, dist.broadcast

    def bcast(t, *a, **k):
        sizes.append(t.numel() * t.element_size())
        ptrs.append(t.data_ptr())
        return orig_bcast(t, *a, **k)

    lay.BUCKET_BYTES, dist.broadcast = 100, bcast
    try:
        step = fs.zero(fs.value_and_grad(loss_fn), optim.sgd(0.1), mesh=mesh, stage=stage)
        params, _ = step.init(mine)
    finally:
        lay.BUCKET_BYTES, dist.broadcast = orig_bytes, orig_bcast
    full = step.gather(params)
    agree = all(torch.equal(_full(full[k]), rank0[k]) for k in rank0)
    if stage < 3:  # rank 0's values written into the given tensors, returned as params
        written = all(
            torch.equal(mine[k], rank0[k]) and params[k].data_ptr() == mine[k].data_ptr()
            for k in mine
        )
    else:  # stage 3 keeps its rows of rank 0's leaves; the given tensors are not written
        written = all(torch.equal(mine[k], before[k]) for k in mine)
    big_direct = mine["big"].data_ptr() in ptrs
    return agree, written, sizes, big_direct


@pytest.mark.parametrize("stage", [0, 3])
def test_init_broadcast_writes_in_place_with_bounded_buckets(stage):
    res = run(init_buckets_worker, 2, stage, timeout=60)
    for agree, written, sizes, _ in res:
        assert agree and written
        assert max(sizes) <= 160, sizes  # max(100-byte bucket, the 160-byte leaf)
        assert sizes == [40 + 48, 160, 40], sizes  # a+b, big alone, c
    assert res[0][3]  # rank 0 broadcasts its own big tensor (no copy)
    if stage < 3:
        assert res[1][3]  # rank 1 receives straight into the given tensor
