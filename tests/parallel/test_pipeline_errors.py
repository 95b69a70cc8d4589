"""fs.pipeline's failures after the probe never hang: a rank that raises mid-schedule, and
activations whose shapes change between microbatches or after the first call, raise on
every rank of the axis (naming the stage, rank, microbatch and message) within seconds, and
the next good call on the same pipeline equals the single-process reference (the failed
call's unreceived messages belong to an older generation of tags and match nothing).
The 4-rank scenario (a middle stage raises) runs inside test_pipeline's 4-rank launch.
"""

from __future__ import annotations

import time

import torch

import fsharding as fs
from fsharding.parallel.pipeline import pipeline
from tests.dist_utils import assert_close, run
from tests.parallel.test_pipeline import (
    COUNTS,
    TOL,
    M,
    block,
    embed,
    head,
    loss_fn,
    make_batch,
    make_params,
    reference,
)

BOUND = 30.0  # seconds a failed call may take (the process group's timeout is 120 s)
FAIL: dict[str, int] = {}  # stage name -> the forward call (with grad) that raises


def _armed(name, fn):
    def stage(p, a):
        n = COUNTS.get(name, 0) + (1 if torch.is_grad_enabled() else 0)
        if torch.is_grad_enabled() and FAIL.get(name) == n:
            raise RuntimeError(f"boom in {name} on call {n}")
        return fn(p, a)

    return stage


def _reshaping(p, a):
    """``block``, except that its forward call ``FAIL["reshape_at"]`` (or every one, while
    ``FAIL["reshape"]``) returns a shorter sequence."""
    out = block(p, a)
    n = COUNTS.get("block", 0)
    if torch.is_grad_enabled() and (n == FAIL.get("reshape_at") or FAIL.get("reshape")):
        out = {"h": out["h"][:, :-1], "extra": out["extra"], "mask": out["mask"][:, :-1]}
    return out


def _failing_call(f, *args):
    """(exception type, message, seconds) of a call that must raise."""
    start = time.monotonic()
    try:
        f(*args)
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - start
    raise AssertionError("the call did not raise")


def _check_next_call_works(f, fns, params, x, y, r, what):
    p = len(fns)
    loss, grads = f(params[r], x if r == 0 else None, y if r == p - 1 else None)
    ref_loss, ref_grads = reference(fns, params, x, y, None)
    assert_close(loss, ref_loss, f"{what}: loss after the failure", **TOL)
    for k in grads:
        assert_close(grads[k], ref_grads[r][k], f"{what}: grad {k} after the failure", **TOL)


def _two_ranks():
    mesh = fs.Mesh(pp=2)
    r = mesh.coordinate["pp"]
    x, y = make_batch()
    out = {}
    params = make_params(["embed", "head"])
    fns = [embed, head]
    for schedule in ("gpipe", "1f1b", "zero_bubble"):
        f = pipeline(
            [embed, _armed("head", head)], loss_fn, mesh=mesh, microbatches=M, schedule=schedule
        )
        args = (params[r], x if r == 0 else None, y if r == 1 else None)
        f(*args)  # the probe and a good call
        FAIL["head"] = COUNTS.get("head", 0) + 2  # rank 1's head raises on microbatch 1
        out[schedule] = _failing_call(f, *args)
        FAIL.clear()
        _check_next_call_works(f, fns, params, x, y, r, schedule)
    # activations of another shape on microbatch 3 than on microbatch 0 (stage 0, rank 0)
    params3 = make_params(["block", "head"], seed=5)
    a = embed(make_params(["embed"], seed=6)[0], x)
    a = {k: v.detach() if isinstance(v, torch.Tensor) else (v[0].detach(),) for k, v in a.items()}
    f = pipeline([_reshaping, head], loss_fn, mesh=mesh, microbatches=M)
    args = (params3[r], a if r == 0 else None, y if r == 1 else None)
    FAIL["reshape_at"] = COUNTS.get("block", 0) + 4  # microbatch 3 (the probe: no grad)
    out["microbatch shape"] = _failing_call(f, *args)
    FAIL.clear()
    # ... and after the probe: the same inputs, but stage 0 now returns another shape
    f = pipeline([_reshaping, head], loss_fn, mesh=mesh, microbatches=M)
    f(*args)
    FAIL["reshape"] = 1
    out["after probe"] = _failing_call(f, *args)
    FAIL.clear()
    _check_next_call_works(f, [_reshaping, head], params3, a, y, r, "after probe")
    # ranks that built the pipeline differently: refused on every rank before any P2P (the
    # tags would never match: a hang); then a pipeline built alike works
    args = (params[r], x if r == 0 else None, y if r == 1 else None)
    differs = {
        "microbatches": {"microbatches": M if r == 0 else 2},
        "schedule": {"schedule": "1f1b" if r == 0 else "gpipe"},
        "weights": {"weights": None if r == 0 else (lambda x, y: 1.0)},
    }
    for name, kw in differs.items():
        kw = {"microbatches": M, **kw}
        out[f"config {name}"] = _failing_call(pipeline(fns, loss_fn, mesh=mesh, **kw), *args)
    _check_next_call_works(
        pipeline(fns, loss_fn, mesh=mesh, microbatches=M), fns, params, x, y, r, "alike"
    )
    return out


def test_two_ranks_a_stage_that_raises_mid_schedule_fails_every_rank():
    results = run(_two_ranks, 2)
    for r, out in enumerate(results):
        for schedule in ("gpipe", "1f1b", "zero_bubble"):
            name, msg, seconds = out[schedule]
            assert name == "RuntimeError", (schedule, r, name, msg)
            assert "stage 1 (rank 1 of axis 'pp')" in msg and "boom in head" in msg, msg
            assert "microbatch 1" in msg and "Every rank" in msg, msg
            assert seconds < BOUND, (schedule, seconds)
        for case in ("microbatch shape", "after probe"):
            name, msg, seconds = out[case]
            assert name == "ValueError", (case, r, msg)
            assert "stage 0 (rank 0 of axis 'pp')" in msg, (case, msg)
            assert "differ from microbatch 0's" in msg and "(2, 4, 6)" in msg, (case, msg)
            assert seconds < BOUND, (case, seconds)
        assert "microbatch 3" in out["microbatch shape"][1], out["microbatch shape"]
        for name in ("microbatches", "schedule", "weights"):
            kind, msg, seconds = out[f"config {name}"]
            assert kind == "ValueError", (name, r, msg)
            assert f"different {name}=" in msg and f"rank {1 - r} has" in msg, (name, msg)
            assert seconds < BOUND, (name, seconds)
        assert "microbatch 0 " in out["after probe"][1], out["after probe"]


def four_ranks_failures():
    """A middle stage raises: the ranks above and below stop too (stop markers travel
    both ways), under 1F1B and zero bubble. Run inside test_pipeline's 4-rank launch
    (one launch of 4 ranks costs half a minute on two cores)."""
    mesh = fs.Mesh(pp=4)
    r = mesh.coordinate["pp"]
    x, y = make_batch(seed=5)
    params = make_params(["embed", "block", "block", "head"], seed=2)
    fns = [embed, block, block, head]
    out = {}
    for schedule in ("1f1b", "zero_bubble"):
        armed = [embed, block, _armed("block", block), head]
        f = pipeline(armed, loss_fn, mesh=mesh, microbatches=M, schedule=schedule)
        args = (params[r], x if r == 0 else None, y if r == 3 else None)
        f(*args)
        if r == 2:
            FAIL["block"] = COUNTS.get("block", 0) + 3  # microbatch 2
        out[schedule] = _failing_call(f, *args)
        FAIL.clear()
        _check_next_call_works(f, fns, params, x, y, r, schedule)
    return out


def check_four_ranks_failures(results):
    for r, out in enumerate(results):
        for schedule, (name, msg, seconds) in out.items():
            assert name == "RuntimeError", (schedule, r, msg)
            assert "stage 2 (rank 2 of axis 'pp')" in msg and "boom in block" in msg, msg
            assert "microbatch 2" in msg, msg
            assert seconds < BOUND, (schedule, r, seconds)
