"""fs.pipeline composed with the training steps and with the repo's GPT, on gloo ranks.

* ``fs.train_step(pipeline_f, opt)`` on 2 stages with ``optim.clip_by_global_norm`` (a max
  small enough that every step clips) and a ``fs.DynamicLossScale``, with an inf in the
  grads of ONE stage on one step: the params of every stage after N steps, the grad norm,
  the loss, the scale and the skip equal the single-process ``fs.train_step`` on the
  unpipelined composition (float64). The old per-stage step (the pipeline behind a lambda,
  which hides its ``mesh``/``axis``) is run beside it and must differ: per-stage clipping
  and a skip on one stage only.
* A GPT split with ``fsharding.models.split_gpt`` through ``fs.pipeline`` (2 stages with
  1F1B, 4 stages interleaved on 2 ranks) gives the unsplit GPT's loss and grads.
* ``fs.zero`` over ``fs.Mesh(dp=2, pp=2)`` at stages 1 and 3 on 4 processes equals the
  single-process reference on the global batch (dp x local), with clipping and a skip caused
  by one rank's inf.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import optim
from fsharding.models import GPT, GPTConfig, split_gpt
from tests.dist_utils import assert_close, run

D, H, C, B, M, N = 5, 7, 3, 8, 4, 5
POISON_STEP = 2  # the step whose batch makes stage 0's grads inf
TOL = {"rtol": 1e-5, "atol": 1e-9}


class _Poison(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``k`` (inf: a non-finite grad
    in this stage's params only, the forward values untouched)."""

    @staticmethod
    def forward(ctx, w, k):
        ctx.save_for_backward(k)
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        (k,) = ctx.saved_tensors
        return g * k, None


def first(p, x):
    w = _Poison.apply(p["w"], x["k"].max())
    return {"h": torch.tanh(x["x"] @ w + p["b"])}


def last(p, a):
    return a["h"] @ p["v"]


def mse(y, t):
    return ((y - t) ** 2).mean()


FNS = [first, last]


def make_params(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [{"w": r(D, H), "b": r(H)}, {"v": r(H, C)}]


def make_batches(n: int, b: int, seed: int = 1, poison_row: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = torch.ones(b, dtype=torch.float64)
        if i == POISON_STEP:
            k[poison_row] = torch.inf
        x = {"x": torch.randn(b, D, generator=g, dtype=torch.float64), "k": k}
        out.append((x, torch.randn(b, C, generator=g, dtype=torch.float64)))
    return out


def optimizer() -> optim.GradientTransformation:
    # sgd after the clip: the clip factor shows in the params (adam would normalise it away)
    return optim.chain(optim.clip_by_global_norm(0.05), optim.sgd(0.1))


def scale() -> fs.DynamicLossScale:
    return fs.DynamicLossScale(2.0**4, period=2)


def reference_run(batches: list[tuple], microbatches: int) -> tuple[list, list]:
    """Single process: fs.train_step on the unpipelined composition of all stages."""

    def composed(ps, batch):
        x, t = batch
        return mse(last(ps[1], first(ps[0], x)), t)

    grad_fn = fs.accumulate(fs.value_and_grad(composed), steps=microbatches)
    step = fs.train_step(grad_fn, optimizer(), loss_scale=scale())
    params, state = step.init(make_params())
    metrics = []
    for batch in batches:
        params, state, m = step.step(params, state, batch)
        metrics.append(m)
    return params, metrics


def _check_metrics(mine: list, ref: list, what: str) -> None:
    for i, (m, e) in enumerate(zip(mine, ref, strict=True)):
        assert m["skipped"] == e["skipped"], (what, i, m["skipped"], e["skipped"])
        assert m["loss_scale"] == e["loss_scale"], (what, i)
        if not e["skipped"]:
            norm = m["grad_norm"].double()
            assert_close(norm, e["grad_norm"].double(), f"{what} norm {i}", **TOL)
            assert_close(m["loss"], e["loss"], f"{what} loss {i}", **TOL)


# --------------------------------------------------------------------------------------
# 2 ranks: fs.train_step on a pipeline; the GPT split through fs.pipeline
# --------------------------------------------------------------------------------------


def _two_ranks():
    torch.set_num_threads(1)  # tiny ops: no intra-op threads to wait on (a fresh process)
    mesh = fs.Mesh(pp=2)
    r = mesh.coordinate["pp"]
    out = {}
    batches = make_batches(N, B)
    ref_params, ref_metrics = reference_run(batches, M)
    assert ref_metrics[POISON_STEP]["skipped"] and sum(m["skipped"] for m in ref_metrics) == 1
    assert all(float(m["grad_norm"]) > 0.05 for m in ref_metrics if not m["skipped"])

    f = fs.pipeline(FNS, mse, mesh=mesh, microbatches=M)

    @functools.wraps(f)  # keeps mesh, axis, copies: the step sees the pipeline
    def wrapped(p, x, t, **kw):
        return f(p, x, t, **kw)

    # fs.accumulate keeps them too (functools.wraps): 2 x M microbatches of equal size
    cases = (("global", f), ("wrapped", wrapped), ("accumulate", fs.accumulate(f, steps=2)))
    for name, grad_fn in cases:
        step = fs.train_step(grad_fn, optimizer(), loss_scale=scale())
        params, state = step.init(make_params()[r])
        metrics = []
        for x, t in batches:
            params, state, m = step.step(params, state, (x, t))
            metrics.append(m)
        _check_metrics(metrics, ref_metrics, f"{name} rank {r}")
        for k in params:
            assert_close(params[k], ref_params[r][k], f"{name} rank {r} params {k}", **TOL)

    # a pipeline hidden in a lambda (its attributes lost) would clip and skip per stage:
    # refused on every rank, by fs.train_step and by fs.zero
    hidden = lambda p, b, **kw: f(p, *b, **kw)  # noqa: E731
    one = fs.Mesh(dp=1, pp=2)  # fs.zero over a data-parallel axis of 1
    for name, build in (
        ("hidden", lambda: fs.train_step(hidden, optimizer())),
        ("hidden zero", lambda: fs.zero(hidden, optimizer(), mesh=one, stage=1, axis="dp")),
    ):
        step = build()
        params, state = step.init(make_params()[r])
        try:
            step.step(params, state, batches[0])
            raise AssertionError(f"{name}: a pipeline hidden in a lambda ran")
        except TypeError as e:
            out[name] = str(e)

    out["no params"] = _stage_without_params(mesh, batches[:2])

    # fs.pipeline(weights=...) under fs.zero(deterministic=True) over dp > 1 (here dp=2 x
    # pp=1): refused on every rank, before any collective (the pipeline returns its replica's
    # weighted mean, not the canonical sums); deterministic=False: see _dp_pp_weighted
    dp2 = fs.Mesh(dp=2, pp=1)
    tokens = lambda x, t: float(t.shape[0])  # noqa: E731
    weighted = fs.pipeline(
        FNS, mse, mesh=dp2, virtual_stages=2, schedule="gpipe", microbatches=M, weights=tokens
    )
    try:
        fs.zero(weighted, optimizer(), mesh=dp2, stage=1, axis="dp", deterministic=True)
        raise AssertionError("fs.zero(deterministic=True) took a weighted pipeline")
    except ValueError as e:
        out["weighted dp"] = str(e)

    # a bad batch for a pipeline step: the error names the batch and the fix
    step = fs.train_step(f, optimizer())
    p0, s0 = step.init(make_params()[r])
    try:
        step.step(p0, s0, batches[0][0])
    except TypeError as e:
        out["bad_batch"] = str(e)

    out["gpt"] = _gpt_through_pipeline(mesh)
    return out


def _stage_without_params(mesh, batches):
    """Stage 1 holds no params ({}): it still takes part in the clip's global norm (it
    hung), and both stages report the grad norm in one dtype (float64 here)."""
    r = mesh.coordinate["pp"]
    crop = lambda p, a: a["h"][:, :C]  # noqa: E731
    ref = fs.train_step(
        fs.accumulate(fs.value_and_grad(lambda p, b: mse(crop({}, first(p, b[0])), b[1])), steps=M),
        optimizer(),
    )
    ref_params, ref_state = ref.init(make_params()[0])
    f = fs.pipeline([first, crop], mse, mesh=mesh, microbatches=M)
    step = fs.train_step(f, optimizer())
    params, state = step.init(make_params()[0] if r == 0 else {})
    dtypes = []
    for i, batch in enumerate(batches):
        ref_params, ref_state, e = ref.step(ref_params, ref_state, batch)
        params, state, m = step.step(params, state, batch)
        assert float(e["grad_norm"]) > 0.05  # the clip is active
        assert_close(m["grad_norm"].double(), e["grad_norm"].double(), f"no params norm {i}", **TOL)
        dtypes.append(m["grad_norm"].dtype)
    for k in params:
        assert_close(params[k], ref_params[k], f"no params: params {k}", **TOL)
    assert params == {} or r == 0
    return dtypes


def _gpt_config() -> GPTConfig:
    return GPTConfig(vocab_size=17, seq_len=6, d_model=8, n_layers=4, n_heads=2)


def _gpt_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 17, (B, 6), generator=g)
    return ids, torch.randint(0, 17, (B, 6), generator=g)


def gpt_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _gpt_through_pipeline(mesh):
    """Loss and grads of the split GPT (2 stages 1F1B; 4 stages interleaved) against the
    unsplit model's fs.value_and_grad; returns the stage param names per case."""
    r = mesh.coordinate["pp"]
    model = GPT(_gpt_config(), seed=5).double()
    ids, targets = _gpt_batch()
    apply, full = fs.functional(model)
    ref_loss, ref_grads = fs.value_and_grad(lambda p: gpt_loss(apply(p, ids), targets))(full)
    names = {}
    for n, schedule in ((2, "1f1b"), (4, "interleaved_1f1b")):
        applies, params = zip(*(fs.functional(s) for s in split_gpt(model, n)))
        v = n // 2
        f = fs.pipeline(
            list(applies),
            gpt_loss,
            mesh=mesh,
            microbatches=M,
            schedule=schedule,
            virtual_stages=v,
        )
        mine = [params[s] for s in range(r, n, 2)]
        loss, grads = f(mine if v > 1 else mine[0], ids if r == 0 else None, targets)
        grads = grads if v > 1 else [grads]
        assert_close(loss, ref_loss, f"gpt {n} stages loss", **TOL)
        for stage_grads in grads:
            for k, g in stage_grads.items():
                assert_close(g, ref_grads[k], f"gpt {n} stages grad {k}", **TOL)
        names[n] = [sorted(p) for p in mine]
    return names


@pytest.mark.timeout(240)
def test_train_step_on_a_pipeline_clips_and_skips_globally_and_gpt_split_matches():
    results = run(_two_ranks, 2, timeout=200)
    for out in results:
        assert "(inputs, targets)" in out["bad_batch"], out["bad_batch"]
        for name in ("hidden", "hidden zero"):
            assert "functools.wraps" in out[name] and "fs.accumulate" in out[name], out[name]
        assert out["no params"] == [torch.float64] * 2, out["no params"]
        assert "weights=" in out["weighted dp"] and "deterministic" in out["weighted dp"]
    # every rank compared itself with the reference in the worker; the stages' params
    # cover the GPT's, each exactly once
    every = {n: sorted(k for out in results for p in out["gpt"][n] for k in p) for n in (2, 4)}
    model_names = sorted(dict(GPT(_gpt_config()).named_parameters()))
    assert every[2] == model_names and every[4] == model_names


# --------------------------------------------------------------------------------------
# 4 ranks: fs.zero over a dp x pp mesh
# --------------------------------------------------------------------------------------


def _dp_pp(zero_stage: int):
    mesh = fs.Mesh(dp=2, pp=2)
    d, r = mesh.coordinate["dp"], mesh.coordinate["pp"]
    dp = mesh.shape["dp"]
    # the global batch (dp x local): the poisoned row lies in dp rank 0's half
    batches = make_batches(N, dp * B, seed=7, poison_row=1)
    ref_params, ref_metrics = reference_run(batches, dp * M)
    f = fs.pipeline(FNS, mse, mesh=mesh, axis="pp", microbatches=M)
    step = fs.zero(f, optimizer(), mesh=mesh, stage=zero_stage, axis="dp", loss_scale=scale())
    params, state = step.init(make_params()[r])
    metrics = []
    for x, t in batches:
        local = slice(d * B, (d + 1) * B)
        xs = {k: v[local] for k, v in x.items()}
        params, state, m = step.step(params, state, (xs if r == 0 else None, t[local]))
        metrics.append(m)
    _check_metrics(metrics, ref_metrics, f"zero {zero_stage} rank {d},{r}")
    full = step.gather(params)
    for k in full:
        assert_close(full[k], ref_params[r][k], f"zero {zero_stage} params {k}", **TOL)
    return True


def _dp_pp_weighted():
    """fs.pipeline(weights=token counts) under fs.zero over dp=2 x pp=2: the global token
    mean (as fs.accumulate's weights under fs.zero), not the mean of the replicas' means;
    a replica whose microbatches all weigh 0 runs nothing and gets zero grads (step 1:
    dp rank 0's whole half is masked out), while the other replica holds the tokens."""
    mesh = fs.Mesh(dp=2, pp=2)
    d, r = mesh.coordinate["dp"], mesh.coordinate["pp"]
    dp = mesh.shape["dp"]
    g = torch.Generator().manual_seed(11)
    batches = []
    for i in range(3):
        x = {"x": torch.randn(dp * B, D, generator=g, dtype=torch.float64)}
        x["k"] = torch.ones(dp * B, dtype=torch.float64)
        mask = (torch.rand(dp * B, generator=g) < 0.3).double()
        mask[B:] = 1.0  # dp rank 1's half: every row counts; dp rank 0's: about 30%
        if i == 1:
            mask[:B] = 0.0  # dp rank 0 holds no tokens at all
        t = torch.randn(dp * B, C, generator=g, dtype=torch.float64)
        batches.append((x, torch.cat([t, mask[:, None]], 1)))

    def masked_mse(y, t):
        m = t[:, C]
        return (((y - t[:, :C]) ** 2).mean(1) * m).sum() / m.sum().clamp(min=1)

    def tokens(x, t):
        return t[:, C].sum()

    def composed(ps, batch):
        x, t = batch
        return masked_mse(last(ps[1], first(ps[0], x)), t)

    ref = fs.train_step(
        fs.accumulate(fs.value_and_grad(composed), steps=dp * M, weights=lambda b: tokens(*b)),
        optimizer(),
    )
    ref_params, ref_state = ref.init(make_params())
    f = fs.pipeline(FNS, masked_mse, mesh=mesh, axis="pp", microbatches=M, weights=tokens)
    step = fs.zero(f, optimizer(), mesh=mesh, stage=1, axis="dp")
    params, state = step.init(make_params()[r])
    local = slice(d * B, (d + 1) * B)
    for i, (x, t) in enumerate(batches):
        ref_params, ref_state, e = ref.step(ref_params, ref_state, (x, t))
        xs = {k: v[local] for k, v in x.items()}
        params, state, m = step.step(params, state, (xs if r == 0 else None, t[local]))
        assert_close(m["loss"], e["loss"], f"weighted loss {i}", **TOL)
        assert_close(m["grad_norm"].double(), e["grad_norm"].double(), f"norm {i}", **TOL)
    for k, v in step.gather(params).items():
        assert_close(v, ref_params[r][k], f"weighted params {k}", **TOL)
    # the mean of the replicas' means differs (the test would fail on it)
    x, t = batches[0]
    halves = [
        composed(make_params(), (x_h, t_h))
        for x_h, t_h in (
            ({k: v[:B] for k, v in x.items()}, t[:B]),
            ({k: v[B:] for k, v in x.items()}, t[B:]),
        )
    ]
    whole = composed(make_params(), (x, t))
    assert abs(float(sum(halves) / 2 - whole)) > 1e-3
    return True


def _four_ranks():
    torch.set_num_threads(1)
    return [_dp_pp(1), _dp_pp(3), _dp_pp_weighted()]


@pytest.mark.timeout(240)
def test_zero_over_dp_and_pp_equals_the_single_process_reference():
    assert run(_four_ranks, 4, timeout=200) == [[True, True, True]] * 4
