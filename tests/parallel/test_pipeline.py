"""fs.pipeline against the single-process reference, on 2 and 4 gloo ranks.

The reference is ``fs.accumulate(fs.value_and_grad(composition), steps=m, weights=...)`` of
the unpipelined composition of the same stage functions (float64). Stages have uneven param
trees (an embedding first, a head last) and pass a pytree activation with an integer leaf.
The stage functions count their calls and log forward/backward events per rank, which shows
that each rank ran only its stage, on every microbatch, in the schedule's order. Errors are
checked to raise on every rank (no hang), and a good call still works after them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding.parallel.pipeline import _actions, pipeline
from tests.dist_utils import assert_close, raises, run

V, D, T, B, M = 11, 6, 5, 8, 4
TOL = {"rtol": 1e-5, "atol": 1e-8}

COUNTS: dict[str, int] = {}  # stage name -> forward calls with grad enabled (this process)
EVENTS: list[tuple[str, int]] = []  # ("F" | "B", forward index) on the stage named "embed"


def _count(name: str) -> int:
    if torch.is_grad_enabled():
        COUNTS[name] = COUNTS.get(name, 0) + 1
    return COUNTS.get(name, 0)


def embed(p, x):
    n = _count("embed")
    h = p["wte"][x["tokens"]] + p["wpe"]
    if h.requires_grad:
        EVENTS.append(("F", n))
        h.register_hook(lambda g: EVENTS.append(("B", n)))
    return {"h": h, "extra": (h.mean(1) * p["s"],), "mask": (x["tokens"] != 0).long()}


def block(p, a):
    _count("block")
    h = torch.tanh(a["h"] @ p["w"] + p["b"]) + a["extra"][0][:, None, :]
    h = h * a["mask"][..., None]
    return {"h": h, "extra": (h.mean(1),), "mask": a["mask"]}


def head(p, a):
    _count("head")
    return (a["h"] @ p["out"], a["mask"])


def loss_fn(out, y):
    """Token mean over the valid targets (0/0 = NaN for an all-padding microbatch)."""
    logits, _ = out
    total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return total / (y != -100).sum()


def tokens(x, y):
    return (y != -100).sum()


def make_params(kinds: list[str], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    make = {
        "embed": lambda: {"wte": r(V, D), "wpe": r(T, D), "s": r(())},
        "block": lambda: {"w": r(D, D), "b": r(D)},
        "head": lambda: {"out": r(D, V)},
    }
    return [make[k]() for k in kinds]


def make_batch(seed: int = 1, pad_microbatch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = {"tokens": torch.randint(0, V, (B, T), generator=g)}
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.4] = -100  # uneven valid-token counts per microbatch
    if pad_microbatch is not None:
        b = B // M
        y[pad_microbatch * b : (pad_microbatch + 1) * b] = -100
    return x, y


def reference(fns, params, x, y, weights):
    def composed(ps, x, y):
        a = x
        for f, p in zip(fns, ps, strict=True):
            a = f(p, a)
        return loss_fn(a, y)

    return fs.accumulate(fs.value_and_grad(composed), steps=M, weights=weights)(params, x, y)


def check_against_reference(mesh, fns, params, x, y, *, schedule, weights, what):
    """Runs the pipeline on this rank; compares loss and this rank's grads with the
    reference; returns this rank's stage forward calls during the pipelined call."""
    r, p = mesh.coordinate["pp"], mesh.shape["pp"]
    f = pipeline(fns, loss_fn, mesh=mesh, microbatches=M, schedule=schedule, weights=weights)
    ref_loss, ref_grads = reference(fns, params, x, y, weights)
    inputs = x if r == 0 else None
    targets = y if r == p - 1 else None
    f(params[r], inputs, targets)  # first call: probe + run
    before = dict(COUNTS)
    loss, grads = f(params[r], inputs, targets)
    calls = {k: COUNTS.get(k, 0) - before.get(k, 0) for k in COUNTS}
    assert_close(loss, ref_loss, f"{what}: loss", **TOL)
    assert torch.isfinite(loss)
    assert fs.tree.structure(grads) == fs.tree.structure(params[r]), what
    for (path, g), (_, e) in zip(
        fs.tree.leaves_with_path(grads), fs.tree.leaves_with_path(ref_grads[r]), strict=True
    ):
        assert g.dtype == e.dtype, (what, path)
        assert_close(g, e, f"{what}: rank {r} grad {path}", **TOL)
    return {k: v for k, v in calls.items() if v}


def in_flight(events: list[tuple[str, int]]) -> int:
    """Peak number of microbatches forwarded but not yet backwarded."""
    live = peak = 0
    for kind, _ in events:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------------------
# 2 ranks: embedding | head; both schedules, with and without token weights; errors
# --------------------------------------------------------------------------------------


def _two_ranks():
    torch.manual_seed(0)
    mesh = fs.Mesh(pp=2)
    r = mesh.coordinate["pp"]
    fns = [embed, head]
    params = make_params(["embed", "head"])
    x, y = make_batch()
    out = {}
    for schedule in ("gpipe", "1f1b"):
        for weights in (None, tokens):
            what = f"{schedule}, weights={weights is not None}"
            EVENTS.clear()
            calls = check_against_reference(
                mesh, fns, params, x, y, schedule=schedule, weights=weights, what=what
            )
            assert calls == ({"embed": M} if r == 0 else {"head": M}), (what, calls)
            if r == 0:
                pipelined_events = EVENTS[-2 * M :]
                out[(schedule, weights is not None)] = [k for k, _ in pipelined_events]
    # an all-padding microbatch with token weights: skipped, no NaN
    xp, yp = make_batch(seed=3, pad_microbatch=2)
    check_against_reference(
        mesh, fns, params, xp, yp, schedule="1f1b", weights=tokens, what="all-padding mb"
    )

    # bad input: an error on every rank, never a hang; the next good call still works
    f = pipeline(fns, loss_fn, mesh=mesh, microbatches=M)
    errors = {}
    bad_x = {"tokens": x["tokens"][:6]}
    errors["split"] = raises(
        lambda: f(params[r], bad_x if r == 0 else None, y if r == 1 else None), ValueError
    )
    errors["count"] = raises(
        lambda: pipeline([embed, block, head], loss_fn, mesh=mesh, microbatches=M), ValueError
    )
    errors["structure"] = raises(
        lambda: f(params[0], x if r == 0 else None, y if r == 1 else None), RuntimeError
    )
    errors["dtype"] = raises(
        lambda: f(
            {**params[r], "n": torch.tensor(3)} if r == 1 else params[r],
            x if r == 0 else None,
            y if r == 1 else None,
        ),
        TypeError,
    )
    loss, _ = f(params[r], x if r == 0 else None, y if r == 1 else None)
    ref_loss, _ = reference(fns, params, x, y, None)
    assert_close(loss, ref_loss, "after errors", **TOL)
    return out, errors


def test_two_ranks_gpipe_and_1f1b_equal_reference_and_raise_everywhere():
    results = run(_two_ranks, 2)
    orders, _ = results[0]
    # rank 0 (p=2, m=4): GPipe runs every forward first; 1F1B one warm-up forward, then
    # alternates, holding at most p = 2 microbatches (GPipe: m = 4)
    for weighted in (False, True):
        assert orders[("gpipe", weighted)] == ["F"] * M + ["B"] * M
        assert orders[("1f1b", weighted)] == ["F", "F", "B", "F", "B", "F", "B", "B"]
        assert in_flight([(k, 0) for k in orders[("gpipe", weighted)]]) == M
        assert in_flight([(k, 0) for k in orders[("1f1b", weighted)]]) == 2
    for r, (_, errors) in enumerate(results):
        assert "fs.pipeline" in errors["split"] and "divisible" in errors["split"], errors
        if r == 1:
            assert "rank 0" in errors["split"], errors["split"]
        assert "3 stage functions" in errors["count"] and "2 stages" in errors["count"]
        assert "stage 1" in errors["structure"] and "'out'" in errors["structure"], errors
        assert "['n']" in errors["dtype"] and "floating" in errors["dtype"], errors


# --------------------------------------------------------------------------------------
# 4 ranks: embedding | block | block | head, and one function for every stage
# --------------------------------------------------------------------------------------


def _four_ranks():
    mesh = fs.Mesh(pp=4)
    r = mesh.coordinate["pp"]
    x, y = make_batch(seed=5)
    params = make_params(["embed", "block", "block", "head"], seed=2)
    fns = [embed, block, block, head]
    names = ["embed", "block", "block", "head"]
    for schedule, weights in (("gpipe", tokens), ("1f1b", None), ("1f1b", tokens)):
        calls = check_against_reference(
            mesh, fns, params, x, y, schedule=schedule, weights=weights, what=schedule
        )
        assert calls == {names[r]: M}, (schedule, calls)

    # homogeneous: one stage function for all 4 stages, a pytree activation in and out
    def last(out, y):
        return loss_fn((out["h"] @ torch.ones(D, V, dtype=out["h"].dtype), out["mask"]), y)

    blocks = make_params(["block"] * 4, seed=4)
    a = embed(make_params(["embed"], seed=6)[0], x)
    a = {k: v.detach() if isinstance(v, torch.Tensor) else (v[0].detach(),) for k, v in a.items()}
    f = pipeline(block, last, mesh=mesh, microbatches=M)
    loss, grads = f(blocks[r], a if r == 0 else None, y if r == 3 else None)

    def composed(ps, a, y):
        for p in ps:
            a = block(p, a)
        return last(a, y)

    ref_loss, ref_grads = fs.accumulate(fs.value_and_grad(composed), steps=M)(blocks, a, y)
    assert_close(loss, ref_loss, "homogeneous loss", **TOL)
    for key in ("w", "b"):
        assert_close(grads[key], ref_grads[r][key], f"homogeneous grad {key}", **TOL)
    return True


def test_four_ranks_uneven_and_homogeneous_stages_equal_reference():
    assert run(_four_ranks, 4) == [True] * 4


# --------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------


def test_local_mesh_runs_every_stage_in_process():
    fns = [embed, block, head]
    params = make_params(["embed", "block", "head"])
    x, y = make_batch()
    f = pipeline(fns, loss_fn, mesh=fs.Mesh(pp=1), virtual_stages=3, microbatches=M, weights=tokens)
    loss, grads = f(params, x, y)
    ref_loss, ref_grads = reference(fns, params, x, y, tokens)
    assert_close(loss, ref_loss, "loss", **TOL)
    for g, e in zip(grads, ref_grads, strict=True):
        for k in g:
            assert_close(g[k], e[k], k, **TOL)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_1f1b_order_is_valid_and_bounded(p, m):
    """Every rank forwards and backwards each microbatch once, backward after forward, and
    holds at most p - rank microbatches (GPipe: m)."""
    for rank in range(p):
        acts = _actions("1f1b", p, rank, m)
        assert sorted(acts) == sorted(_actions("gpipe", p, rank, m))
        assert [i for k, _, i in acts if k == "F"] == list(range(m))
        assert [i for k, _, i in acts if k == "B"] == list(range(m))
        assert in_flight([(k, i) for k, _, i in acts]) == min(p - rank, m)
        assert in_flight([(k, i) for k, _, i in _actions("gpipe", p, rank, m)]) == m


def test_bad_arguments_raise_at_build_time():
    mesh = fs.Mesh(pp=1)
    msg = raises(lambda: pipeline(embed, loss_fn, mesh=mesh, microbatches=0), ValueError)
    assert "microbatches" in msg
    msg = raises(
        lambda: pipeline(embed, loss_fn, mesh=mesh, microbatches=2, schedule="x"), ValueError
    )
    assert "'gpipe'" in msg and "'1f1b'" in msg
    msg = raises(lambda: pipeline(embed, loss_fn, mesh=mesh, axis="dp", microbatches=2), ValueError)
    assert "axis='dp'" in msg
    msg = raises(lambda: pipeline([embed, head], loss_fn, mesh=mesh, microbatches=2), ValueError)
    assert "2 stage functions" in msg and "1 stages" in msg
