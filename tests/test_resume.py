"""Bit-exact resume: 2N steps equal N steps + fs.save + fs.load in a fresh process + N steps.

Bitwise (``torch.equal``) on every param and optimizer-state leaf and on every loss, for a
GPT with dropout (the global CPU generator), batches drawn with a ``torch.Generator`` (the
data position), fp16 compute with a dynamic loss scale that overflows in the first half
(skipped steps: the scale, its counter and a schedule count behind the step index),
a warmup-cosine schedule and ``fs.accumulate`` — in one process, and under ``fs.zero``
stage 3 on 2 gloo ranks (each rank with its own dropout and data generators). The state is
the main job's :func:`fsharding.train.training_state`; restoring it is
:func:`fsharding.train.resume_rng` after ``fs.load``.

Each half runs in a process of its own (``fs.launch``): nothing survives between them but
the checkpoint. Each test also shows the restore did something: dropping any one piece
(the CPU generator, the data position, the loss scale, the schedule count) changes the run.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import data, optim, train
from fsharding.models import GPT, GPTConfig
from tests.dist_utils import run

N = 3  # steps per half
CONFIG = GPTConfig(seq_len=16, d_model=32, n_layers=2, n_heads=2, dropout=0.2)
BATCH, ACCUMULATE = 4, 2
DATA_BYTES = 100_000
# 2**40 overflows fp16 (skipped step), 2**10 does not: steps 0-5 go skip, ok, ok | ok (the
# third finite step in a row grows the scale back), skip, ok -- counter and scale both matter
SCALE = fs.DynamicLossScale(loss_scale=2.0**40, period=3, factor=2.0**30)


def _build(zero: bool) -> tuple[fs.Step, Any, Any]:
    """A fresh model, step and initial state (what a new process builds before loading)."""
    model = GPT(CONFIG, seed=0)
    apply, params = fs.functional(model)
    params = {k: v.clone() for k, v in params.items()}  # (donation: keep the module as is)

    def loss_fn(params: dict, batch: dict) -> torch.Tensor:
        logits = apply(params, batch["x"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten())

    grad_fn = fs.accumulate(fs.value_and_grad(fs.amp(loss_fn, policy="fp16")), steps=ACCUMULATE)
    schedule = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 2 * N, end_value=1e-3)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=0.1))
    if zero:
        mesh = fs.Mesh(dp=torch.distributed.get_world_size())
        step = fs.zero(grad_fn, opt, mesh=mesh, stage=3, loss_scale=SCALE)
    else:
        step = fs.train_step(grad_fn, opt, loss_scale=SCALE)
    params, opt_state = step.init(params)
    return step, params, opt_state


def _seed(salt: int) -> torch.Generator:
    """Seeds this rank's dropout and returns its data generator (salt: another process)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed(1000 * salt + rank)
    return torch.Generator().manual_seed(7 + 1000 * salt + rank)


def _steps(step, params, opt_state, generator, n, losses, start):
    stream = data.load(DATA_BYTES).batches("train", BATCH, CONFIG.seq_len, generator)
    skipped = []
    for i in range(start, start + n):
        params, opt_state, metrics = step.step(params, opt_state, next(stream), donate=True)
        losses[i] = float(metrics["loss"])
        skipped.append(bool(metrics["skipped"]))
    return params, opt_state, skipped


def _full(tree: Any) -> list[Any]:
    """Every leaf as a plain CPU tensor or number (DTensors gathered), in pytree order."""
    return [
        x.full_tensor() if fs.tree.is_dtensor(x) else x for x in fs.tree.leaves(tree)
    ]  # (full_tensor is a collective: every rank calls it in the same order)


def _first_half(path: str, zero: bool) -> dict[str, Any]:
    """N steps, save, N more steps: the uninterrupted run (the save must not disturb it)."""
    step, params, opt_state = _build(zero)
    generator = _seed(salt=0)
    losses = torch.zeros(2 * N, dtype=torch.float64)
    params, opt_state, skipped = _steps(step, params, opt_state, generator, N, losses, 0)
    state = train.training_state(params, opt_state, N, losses, generator, "test")
    fs.save(path, state, step=N)
    saved = {
        "count": opt_state.opt[1][2].count,  # the schedule's
        "loss_scale": opt_state.loss_scale,
        "rng_rows": _full(state["rng"]),
    }
    del state
    params, opt_state, _ = _steps(step, params, opt_state, generator, N, losses, N)
    return {
        "skipped": skipped,
        "saved": saved,
        "losses": losses,
        "params": _full(params),
        "opt_state": _full(opt_state),
    }


def _second_half(path: str, zero: bool, drops: list[str | None]) -> list[dict[str, Any]]:
    """A fresh process: build, then per entry of ``drops`` load, restore, N steps; a
    ``drop`` other than None leaves that piece of the state fresh instead of restored."""
    step, params, opt_state = _build(zero)
    generator = _seed(salt=1)  # other seeds than the first half's: only the file carries over
    fresh_cpu, fresh_data = torch.get_rng_state(), generator.get_state()
    like = train.training_state(
        params, opt_state, 0, torch.zeros(2 * N, dtype=torch.float64), generator, "test"
    )
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in _full(like)]
    out = []
    for drop in drops:
        state = fs.load(path, like)
        assert state["step"] == N and state["config"] == "test"
        for a, b in zip(fs.tree.leaves(state), fs.tree.leaves(like), strict=True):
            assert not isinstance(a, torch.Tensor) or a is not b  # new tensors
        torch.set_rng_state(fresh_cpu)
        generator.set_state(fresh_data)
        train.resume_rng(state, generator)
        opt_state = state["opt_state"]
        if drop == "cpu_rng":
            torch.set_rng_state(fresh_cpu)
        elif drop == "data":
            generator.set_state(fresh_data)
        elif drop == "loss_scale":
            opt_state = opt_state._replace(loss_scale=SCALE)
        elif drop == "count":  # Adam's and the schedule's counts set to the step index
            clip, (adam, decay, schedule) = opt_state.opt
            adamw = (adam._replace(count=N), decay, schedule._replace(count=N))
            opt_state = opt_state._replace(opt=(clip, adamw))
        losses = state["losses"]
        params, opt_state, _ = _steps(step, state["params"], opt_state, generator, N, losses, N)
        out.append({"losses": losses, "params": _full(params), "opt_state": _full(opt_state)})
    _bitwise(_full(like), before, "like after loads and donated steps")  # never written
    return out


def _bitwise(a: list[Any], b: list[Any], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what} leaf {i} differs"
        else:
            assert type(x) is type(y) and x == y, f"{what} leaf {i}: {x!r} != {y!r}"


def _check(ref: dict[str, Any], resumed: list[dict[str, Any]], drops: list[str | None]):
    # the first half did what the test is about: a skipped (overflowing) step, so the scale
    # came down and the schedule count is behind the step index
    assert ref["skipped"] == [True, False, False], ref["skipped"]
    assert ref["saved"]["loss_scale"].loss_scale < SCALE.loss_scale
    assert all(math.isfinite(x) for x in ref["losses"].tolist())
    exact, *broken = resumed
    assert torch.equal(exact["losses"], ref["losses"]), (exact["losses"], ref["losses"])
    _bitwise(exact["params"], ref["params"], "params")
    _bitwise(exact["opt_state"], ref["opt_state"], "opt_state")
    for drop, other in zip(drops[1:], broken, strict=True):  # each piece of state matters
        assert not torch.equal(other["losses"], ref["losses"]), f"{drop} changed nothing"


DROPS_ONE = [None, "cpu_rng", "data", "loss_scale", "count"]


@pytest.mark.timeout(240)
def test_resume_in_a_fresh_process_is_bitwise(tmp_path):
    path = str(tmp_path / "ckpt")
    (ref,) = run(_first_half, 1, path, False)
    assert 0 < ref["saved"]["count"] < N  # a skipped step did not advance the schedule
    resumed = run(_second_half, 1, path, False, DROPS_ONE)[0]
    _check(ref, resumed, DROPS_ONE)


DROPS_ZERO = [None, "cpu_rng", "data"]


@pytest.mark.timeout(240)
def test_resume_under_zero3_on_two_ranks_is_bitwise(tmp_path):
    path = str(tmp_path / "ckpt")
    refs = run(_first_half, 2, path, True)
    # every rank saved its own random state: rows of one sharded tensor, different per rank
    for rows in refs[0]["saved"]["rng_rows"]:
        assert rows.shape[0] == 2 and not torch.equal(rows[0], rows[1])
    resumed = run(_second_half, 2, path, True, DROPS_ZERO)
    for ref, res in zip(refs, resumed, strict=True):
        _check(ref, res, DROPS_ZERO)
    # and the two ranks agree (global mean loss, gathered params)
    assert torch.equal(resumed[0][0]["losses"], resumed[1][0]["losses"])


def test_rng_state_holds_every_generator_a_step_draws_from():
    generator = torch.Generator().manual_seed(3)
    state = train.rng_state(generator)
    assert sorted(state) == (
        ["cpu", "cuda", "data"] if torch.cuda.is_available() else ["cpu", "data"]
    )
    assert all(v.dtype == torch.uint8 and v.device.type == "cpu" for v in state.values())
    drawn = F.dropout(torch.ones(64), 0.5), torch.randint(0, 9, (8,), generator=generator)
    train.set_rng_state(state, generator)
    again = F.dropout(torch.ones(64), 0.5), torch.randint(0, 9, (8,), generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(drawn, again, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generator needs a GPU")
def test_rng_state_restores_the_cuda_generator():
    generator = torch.Generator()
    state = train.rng_state(generator)
    drawn = F.dropout(torch.ones(1024, device="cuda"), 0.5)
    assert not torch.equal(drawn, F.dropout(torch.ones(1024, device="cuda"), 0.5))
    train.set_rng_state(state, generator)
    assert torch.equal(F.dropout(torch.ones(1024, device="cuda"), 0.5), drawn)
