"""fs.pipeline against the single-process reference, on 2 and 4 gloo ranks.

The reference is ``fs.accumulate(fs.value_and_grad(composition), steps=m, weights=...)`` of
the unpipelined composition of the same stage functions (float64). Stages have uneven param
trees (an embedding first, a head last) and pass a pytree activation with an integer leaf.
The stage functions count their calls and log forward/backward events per rank, which shows
that each rank ran only its stage, on every microbatch, in the schedule's order; saved-tensor
accounting shows 1F1B holding at most p - rank microbatches' activations (GPipe: all m).
torch's own test_grad_with_manual (MultiMLP, MSELoss(sum)) is ported. Errors are checked to
raise on every rank (no hang), and a good call still works after them. The schedules' action
lists are checked without processes: no deadlock under fs.pipeline's communication model.
Zero bubble: the same equivalence, a trace of B (input grads) running ahead of W (weight
grads), the split backward against one backward, and its bubble in a unit-time simulation.
Tied weights: a GPT-like toy whose LM head reuses the embedding matrix gets the reference's
gradient of the one shared tensor on both owners, which stay identical under fs.train_step.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as hst

import fsharding as fs
from fsharding import optim
from fsharding.parallel.pipeline import _actions, pipeline
from fsharding.transforms.offload import _recording
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


TRACE: list[tuple[str, int]] = []  # zero bubble: ("B" | "W", forward index) on "head"


def head_traced(p, a):
    """``head`` that logs when its input's gradient ("B") and its weight's ("W") are made."""
    n = _count("head")
    h, w = a["h"] * 1, p["out"].view_as(p["out"])
    if h.requires_grad:
        h.register_hook(lambda g: TRACE.append(("B", n)))
        w.register_hook(lambda g: TRACE.append(("W", n)))
    return (h @ w, a["mask"])


SEEN: set[torch.dtype] = set()  # dtypes of the params inside a stage (under fs.amp)


def seen(fn):
    def stage(p, a):
        SEEN.update(t.dtype for t in fs.tree.leaves(p))
        return fn(p, a)

    return stage


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


def reference_grad_fn(fns, weights):
    """``fs.accumulate(fs.value_and_grad(composition))`` over the list of all stages' params."""

    def composed(ps, x, y):
        a = x
        for f, p in zip(fns, ps, strict=True):
            a = f(p, a)
        return loss_fn(a, y)

    return fs.accumulate(fs.value_and_grad(composed), steps=M, weights=weights)


def reference(fns, params, x, y, weights):
    return reference_grad_fn(fns, weights)(params, x, y)


def check_against_reference(mesh, fns, params, x, y, *, schedule, weights, what, v=1):
    """Runs the pipeline on this rank; compares loss and this rank's grads with the
    reference; returns this rank's stage forward calls during the pipelined call."""
    r, p = mesh.coordinate["pp"], mesh.shape["pp"]
    n = p * v
    f = pipeline(
        fns,
        loss_fn,
        mesh=mesh,
        microbatches=M,
        schedule=schedule,
        weights=weights,
        virtual_stages=v,
    )
    ref_loss, ref_grads = reference(fns, params, x, y, weights)
    inputs = x if r == 0 else None
    targets = y if r == p - 1 else None
    mine = list(range(r, n, p))  # rank r runs stages r, r + p, ...
    stage_params = params[r] if v == 1 else [params[s] for s in mine]
    f(stage_params, inputs, targets)  # first call: probe + run
    before = dict(COUNTS)
    loss, grads = f(stage_params, inputs, targets)
    calls = {k: COUNTS.get(k, 0) - before.get(k, 0) for k in COUNTS}
    assert_close(loss, ref_loss, f"{what}: loss", **TOL)
    assert torch.isfinite(loss)
    for s, g_s in zip(mine, [grads] if v == 1 else grads, strict=True):
        assert fs.tree.structure(g_s) == fs.tree.structure(params[s]), what
        for (path, g), (_, e) in zip(
            fs.tree.leaves_with_path(g_s), fs.tree.leaves_with_path(ref_grads[s]), strict=True
        ):
            assert g.dtype == e.dtype, (what, path)
            assert_close(g, e, f"{what}: stage {s} grad {path}", **TOL)
    return {k: c for k, c in calls.items() if c}


def in_flight(events: list[tuple[str, int]]) -> int:
    """Peak number of microbatches forwarded but not yet backwarded."""
    live = peak = 0
    for kind, _ in events:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


class SavedBytes:
    """Saved-tensor accounting: bytes of activations saved for backward and still alive
    (params excluded), their peak and their total over a call."""

    def __init__(self, params):
        self.exclude = {t.untyped_storage().data_ptr() for t in fs.tree.leaves(params)}
        self.live = self.peak = self.total = 0

    def pack(self, t):
        if t.untyped_storage().data_ptr() in self.exclude:
            return t
        return _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held


class _Held:
    # detached: a saved output kept with its grad_fn would make a cycle through C++ that
    # only running its node breaks (a graph kept by retain_graph and dropped unrun leaks)
    def __init__(self, t, owner):
        self.t, self.owner, self.n = t.detach(), owner, t.numel() * t.element_size()
        owner.live += self.n
        owner.total += self.n
        owner.peak = max(owner.peak, owner.live)

    def __del__(self):
        self.owner.live -= self.n


def saved_bytes(f, *args):
    acc = SavedBytes(args[0])
    with torch.autograd.graph.saved_tensors_hooks(acc.pack, acc.unpack):
        f(*args)
    assert acc.live == 0
    return acc.peak, acc.total


class MLPModule(torch.nn.Module):
    """torch's test model (test/distributed/pipelining/model_registry.py)."""

    def __init__(self, d_hid):
        super().__init__()
        self.net1 = torch.nn.Linear(d_hid, d_hid)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(d_hid, d_hid)

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))


def grad_with_manual(mesh):
    """torch's test_schedule_multiproc.py::test_grad_with_manual, ported: a MultiMLP split
    into one layer per rank (stages from fs.functional), MSELoss(reduction="sum"), two
    steps; fs.pipeline's loss is the mean over microbatches, so m * loss and m * grads
    equal the full model's."""
    r, p = mesh.coordinate["pp"], mesh.shape["pp"]
    torch.manual_seed(0)
    d_hid, batch = 16, 32
    layers = [MLPModule(d_hid) for _ in range(p)]
    ref_mod = torch.nn.Sequential(*layers)
    x = torch.randn(batch, d_hid)
    with torch.no_grad():
        target = ref_mod(x) + torch.randn(batch, d_hid)
    loss_fn = torch.nn.MSELoss(reduction="sum")
    ref_loss = loss_fn(ref_mod(x), target)
    ref_loss.backward()
    applies, stage_params = zip(*(fs.functional(layer) for layer in layers))
    for schedule in ("gpipe", "1f1b"):
        f = pipeline(list(applies), loss_fn, mesh=mesh, microbatches=4, schedule=schedule)
        for _ in range(2):
            loss, grads = f(stage_params[r], x if r == 0 else None, target if r == p - 1 else None)
            torch.testing.assert_close(loss * 4, ref_loss.detach())
            for name, g in grads.items():
                ref = layers[r].get_parameter(name).grad
                torch.testing.assert_close(g * 4, ref, rtol=1e-5, atol=4e-5)


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

    # interleaved: 4 stages on 2 ranks (rank 0: embed, block; rank 1: block, head)
    params4 = make_params(["embed", "block", "block", "head"], seed=7)
    for schedule in ("interleaved_1f1b", "gpipe"):
        calls = check_against_reference(
            mesh,
            [embed, block, block, head],
            params4,
            x,
            y,
            schedule=schedule,
            weights=tokens,
            what=f"{schedule}, v=2",
            v=2,
        )
        assert calls == ({"embed": M, "block": M} if r == 0 else {"block": M, "head": M})

    # zero bubble: equal to the reference; on the last stage the input grads (B) run ahead
    # of the weight grads (W), in the schedule's order
    TRACE.clear()
    calls = check_against_reference(
        mesh, [embed, head_traced], params, x, y, schedule="zero_bubble", weights=tokens, what="zb"
    )
    assert calls == ({"embed": M} if r == 0 else {"head": M}), calls
    if r == 1:
        base = TRACE[-2 * M][1]
        out["zb_trace"] = [(kind, n - base) for kind, n in TRACE[-2 * M :]]

    # stage functions under fs.remat, a loss scale
    args = (params[r], x if r == 0 else None, y if r == 1 else None)
    ref_loss, ref_grads = reference(fns, params, x, y, None)
    for schedule in ("1f1b", "zero_bubble"):
        f = pipeline(
            [fs.remat(embed), fs.remat(head)], loss_fn, mesh=mesh, microbatches=M, schedule=schedule
        )
        for scale in (None, fs.StaticLossScale(1024.0)):
            loss, grads = f(*args, loss_scale=scale)
            what = f"remat, {schedule}, scale {scale}"
            assert_close(loss, ref_loss, f"{what}: loss", **TOL)
            for k in grads:
                assert_close(grads[k], ref_grads[r][k], f"{what}: {k}", **TOL)

    # fs.amp stages: bfloat16 inside (params and activations), float32 between stages, and
    # the same values as the unpipelined composition of the same amp stages
    SEEN.clear()
    amp_fns = [fs.amp(seen(embed), policy="bf16"), fs.amp(seen(head), policy="bf16")]
    for schedule in ("1f1b", "zero_bubble"):
        f = pipeline(amp_fns, loss_fn, mesh=mesh, microbatches=M, schedule=schedule)
        loss, grads = f(*args)
        amp_loss, amp_grads = reference(amp_fns, params, x, y, None)
        assert_close(loss, amp_loss, f"amp, {schedule}: loss", **TOL)
        for k in grads:
            assert grads[k].dtype == torch.float64
            assert_close(grads[k], amp_grads[r][k], f"amp, {schedule}: {k}", **TOL)
    assert SEEN == {torch.bfloat16}, SEEN
    assert (loss - ref_loss).abs() > 1e-6, (loss, ref_loss)  # the casts did something
    out["amp_error"] = float((loss - ref_loss).abs() / ref_loss.abs())

    # fs.offload to disk: the saved activations go to files (and come back for B, and
    # again for W), values unchanged; fs.offload(fs.remat(stage)) recomputes and has
    # nothing to move (the remat region keeps only its inputs: params and the received
    # activations, which offload leaves in place), as in single-process composition
    toy = shared_model(seed=12, blocks=0)[2]  # untied: each stage its own wte
    toy_args = (toy[r], x["tokens"] if r == 0 else None, y if r == 1 else None)
    toy_loss, toy_grads = reference([tok_embed, lm_head], toy, x["tokens"], y, None)
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("1f1b", "zero_bubble"):
            for remat in (False, True):
                wrap = (lambda fn: fs.remat(fn)) if remat else (lambda fn: fn)  # noqa: E731
                fns2 = [
                    fs.offload(wrap(counted(tok_embed)), to=tmp),
                    fs.offload(wrap(lm_head), to=tmp),
                ]
                f = pipeline(fns2, loss_fn, mesh=mesh, microbatches=M, schedule=schedule)
                f(*toy_args)
                calls = COUNTS.get("tok_embed", 0)
                with _recording() as log:
                    loss, grads = f(*toy_args)
                calls = COUNTS.get("tok_embed", 0) - calls
                what = f"offload, remat={remat}, {schedule}"
                assert (len(log) > 0) == (not remat), (what, log)
                assert all(p is not None and p.startswith(tmp) for _, _, p in log), log
                assert r == 1 or calls == (2 * M if remat else M), (what, calls)
                out[what] = sum(n for _, n, _ in log)
                assert_close(loss, toy_loss, f"{what}: loss", **TOL)
                for k in grads:
                    assert_close(grads[k], toy_grads[r][k], f"{what}: {k}", **TOL)
                assert not os.listdir(tmp)  # every file removed after its backward

    # saved activations in flight: 1F1B holds at most p - r microbatches, GPipe all m
    peaks = {}
    for schedule in ("gpipe", "1f1b", "zero_bubble"):
        f = pipeline(fns, loss_fn, mesh=mesh, microbatches=M, schedule=schedule)
        f(*args)
        peaks[schedule] = saved_bytes(f, *args)
    peak, total = peaks["gpipe"]
    assert total > 0 and peak == total, peaks
    peak, total = peaks["1f1b"]
    assert peak <= (2 - r) * total // M, peaks
    out["saved"] = peaks

    # fs.memory_report of a step over the pipeline: this rank's stage, its saved and
    # received activations (1F1B: p - r microbatches; GPipe: all m) and p2p bytes
    out["report"] = {}
    for schedule in ("gpipe", "1f1b", "zero_bubble"):
        f = pipeline(fns, loss_fn, mesh=mesh, microbatches=M, schedule=schedule)
        step = fs.train_step(f, optim.sgd(0.1))  # batch = (inputs, targets)
        report = fs.memory_report(step, *step.init(params[r]), args[1:])
        assert set(report.stages) == {r}, report.stages
        st = report.stages[r]
        assert st.saved_activations == report.saved_activations > 0, report
        out["report"][schedule] = (st, str(report))

    # fs.train_step on the pipeline: each rank updates its stage as the reference step does
    opt = optim.adamw(1e-2, weight_decay=0.1)
    f = pipeline(fns, loss_fn, mesh=mesh, microbatches=M, weights=tokens)
    step = fs.train_step(f, opt)
    ref_fn = reference_grad_fn(fns, tokens)
    ref_step = fs.train_step(lambda ps, b, **kw: ref_fn(ps, *b, **kw), opt)
    mine, opt_state = step.init(params[r])
    every, ref_state = ref_step.init(params)
    for _ in range(3):
        mine, opt_state, metrics = step.step(mine, opt_state, args[1:])
        every, ref_state, ref_metrics = ref_step.step(every, ref_state, (x, y))
        assert_close(metrics["loss"], ref_metrics["loss"], "train_step loss", **TOL)
    for k in mine:
        assert_close(mine[k], every[r][k], f"train_step params {k}", **TOL)

    grad_with_manual(mesh)

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
    for r, (res, _) in enumerate(results):  # bytes of saved activations: (peak, total)
        (g_peak, g_total), (f_peak, f_total) = res["saved"]["gpipe"], res["saved"]["1f1b"]
        assert g_total == f_total and g_peak == g_total, res["saved"]
        assert f_peak * M <= (2 - r) * f_total < g_peak * M, res["saved"]
    for weighted in (False, True):
        assert orders[("gpipe", weighted)] == ["F"] * M + ["B"] * M
        assert orders[("1f1b", weighted)] == ["F", "F", "B", "F", "B", "F", "B", "B"]
        assert in_flight([(k, 0) for k in orders[("gpipe", weighted)]]) == M
        assert in_flight([(k, 0) for k in orders[("1f1b", weighted)]]) == 2
    # zero bubble (p=2, m=4), rank 1: B0 B1 W0 B2 W1 B3 W2 W3, each W after its B
    trace = results[1][0]["zb_trace"]
    assert trace == [(k, i) for k, _, i in _actions("zero_bubble", 2, 1, M) if k != "F"], trace
    assert trace[:3] == [("B", 0), ("B", 1), ("W", 0)], trace  # a W deferred past a B
    # fs.memory_report: p2p bytes are the messages' (a 16-byte header, then the leaves);
    # rank 0 sends M activations {h, extra, mask} and receives M grads {h, extra}
    b = B // M
    act, grad = 16 + 8 * (b * T * D + b * D) + 8 * b * T, 16 + 8 * (b * T * D + b * D)
    for r, (res, _) in enumerate(results):
        rep = res["report"]
        for schedule, (st, text) in rep.items():
            sent, received = (act, grad) if r == 0 else (grad, act)
            assert (st.p2p_sent, st.p2p_received) == (M * sent, M * received), (schedule, st)
            assert (st.messages_sent, st.messages_received) == (M, M), st
            assert f"\n  {r}  " in text and "pipeline stages" in text, text
            # held from F to B (zero bubble: to W): rank 1 holds M, one, two microbatches
            release = "W" if schedule == "zero_bubble" else "B"
            acts = [(k, i) for k, _, i in _actions(schedule, 2, r, M) if k in ("F", release)]
            held = in_flight([("B" if k == release else k, i) for k, i in acts])
            assert st.received_activations == r * held * (act - 16), (schedule, held, st)
        # (rank 0's embedding saves the token ids, a view of the whole batch's storage)
        g, o = rep["gpipe"][0].saved_activations, rep["1f1b"][0].saved_activations
        assert o < g, (g, o)
    for r, (res, _) in enumerate(results):
        # zero bubble keeps, past B, what W needs of up to 2p - 1 - r microbatches (rank 0:
        # its B is empty, so all of it; the last rank only its weights' inputs)
        (z_peak, z_total), (f_peak, f_total) = res["saved"]["zero_bubble"], res["saved"]["1f1b"]
        assert z_total == f_total and z_peak * M <= (3 - r) * z_total, res["saved"]
        assert f_peak <= z_peak < res["saved"]["gpipe"][0], res["saved"]
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
    for schedule, weights in (
        ("gpipe", tokens),
        ("1f1b", None),
        ("1f1b", tokens),
        ("zero_bubble", tokens),
    ):
        calls = check_against_reference(
            mesh, fns, params, x, y, schedule=schedule, weights=weights, what=schedule
        )
        assert calls == {names[r]: M}, (schedule, calls)

    # interleaved: 8 stages on 4 ranks
    params8 = make_params(["embed"] + ["block"] * 6 + ["head"], seed=8)
    fns8 = [embed] + [block] * 6 + [head]
    calls = check_against_reference(
        mesh,
        fns8,
        params8,
        x,
        y,
        schedule="interleaved_1f1b",
        weights=tokens,
        what="interleaved v=2",
        v=2,
    )
    assert sum(calls.values()) == 2 * M, calls

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

    from tests.parallel.test_pipeline_errors import four_ranks_failures

    return four_ranks_failures()


def test_four_ranks_uneven_and_homogeneous_stages_equal_reference_and_fail_together():
    """... and a middle stage that raises mid-schedule fails every rank (the scenario and
    its checks are test_pipeline_errors')."""
    from tests.parallel.test_pipeline_errors import check_four_ranks_failures

    check_four_ranks_failures(run(_four_ranks, 4))


# --------------------------------------------------------------------------------------
# tied weights: a GPT-like toy whose LM head is the embedding matrix
# --------------------------------------------------------------------------------------


def counted(fn):
    def stage(p, a):
        COUNTS[fn.__name__] = COUNTS.get(fn.__name__, 0) + 1
        return fn(p, a)

    return stage


def tok_embed(p, x):
    return {"h": torch.tanh((p["wte"][x] + p["wpe"]) @ p["w"])}


def tok_block(p, a):
    return {"h": a["h"] + torch.tanh(a["h"] @ p["w"])}


def lm_head(p, a):
    """Logits from the stage's own copy of the embedding matrix (leaf ``p["wte"]``)."""
    return (a["h"] * p["ln"]) @ p["wte"].T, None


def lm_head_nested(p, a):
    """The same, with the copy at ``p["lm"]["w"]``."""
    return (a["h"] * p["ln"]) @ p["lm"]["w"].T, None


def shared_model(seed: int, blocks: int):
    """The unpipelined model (one ``wte``) and its stages' params (each owner a copy)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    model = {"wte": r(V, D), "wpe": r(T, D), "w0": r(D, D), "ln": r(D)}
    model.update({f"w{i + 1}": r(D, D) for i in range(blocks)})

    def composed(ps, x, y):
        a = tok_embed({"wte": ps["wte"], "wpe": ps["wpe"], "w": ps["w0"]}, x)
        for i in range(blocks):
            a = tok_block({"w": ps[f"w{i + 1}"]}, a)
        return loss_fn(lm_head({"wte": ps["wte"], "ln": ps["ln"]}, a), y)

    stages = [{"wte": model["wte"].clone(), "wpe": model["wpe"], "w": model["w0"]}]
    stages += [{"w": model[f"w{i + 1}"]} for i in range(blocks)]
    stages.append({"wte": model["wte"].clone(), "ln": model["ln"]})
    return model, composed, stages


def _tied():
    mesh = fs.Mesh(pp=2)
    r = mesh.coordinate["pp"]
    x, y = make_batch(seed=9)
    x = x["tokens"]
    out = {}
    for schedule, v, nested in (
        ("1f1b", 1, False),
        ("zero_bubble", 1, True),
        ("interleaved_1f1b", 2, False),
    ):
        blocks = 2 * v - 2
        model, composed, stages = shared_model(seed=3 + v, blocks=blocks)
        head = lm_head
        tied = {"wte": (0, -1)}
        if nested:
            stages[-1] = {"lm": {"w": stages[-1]["wte"]}, "ln": stages[-1]["ln"]}
            head, tied = lm_head_nested, {"wte": {0: "wte", -1: ("lm", "w")}}
        fns = [tok_embed] + [tok_block] * blocks + [head]
        f = pipeline(
            fns, loss_fn, mesh=mesh, microbatches=M, schedule=schedule, virtual_stages=v, tied=tied
        )
        mine = [stages[s] for s in range(r, 2 * v, 2)]
        args = (mine[0] if v == 1 else mine, x if r == 0 else None, y if r == 1 else None)
        loss, grads = f(*args)
        ref_loss, ref = fs.accumulate(fs.value_and_grad(composed), steps=M)(model, x, y)
        what = f"tied, {schedule}"
        assert_close(loss, ref_loss, f"{what}: loss", **TOL)
        grads = [grads] if v == 1 else grads
        by_stage = dict(zip(range(r, 2 * v, 2), grads, strict=True))
        if 0 in by_stage:
            assert_close(by_stage[0]["wte"], ref["wte"], f"{what}: stage 0 wte", **TOL)
            assert_close(by_stage[0]["w"], ref["w0"], f"{what}: stage 0 w", **TOL)
        if 2 * v - 1 in by_stage:
            g = by_stage[2 * v - 1]
            g_wte = g["lm"]["w"] if nested else g["wte"]
            assert_close(g_wte, ref["wte"], f"{what}: last stage's wte", **TOL)
            assert_close(g["ln"], ref["ln"], f"{what}: ln", **TOL)
        # the sum differs from either owner's own part: the exchange did something
        untied = pipeline(
            fns, loss_fn, mesh=mesh, microbatches=M, schedule=schedule, virtual_stages=v
        )
        _, own = untied(*args)
        own = [own] if v == 1 else own
        part = own[0]["wte"] if r == 0 else (own[-1]["lm"]["w"] if nested else own[-1]["wte"])
        assert (part - ref["wte"]).abs().max() > 1e-3, what

    # fs.train_step, clipped by the global norm (f.copies: the tie counted once, as the
    # shared model's one tensor): both owners stay identical, equal to the shared model's
    model, composed, stages = shared_model(seed=11, blocks=0)
    opt = optim.chain(optim.clip_by_global_norm(0.05), optim.adamw(1e-2, weight_decay=0.1))
    f = pipeline([tok_embed, lm_head], loss_fn, mesh=mesh, microbatches=M, tied={"wte": (0, 1)})
    step = fs.train_step(f, opt)  # batch = (inputs, targets); the norm over both stages
    ref_step = fs.train_step(
        lambda ps, b, **kw: fs.accumulate(fs.value_and_grad(composed), steps=M)(ps, *b, **kw), opt
    )
    params, state = step.init(stages[r])
    every, ref_state = ref_step.init(model)
    batch = (x if r == 0 else None, y if r == 1 else None)
    for _ in range(3):
        params, state, metrics = step.step(params, state, batch)
        every, ref_state, ref_metrics = ref_step.step(every, ref_state, (x, y))
        assert_close(metrics["loss"], ref_metrics["loss"], "tied train_step loss", **TOL)
        assert_close(metrics["grad_norm"], ref_metrics["grad_norm"], "tied grad norm", **TOL)
    assert_close(params["wte"], every["wte"], "tied train_step wte", **TOL)
    copies = [None, None]
    torch.distributed.all_gather_object(copies, params["wte"])
    out["identical"] = torch.equal(copies[0], copies[1])
    out["moved"] = float((copies[0] - model["wte"]).abs().max())

    # bad ties: a missing leaf, copies that differ; raised on every rank, no hang
    errors = {}
    f = pipeline([tok_embed, lm_head], loss_fn, mesh=mesh, microbatches=M, tied={"wpe": (0, 1)})
    errors["missing"] = raises(lambda: f(stages[r], *batch), ValueError)
    f = pipeline([tok_embed, lm_head], loss_fn, mesh=mesh, microbatches=M, tied={"wte": (0, 1)})
    differ = dict(stages[r], wte=stages[r]["wte"] + (r == 1))
    errors["values"] = raises(lambda: f(differ, *batch), ValueError)
    return out, errors


def test_tied_weights_get_the_summed_grad_and_stay_identical():
    results = run(_tied, 2)
    for out, errors in results:
        assert out["identical"] and out["moved"] > 1e-3, out
        assert "['wpe']" in errors["missing"] and "stage 1" in errors["missing"], errors
        assert "different values" in errors["values"], errors


def test_tied_bad_arguments_raise_at_build_time():
    mesh = fs.Mesh(pp=1)
    build = lambda tied: pipeline(  # noqa: E731
        [tok_embed, lm_head],
        loss_fn,
        mesh=mesh,
        microbatches=2,
        virtual_stages=2,
        schedule="gpipe",
        tied=tied,
    )
    f = build({"wte": {-1: ("lm", "w"), 0: "wte"}})
    assert f.tied == (("wte", ((0, "['wte']"), (1, "['lm']['w']"))),)
    grads = [{"w": 0, "wpe": 0, "wte": 0}, {"ln": 0, "lm": {"w": 0}}]
    assert f.copies(grads) == [False, False, False, True, False]  # the head's lm.w (< ln)
    assert build(None).copies(grads) == [False] * 5
    assert "stage 2" in raises(lambda: build({"wte": (0, 2)}), ValueError)
    assert "two or more" in raises(lambda: build({"wte": (0, -2)}), ValueError)
    assert "tied must be a dict" in raises(lambda: build([("wte", (0, 1))]), TypeError)
    assert "a tuple of keys" in raises(lambda: build({"wte": {0: "wte", 1: 3.0}}), TypeError)


# --------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------


def test_local_mesh_runs_every_stage_in_process():
    fns = [embed, block, head]
    params = make_params(["embed", "block", "head"])
    x, y = make_batch()
    f = pipeline(
        fns,
        loss_fn,
        mesh=fs.Mesh(pp=1),
        virtual_stages=3,
        microbatches=M,
        weights=tokens,
        schedule="gpipe",
    )
    assert (f.mesh.shape, f.axis, f.stages) == ({"pp": 1}, "pp", (0, 1, 2))
    assert (f.microbatches, f.schedule, f.virtual_stages, f.tied) == (M, "gpipe", 3, ())
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


def simulate(schedule: str, p: int, v: int, m: int) -> None:
    """Runs every rank's action list with fs.pipeline's communication model (sends never
    block; a receive waits for its producer): no deadlock, each action exactly once."""
    n = p * v
    lists = {r: _actions(schedule, p, r, m, v) for r in range(p)}
    pos = dict.fromkeys(range(p), 0)
    done: set[tuple[str, int, int]] = set()
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                kind, k, i = lists[r][pos[r]]
                s = r + k * p
                if kind == "F":
                    ready = s == 0 or ("F", s - 1, i) in done
                elif kind == "W":
                    ready = ("B", s, i) in done
                else:
                    ready = ("F", s, i) in done and (s == n - 1 or ("B", s + 1, i) in done)
                if not ready:
                    break
                assert (kind, s, i) not in done
                done.add((kind, s, i))
                pos[r] += 1
                progress = True
    stuck = {r: lists[r][pos[r]] for r in range(p) if pos[r] < len(lists[r])}
    assert not stuck, f"{schedule} p={p} v={v} m={m} deadlocks at {stuck}"
    assert len(done) == (3 if schedule == "zero_bubble" else 2) * n * m


def fifo(schedule: str, p: int, v: int, m: int) -> bool:
    """Whether, between every two ranks, messages are received in the order they are sent
    (what a tag-less backend such as NCCL needs; gloo matches fs.pipeline's tags)."""
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    n = p * v
    for r in range(p):
        for kind, k, i in _actions(schedule, p, r, m, v):
            s = r + k * p
            if kind == "W":  # no message
                continue
            if kind == "F":
                inbox, outbox = (s - 1, s, "act", i), (s, s + 1, "act", i)
                has_in, has_out = s > 0, s < n - 1
            else:
                inbox, outbox = (s + 1, s, "grad", i), (s, s - 1, "grad", i)
                has_in, has_out = s < n - 1, s > 0
            if has_in:  # received at the start of the action, sent at its end
                received.setdefault((inbox[0] % p, r), []).append(inbox)
            if has_out:
                sent.setdefault((r, outbox[1] % p), []).append(outbox)
    return sent == received


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("v", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 12])
def test_schedules_run_without_deadlock(p, v, m):
    simulate("gpipe", p, v, m)
    assert fifo("gpipe", p, v, m)
    if v == 1:
        simulate("1f1b", p, v, m)
        assert fifo("1f1b", p, v, m)
        simulate("zero_bubble", p, v, m)
        assert fifo("zero_bubble", p, v, m)
    elif m % p == 0:
        simulate("interleaved_1f1b", p, v, m)
        assert fifo("interleaved_1f1b", p, v, m)


def idle_time(schedule: str, p: int, m: int, cost: dict[str, int]) -> int:
    """Per-rank idle time (the bubble) of every rank's action list run with the given
    action times (no communication cost); it is the same on every rank."""
    lists = [_actions(schedule, p, r, m) for r in range(p)]
    end: dict[tuple[str, int, int], int] = {}
    pos, clock = [0] * p, [0] * p
    while any(pos[r] < len(lists[r]) for r in range(p)):
        for r in range(p):
            while pos[r] < len(lists[r]):
                kind, _, i = lists[r][pos[r]]
                deps = {
                    "F": [("F", r - 1, i)] if r > 0 else [],
                    "B": [("F", r, i)] + ([("B", r + 1, i)] if r < p - 1 else []),
                    "W": [("B", r, i)],
                }[kind]
                if any(d not in end for d in deps):
                    break
                clock[r] = max([clock[r]] + [end[d] for d in deps]) + cost[kind]
                end[(kind, r, i)] = clock[r]
                pos[r] += 1
    work = [sum(cost[kind] for kind, _, _ in lst) for lst in lists]
    idle = {max(clock) - w for w in work}
    assert len(idle) == 1, idle
    return idle.pop()


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 12])
def test_zero_bubble_splits_backward_and_shrinks_the_bubble(p, m):
    """B and W once per microbatch, W after its B, some W deferred past a later B; with
    F = B = W = 1 (1F1B's backward B + W = 2) the bubble is p - 1 instead of 3 (p - 1)
    once m >= p, and never larger than 1F1B's; 1F1B's bound p - r on un-B'd microbatches
    holds, and fewer than 2p - r are forwarded but not yet W'd."""
    for r in range(p):
        acts = _actions("zero_bubble", p, r, m)
        for kind in "FBW":
            assert [i for k, _, i in acts if k == kind] == list(range(m)), (kind, acts)
        assert all(acts.index(("W", 0, i)) > acts.index(("B", 0, i)) for i in range(m))
        assert in_flight([(k, i) for k, _, i in acts if k != "W"]) <= p - r
        freed_by_w = [("B" if k == "W" else k, i) for k, _, i in acts if k != "B"]
        assert in_flight(freed_by_w) <= min(2 * p - 1 - r, m)
    if m >= 2:
        last = _actions("zero_bubble", p, p - 1, m)
        assert last.index(("W", 0, 0)) > last.index(("B", 0, 1)), last
    one = idle_time("1f1b", p, m, {"F": 1, "B": 2})
    zb = idle_time("zero_bubble", p, m, {"F": 1, "B": 1, "W": 1})
    assert one == 3 * (p - 1)
    assert zb <= one and (m < p or zb == p - 1), (zb, one)


def _twice(p, a):
    """A weight used twice on the input's path and an output made from params only."""
    h = torch.tanh(a["h"] @ p["w"] + p["b"]) @ p["w"] + a["extra"][0][:, None, :]
    return {"h": h, "extra": (p["b"] * 2,), "mask": a["mask"]}


def _bypass(p, a):
    """The input passed through, a weight that meets the input's path once."""
    return {"h": a["h"], "extra": (a["extra"][0] * p["b"].sum(),), "mask": a["mask"]}


@pytest.mark.parametrize("fn", [block, _twice, _bypass, head])
def test_split_backward_equals_one_backward(fn):
    """B's input grads and W's weight grads equal one autograd.grad over both."""
    from fsharding.parallel.pipeline import _backward_input, _backward_weight

    params = make_params(["block"], seed=3)[0] if fn is not head else make_params(["head"])[0]
    x, _ = make_batch()
    a = embed(make_params(["embed"])[0], x)
    h, e = a["h"].detach().requires_grad_(True), a["extra"][0].detach().requires_grad_(True)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    out = fn(leaves, {"h": h, "extra": (e,), "mask": a["mask"]})
    outs = [t for t in fs.tree.leaves(out) if t.requires_grad]
    g = torch.Generator().manual_seed(0)
    cots = [torch.randn(t.shape, dtype=t.dtype, generator=g) for t in outs]
    ws = list(leaves.values())
    expected = torch.autograd.grad(outs, ws + [h, e], cots, retain_graph=True, allow_unused=True)
    grads_in, state = _backward_input(outs, cots, [h, e], ws)
    del outs, out
    got = list(_backward_weight(state, ws)) + list(grads_in)
    for name, a_, b_ in zip([*leaves, "h", "extra"], got, expected, strict=True):
        assert (a_ is None) == (b_ is None), name
        if a_ is not None:
            assert_close(a_, b_, name, **TOL)


OPS = ("mm", "add", "mul", "tanh", "reuse", "side", "pass")


def random_stage(ops):
    """A stage from a list of ops on (h, e): matmuls, adds and products with params, a
    param used twice, a branch of params only joining later (``side``), pass-throughs."""

    def stage(p, a):
        h, e = a["h"], a["e"]
        side = None
        for j, op in enumerate(ops):
            w = p[f"w{j}"]
            if op == "mm":
                h = h @ w
            elif op == "add":
                h = h + w[0]
            elif op == "mul":
                h = h * w[0] + e
            elif op == "tanh":
                h = torch.tanh(h)
            elif op == "reuse":
                h = torch.tanh(h @ w) @ w
            elif op == "side":
                side = (w * 2).sum(0)
                h = h + side
        return {"h": h, "e": e * p["w0"][0] if side is None else side.expand_as(e)}

    return stage


@given(
    hst.lists(hst.sampled_from(OPS), min_size=1, max_size=6),
    hst.integers(0, 2**31 - 1),
)
def test_split_backward_on_random_stages_equals_one_backward(ops, seed):
    """B (input grads now) and W (weight grads later, from the recorded intermediates) of
    random stages equal one autograd.grad, including params reused, params on a branch
    that meets no input, and inputs passed through."""
    from fsharding.parallel.pipeline import _backward_input, _backward_weight

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    params = {f"w{j}": r(D, D).requires_grad_(True) for j in range(len(ops))}
    h, e = r(3, D).requires_grad_(True), r(3, D).requires_grad_(True)
    out = random_stage(ops)(params, {"h": h, "e": e})
    outs = [t for t in out.values() if t.requires_grad]
    cots = [r(*t.shape) for t in outs]
    ws = list(params.values())
    expected = torch.autograd.grad(outs, ws + [h, e], cots, retain_graph=True, allow_unused=True)
    grads_in, state = _backward_input(outs, cots, [h, e], ws)
    del outs, out
    got = list(_backward_weight(state, ws)) + list(grads_in)
    for j, (a_, b_) in enumerate(zip(got, expected, strict=True)):
        if b_ is None:
            assert a_ is None or not a_.any(), (ops, j)
        else:
            assert a_ is not None, (ops, j)
            assert_close(a_, b_, f"{ops}: grad {j}", **TOL)


def test_bad_arguments_raise_at_build_time():
    mesh = fs.Mesh(pp=1)
    msg = raises(lambda: pipeline(embed, loss_fn, mesh=mesh, microbatches=0), ValueError)
    assert "microbatches" in msg
    msg = raises(
        lambda: pipeline(embed, loss_fn, mesh=mesh, microbatches=2, schedule="x"), ValueError
    )
    assert "'gpipe'" in msg and "'1f1b'" in msg
    msg = raises(
        lambda: pipeline([embed] * 2, loss_fn, mesh=mesh, microbatches=2, virtual_stages=2),
        ValueError,
    )
    assert "interleaved_1f1b" in msg
    msg = raises(lambda: pipeline(embed, loss_fn, mesh=mesh, axis="dp", microbatches=2), ValueError)
    assert "axis='dp'" in msg
    msg = raises(lambda: pipeline([embed, head], loss_fn, mesh=mesh, microbatches=2), ValueError)
    assert "2 stage functions" in msg and "1 stages" in msg
