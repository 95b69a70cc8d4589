"""fs.zero(deterministic=True): the split of K microbatches into dp ranks x K/dp
accumulation steps does not change a single bit of the params.

The reference is one process: ``fs.train_step(fs.accumulate(vg, steps=K, deterministic=True),
adamw)`` on the global batch (computed in the test process). Every split — 2 x K/2 and
4 x K/4 ranks under ``fs.zero(deterministic=True)`` at every stage, K x 1 (each rank one
microbatch, no ``fs.accumulate``), hybrid sharding on a 2 x 2 mesh — must give params and
losses ``torch.equal`` to it after 3 AdamW steps, on every rank. The same runs without
``deterministic=True`` must differ (float32, inputs spanning six orders of magnitude), so
an implementation that ignored the flag fails. The models and shapes are drawn at random
from a seed per case; two launches in all (2 and 4 gloo ranks).
"""

from __future__ import annotations

import math

import pytest
import torch

import fsharding as fs
from fsharding import optim
from tests.dist_utils import raises, run

STEPS = 3  # optimizer steps
ROWS = 2  # rows per microbatch (fixed: the per-microbatch computation is split-free)


def _same(a, b) -> bool:
    """Bitwise equal, a NaN loss (a skipped step) matching a NaN."""
    return torch.equal(a, b) or bool(a.isnan() and b.isnan())


def make_case(seed: int, k: int, poison: bool = False) -> dict:
    """Random MLP params and ``STEPS`` global batches of ``k`` microbatches (wide range)."""
    g = torch.Generator().manual_seed(seed)
    d_in, hid, d_out = (int(torch.randint(2, 7, (1,), generator=g)) for _ in range(3))
    params = {
        "w1": torch.randn(d_in, hid, generator=g),
        "b1": torch.randn(hid, generator=g),
        "w2": torch.randn(hid, d_out, generator=g) / hid,
        "s": torch.tensor(0.7),  # 0-dim: replicated
    }
    batches = []
    n = k * ROWS
    for _ in range(STEPS):
        mag = 10 ** (torch.rand(n, d_in, generator=g) * 6 - 3)
        mask = (torch.rand(n, generator=g) < 0.7).float()
        mask[0] = 1.0
        batches.append(
            {
                "x": torch.randn(n, d_in, generator=g) * mag,
                "y": torch.randn(n, d_out, generator=g),
                "mask": mask,
            }
        )
    if poison:
        batches[1]["x"][0, 0] = math.nan  # global row 0: rank 0's first microbatch
    return {"params": params, "batches": batches}


def loss_fn(p, b):
    """Masked token mean: ``Σ mask·rowloss / Σ mask`` (0/0 never happens: see weights)."""
    h = torch.tanh(b["x"] @ p["w1"] + p["b1"])
    row = ((h @ p["w2"] * p["s"] - b["y"]) ** 2).mean(-1)
    return (row * b["mask"]).sum() / b["mask"].sum().clamp_min(1.0)


def count(b):
    return b["mask"].sum()


def grad_fn(k: int, weighted: bool, det: bool, *, plain: bool = False):
    vg = fs.value_and_grad(loss_fn)
    if plain:  # K x 1: one microbatch per rank, no fs.accumulate at all
        return vg
    return fs.accumulate(vg, steps=k, weights=count if weighted else None, deterministic=det)


def optimizer(extra: str = "", fused: bool = False):
    """AdamW. ``fused``: ``optim.adamw`` (torch's fused kernel, on CPU vectorised with FMA
    and a scalar tail: an element's bits depend on its position in the tensor, so only
    runs whose optimizer sees full tensors — stage 0 — can use it); else the same formula
    as a chain of elementwise foreach transforms, which any shard gives the same bits."""
    if fused:
        adamw = optim.adamw(1e-2, weight_decay=0.1)
    else:
        adamw = optim.chain(
            optim.scale_by_adam(),
            optim.add_decayed_weights(0.1),
            optim.scale_by_learning_rate(1e-2),
        )
    if extra == "clip":
        return optim.chain(optim.clip_by_global_norm(0.5), adamw)
    if extra == "finite":  # (not on 4 ranks: tree.all_finite fails on a rank's empty shard)
        return optim.apply_if_finite(adamw, max_consecutive_errors=5)
    return adamw


def reference(case: dict, k_total: int, weighted: bool, det: bool, extra="", fused=False):
    step = fs.train_step(grad_fn(k_total, weighted, det), optimizer(extra, fused))
    params, state = step.init({n: v.clone() for n, v in case["params"].items()})
    losses = []
    for b in case["batches"]:
        params, state, m = step.step(params, state, b)
        losses.append(m["loss"])
    return params, losses


def float64_reference(case: dict, k: int, weighted: bool):
    """Plain float64 PyTorch on the global batch: the token mean of every microbatch's
    tokens (weighted), or the mean of the ``k`` microbatches' losses (equal weights)."""

    def f(p, b):
        if weighted:
            return loss_fn(p, b)
        chunks = [{n: v.chunk(k)[i] for n, v in b.items()} for i in range(k)]
        return torch.stack([loss_fn(p, c) for c in chunks]).mean()

    step = fs.train_step(fs.value_and_grad(f), optimizer())
    params, state = step.init({n: v.double() for n, v in case["params"].items()})
    for b in case["batches"]:
        params, state, _ = step.step(params, state, {n: v.double() for n, v in b.items()})
    return params


def _local(b: dict, rank: int, n: int) -> dict:
    rows = b["x"].shape[0] // n
    return {key: v[rank * rows : (rank + 1) * rows] for key, v in b.items()}


def _run_split(case, k_total, weighted, det, *, stage, mesh, axis="dp", plain=False, extra=""):
    n = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    rank = torch.distributed.get_rank()
    gf = grad_fn(k_total // n, weighted, det, plain=plain)
    opt = optimizer(extra, fused=stage == 0)
    step = fs.zero(gf, opt, mesh=mesh, stage=stage, axis=axis, deterministic=det)
    params, state = step.init({name: v.clone() for name, v in case["params"].items()})
    losses = []
    for b in case["batches"]:
        params, state, m = step.step(params, state, _local(b, rank, n))
        losses.append(m["loss"])
    return step.gather(params), losses


# (seed, K, stage, weighted, deterministic, K x 1 without accumulate, optimizer extra)
CASES_2 = [
    *[
        (10 + i, k, st, w, True, False, "")
        for i, (k, st, w) in enumerate(
            (k, st, w) for k in (2, 4, 8) for st in (0, 1, 2, 3) for w in (False, True)
        )
    ],
    (40, 2, 0, False, True, True, ""),  # 2 x 1: plain value_and_grad on each rank
    (41, 2, 3, True, True, False, ""),  # token-weighted 2 x 1 (rank 1 may have no tokens)
    (42, 4, 0, False, True, False, "clip"),  # clip_by_global_norm at stage 0: still bitwise
    # a NaN in rank 0's microbatch at step 1: apply_if_finite skips it on every rank
    (43, 4, 3, False, True, False, "finite"),
    (44, 4, 0, True, True, False, "finite"),
    # the same splits without deterministic=True (they must differ somewhere)
    *[
        (50 + i, k, st, False, False, False, "")
        for i, (k, st) in enumerate((k, st) for k in (4, 8) for st in (0, 3))
    ],
]

CASES_4 = [
    *[
        (60 + i, k, st, w, True, False, "")
        for i, (k, st, w) in enumerate(
            (k, st, w) for k in (4, 8) for st in (0, 3) for w in (False, True)
        )
    ],
    (70, 8, 1, False, True, False, ""),
    (71, 8, 2, True, True, False, ""),
    (72, 4, 0, False, True, True, ""),  # 4 x 1
    (73, 4, 3, True, True, False, ""),  # 4 x 1 token-weighted (accumulate steps=1)
    *[(80 + i, 8, st, False, False, False, "") for i, st in enumerate((0, 3))],
]

HSDP_CASES = [(90, 8, 3, True), (91, 4, 0, False), (92, 8, 2, False)]  # (seed, K, stage, w)


def _case_runs(cases, mesh):
    out = []
    for seed, k, st, w, det, plain, extra in cases:
        case = make_case(seed, k, poison=extra == "finite")
        out.append(_run_split(case, k, w, det, stage=st, mesh=mesh, plain=plain, extra=extra))
    return out


def two_rank_worker():
    mesh = fs.Mesh(dp=2)
    results = _case_runs(CASES_2, mesh)
    errors = {}
    # K/dp not a power of two: K = 6 as 2 x 3 raises on every rank, naming steps
    case = make_case(1, 6)
    errors["pow2"] = raises(
        lambda: _run_split(case, 6, False, True, stage=3, mesh=mesh), ValueError
    )
    # a sequential (non-deterministic) accumulate inside the deterministic step
    step = fs.zero(grad_fn(2, False, False), optimizer(), mesh=mesh, stage=0, deterministic=True)
    params, state = step.init(make_case(2, 4)["params"])
    errors["nondet"] = raises(
        lambda: step.step(params, state, _local(make_case(2, 4)["batches"][0], 0, 1)),
        ValueError,
    )
    return results, errors


def four_rank_worker():
    results = _case_runs(CASES_4, fs.Mesh(dp=4))
    hsdp = fs.Mesh(replicate=2, shard=2)  # canonical order: replicate-major = rank order
    for seed, k, st, w in HSDP_CASES:
        case = make_case(seed, k)
        results.append(
            _run_split(case, k, w, True, stage=st, mesh=hsdp, axis=("replicate", "shard"))
        )
    return results


def _check(cases, per_rank, label):
    """Deterministic cases: bitwise equal to the 1 x K reference on every rank. Returns
    how many non-deterministic cases differed from it."""
    differing = 0
    for i, (seed, k, stage, w, det, _plain, extra) in enumerate(cases):
        case = make_case(seed, k, poison=extra == "finite")
        ref_p, ref_l = reference(case, k, w, True, extra, fused=stage == 0)
        if extra == "finite":  # the poisoned step was skipped (NaN loss, finite params)
            assert ref_l[1].isnan() and all(torch.isfinite(v).all() for v in ref_p.values())
        for rank, results in enumerate(per_rank):
            params, losses = results[i]
            same = all(torch.equal(params[n], ref_p[n]) for n in ref_p) and all(
                _same(a, b) for a, b in zip(losses, ref_l)
            )
            what = f"{label} case {cases[i]} rank {rank}"
            if det:
                assert same, f"{what}: not bitwise equal to the 1 x {k} run"
            elif rank == 0:
                differing += not same
                for n in ref_p:  # still the same math, to float32 rounding
                    torch.testing.assert_close(params[n], ref_p[n], rtol=1e-4, atol=1e-4)
    return differing


@pytest.mark.timeout(400)
def test_two_ranks_every_split_and_stage_is_bitwise_the_one_process_run():
    out = run(two_rank_worker, 2, timeout=360.0)
    differing = _check(CASES_2, [r for r, _ in out], "2 ranks")
    # proof that the flag does something: the default order differs from the 1 x K run
    assert differing >= 1, "no non-deterministic 2-rank split differed: the test is blind"
    for _, errors in out:
        assert "steps=3" in errors["pow2"] and "power of two" in errors["pow2"]
        assert "deterministic=True" in errors["nondet"] and "fs.accumulate" in errors["nondet"]


@pytest.mark.timeout(400)
def test_four_ranks_and_hsdp_are_bitwise_the_one_process_run():
    out = run(four_rank_worker, 4, timeout=360.0)
    n = len(CASES_4)
    differing = _check(CASES_4, [r[:n] for r in out], "4 ranks")
    assert differing >= 1, "no non-deterministic 4-rank split differed: the test is blind"
    for i, (seed, k, stage, w) in enumerate(HSDP_CASES):
        ref_p, ref_l = reference(make_case(seed, k), k, w, True, fused=stage == 0)
        for rank, r in enumerate(out):
            params, losses = r[n + i]
            assert all(torch.equal(params[x], ref_p[x]) for x in ref_p), (HSDP_CASES[i], rank)
            assert all(torch.equal(a, b) for a, b in zip(losses, ref_l)), (HSDP_CASES[i], rank)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_process_run_matches_float64(weighted):
    """The canonical order is still the mean: close to a float64 whole-batch run."""
    case = make_case(5, 8)
    params, _ = reference(case, 8, weighted, True)
    ref = float64_reference(case, 8, weighted)
    for n in params:
        torch.testing.assert_close(params[n].double(), ref[n], rtol=1e-5, atol=1e-5)


def test_local_mesh_and_bad_arguments():
    case = make_case(3, 4)
    mesh = fs.Mesh(dp=1)
    step = fs.zero(grad_fn(4, True, True), optimizer(), mesh=mesh, stage=3, deterministic=True)
    params, state = step.init(case["params"])
    ref_p, _ = reference(case, 4, True, True)
    for b in case["batches"]:
        params, state, _ = step.step(params, state, b)
    assert all(torch.equal(params[n], ref_p[n]) for n in ref_p)
    # a sequential accumulate is refused on one process too (as on several)
    bad = fs.zero(grad_fn(4, False, False), optimizer(), mesh=mesh, stage=0, deterministic=True)
    p, s = bad.init(case["params"])
    with pytest.raises(ValueError, match="deterministic=True"):
        bad.step(p, s, case["batches"][0])
    with pytest.raises(ValueError, match="gather='boundary'"):
        fs.zero(
            grad_fn(4, False, True),
            optimizer(),
            mesh=mesh,
            stage=3,
            gather="blocks",
            deterministic=True,
        )
    with pytest.raises(TypeError, match="deterministic"):
        fs.zero(grad_fn(4, False, True), optimizer(), mesh=mesh, stage=0, deterministic=1)
