"""Memory transforms on one process: fs.remat / offload / accumulate / amp vs PyTorch.

Workload: ANCHORS.md's GPT "small" (10,893,312 params), batch 8 x 128 tokens, AdamW(lr 3e-3,
betas (0.9, 0.95), wd 0.1), fp32 unless stated, 2 threads. fsharding variants run the model
through ``fs.functional(model, wrap={Block: transform})`` (params passed explicitly to every
block) and step with ``fs.train_step(..., optim.adamw(...))`` and ``donate=True``; PyTorch
variants are the plain ``nn.Module`` with ``torch.optim.AdamW(fused=True)`` (the kernel
fsharding's adamw runs; runs before 2026-12-06 used ``foreach=True``).

Sections (each one run of ``common.run_side_by_side_quiet``: variants alternate step by step,
as in ``common.run_side_by_side``, and rounds during which other processes used more than 10%
of the CPU are dropped, since this 2-core machine is shared):

* a. what backward keeps: saved activations (``fs.saved_activations``; PyTorch rows:
  ``saved_tensors_hooks`` plus selective-checkpoint caches), bytes offloaded, peak live MiB of
  one forward+backward (``common.PeakLiveMemory``), and step time.
* b. ``fs.remat`` vs ``torch.utils.checkpoint`` called directly per block (full, and selective
  "save matmuls"); two decomposition rows run torch's checkpoint as the ``wrap`` transform of
  the same functional model. Goal: fs.remat <= 1.02x torch, both against torch on the
  module and on the same path (``fs.functional`` + torch's checkpoint as the wrap
  transform vs ``fs.functional`` + ``fs.remat``), at the stated 2 threads.
* c. ``fs.accumulate(steps=4)`` vs a hand-written loop over 4 microbatches on the functional
  model (grads summed into a buffer with foreach ops). Goal: <= 1.03x, and peak saved bytes
  (held by autograd at once during the step) about 1/4 of the full batch's.
* d. ``fs.amp(policy="bf16")`` vs ``torch.autocast("cpu", dtype=torch.bfloat16)``. Goal <= 1.05x.

Same work: every variant steps through the same batches; its (loss, global grad norm) at
every step (warm-up included) is compared with eager fp32's: fp32 variants within 1e-4
relative (loss) and 1e-3 (grad norm); bf16 variants within 3e-2 and 1e-1. Its params after
the run too (``common.param_deviation``: ``||p - p_eager|| / ||p_eager - p_init||``), fp32
within 1e-3, bf16 within 0.3.

Run: ``python benchmarks/bench_memory.py [--steps 10] [--warmup 3] [--only a,b,c,d]``; writes
``benchmarks/results/memory.md`` (sections not run are kept; ``--no-write``: print only;
``--json PATH``: the figures; ``--preset tiny``: the smoke-test model). Medians are over ``--steps``
quiet rounds (contention <= 10%) out of at most ``--max-rounds``; a section that gets fewer
is rerun up to ``--retries`` times, and the run with the most quiet rounds is reported with
every contention figure seen.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import io
import os
import pstats
import re
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import fsharding as fs
from fsharding import optim
from fsharding.models.gpt import GPT, Block, GPTConfig
from fsharding.transforms import offload as _offload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Variant,
    machine,
    param_deviation,
    peak_live_mib,
    run_side_by_side_quiet,
    saved_tensors_mib,
)

LR, B1, B2, EPS, WD = 3e-3, 0.9, 0.95, 1e-8, 0.1
BATCH, K = 8, 4
MIB = 2**20
QUIET = 0.10  # a timed round with more contention than this is dropped
MIN_QUIET = 10  # fewer quiet rounds than this: all rounds are used (and reported as such)
TOL = {"fp32": (1e-4, 1e-3, 1e-3), "bf16": (3e-2, 1e-1, 0.3)}  # loss, grad norm, params
CFG = [GPTConfig.preset("small")]  # --preset
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.md")
FIGURES: dict[str, dict] = {}  # per section run: the figures (``--json``)
P = fs.policies

# ------------------------------------------------------------------------------ workload


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CFG[0].vocab_size, (BATCH, CFG[0].seq_len + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def new_model() -> GPT:
    return GPT(CFG[0], seed=0)


# Torch-native selective checkpointing, "save matmuls": the same ops as fs.policies.dots_saveable.
_DOTS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.mv.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}
_SAC_CACHE: list[Any] | None = None  # set while measuring: outputs torch's SAC caches


def sac_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    save = op in _DOTS or str(op).startswith("aten._scaled_dot_product")
    if save and _SAC_CACHE is not None and not ctx.is_recompute:
        _SAC_CACHE.append(ctx.op_output)
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def torch_ckpt(fn: Callable[..., Any], *args: Any, selective: bool = False) -> Any:
    ctx = functools.partial(create_selective_checkpoint_contexts, sac_policy) if selective else None
    kw = {"context_fn": ctx} if selective else {}
    return checkpoint(fn, *args, use_reentrant=False, **kw)


def module_logits(model: GPT, x: torch.Tensor, block_call: Callable[..., Any]) -> torch.Tensor:
    """GPT.forward with each block run through ``block_call(block, h)``."""
    h = model.drop(model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1])))
    for block in model.blocks:
        h = block_call(block, h)
    return model.head(model.ln_f(h))


def torch_wrap(selective: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """torch's checkpoint as a ``wrap`` transform of fs.functional (decomposition rows)."""
    return lambda f: functools.wraps(f)(lambda p, x: torch_ckpt(f, p, x, selective=selective))


def _storage_mib(tensors: list[Any]) -> float:
    seen: dict[int, int] = {}
    for t in optree.tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values()) / MIB


# ------------------------------------------------------------------------------ runners


class Eager:
    """nn.Module + torch AdamW(fused). ``block``: None, "ckpt" or "sac"; ``autocast``: bf16;
    ``adam="foreach"``: AdamW(foreach=True) (extra rows)."""

    precision = "fp32"

    def __init__(
        self,
        data: list,
        block: str | None = None,
        autocast: bool = False,
        step_probe: bool = False,
        adam: str = "fused",
    ):
        self.model = new_model()
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(
            self.params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, **{adam: True}
        )
        self.block, self.autocast, self.data = block, autocast, data
        self.precision = "bf16" if autocast else "fp32"
        self.step_probe = step_probe
        self.i, self.record = 0, []

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            call = lambda b, h: b(h)  # noqa: E731
        else:
            call = functools.partial(torch_ckpt, selective=self.block == "sac")
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)
        with ctx:
            return lm_loss(module_logits(self.model, x, call), y)

    def step(self) -> None:
        x, y = self.data[self.i]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        gn = torch.nn.utils.get_total_norm([p.grad for p in self.params], foreach=True)
        self.opt.step()
        self.record.append((float(loss.detach()), float(gn)))

    def memory(self) -> dict[str, Any]:
        global _SAC_CACHE
        x, y = self.data[0]
        _SAC_CACHE = []
        try:
            saved, _ = saved_tensors_mib(lambda: self.loss(x, y))
            saved += _storage_mib(_SAC_CACHE)  # selective-checkpoint caches bypass the hooks
        finally:
            _SAC_CACHE = None
        self.opt.zero_grad(set_to_none=True)
        peak = peak_live_mib(lambda: self.loss(x, y).backward())
        out = {"saved MiB": saved, "offloaded MiB": 0.0, "peak live MiB": peak}
        if self.step_probe:
            out["peak saved MiB (step)"] = saved_tensors_mib(lambda: self.loss(x, y).backward())[1]
        self.opt.zero_grad(set_to_none=True)
        return out

    def final_params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def live(self) -> list[torch.Tensor]:
        """What the loop holds between steps: params, AdamW state (.grad set to None, as
        the next step's zero_grad would)."""
        self.opt.zero_grad(set_to_none=True)
        return [*self.params, *(v for s in self.opt.state.values() for v in s.values())]


class Functional:
    """fs.functional + fs.train_step(adamw), donate=True.

    ``wrap``: per-block transform; ``outer``: transform of the whole loss (fs.amp);
    ``grad``: "plain", "accumulate" (fs.accumulate, k=4) or "hand" (hand-written k=4 loop).
    """

    def __init__(
        self,
        data: list,
        wrap: Callable[..., Any] | None = None,
        outer: Callable[..., Any] | None = None,
        grad: str = "plain",
        precision: str = "fp32",
        step_probe: bool = False,
    ):
        self.apply, params = fs.functional(
            new_model(), wrap=None if wrap is None else {Block: wrap}
        )
        loss_fn = self.raw_loss if outer is None else outer(self.raw_loss)
        self.loss_fn, self.precision, self.data = loss_fn, precision, data
        self.step_probe = step_probe
        vg = fs.value_and_grad(loss_fn)
        self.grad_fn = {
            "plain": vg,
            "accumulate": fs.accumulate(vg, steps=K),
            "hand": functools.partial(hand_accumulate, vg),
        }[grad]
        self.train = fs.train_step(self.grad_fn, optim.adamw(LR, B1, B2, EPS, weight_decay=WD))
        self.params, self.opt_state = self.train.init(params)
        self.i, self.record = 0, []

    def raw_loss(self, p: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return lm_loss(self.apply(p, x), y)

    def step(self) -> None:
        batch = self.data[self.i]
        self.i += 1
        self.params, self.opt_state, m = self.train.step(
            self.params, self.opt_state, batch, donate=True
        )
        self.record.append((float(m["loss"]), float(m["grad_norm"])))

    def memory(self) -> dict[str, Any]:
        global _SAC_CACHE
        batch = self.data[0]
        _SAC_CACHE = []  # torch's SAC as a wrap transform (decomposition rows) caches outside
        try:
            with _offload._recording() as log:
                report = fs.saved_activations(self.loss_fn, self.params, batch)
            sac = _storage_mib(_SAC_CACHE)
        finally:
            _SAC_CACHE = None
        out = {
            "saved MiB": report.saved_bytes / MIB + sac,
            "offloaded MiB": (report.offloaded_bytes + sum(n for _, n, _ in log)) / MIB,
            "peak live MiB": peak_live_mib(lambda: self.grad_fn(self.params, batch)),
        }
        if self.step_probe:  # peak held by autograd at once over a whole grad step
            out["peak saved MiB (step)"] = saved_tensors_mib(
                lambda: self.grad_fn(self.params, batch)
            )[1]
        return out

    def final_params(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def live(self) -> list[torch.Tensor]:
        """What the loop holds between steps: params and optimizer state."""
        return optree.tree_leaves((self.params, self.opt_state))


def hand_accumulate(vg: Callable[..., Any], params: dict, batch: tuple) -> tuple[Any, dict]:
    """The loop fs.accumulate replaces: k microbatches, grads summed into one buffer."""
    xs, ys = batch[0].chunk(K), batch[1].chunk(K)
    total, buf = None, None
    for x, y in zip(xs, ys):
        loss, g = vg(params, (x, y))
        if buf is None:
            total, buf = loss, g
        else:
            total = total + loss
            torch._foreach_add_(list(buf.values()), list(g.values()))
        del g
    torch._foreach_mul_(list(buf.values()), 1.0 / K)
    return total / K, buf


# ------------------------------------------------------------------------------ sections


def section_variants(section: str, data: list, tmp: str) -> list[tuple[str, Callable[[], Any]]]:
    remat = fs.remat
    fsf = functools.partial(Functional, data)
    if section == "a":
        return [
            ("eager nn.Module", lambda: Eager(data)),
            ("fs none", fsf),
            ("fs remat(dots_saveable)", lambda: fsf(wrap=remat(policy=P.dots_saveable))),
            ("fs remat(nothing_saveable)", lambda: fsf(wrap=remat(policy=P.nothing_saveable))),
            ("fs offload(to='cpu')", lambda: fsf(wrap=fs.offload(to="cpu"))),
            ("fs offload(to=dir)", lambda: fsf(wrap=fs.offload(to=tmp))),
            (
                "fs offload(remat(block), to='cpu')",
                lambda: fsf(wrap=lambda f: fs.offload(remat(f), to="cpu")),
            ),
        ]
    if section == "b":
        return [
            ("eager nn.Module", lambda: Eager(data)),
            ("torch checkpoint per block", lambda: Eager(data, block="ckpt")),
            ("fs remat(nothing_saveable)", lambda: fsf(wrap=remat(policy=P.nothing_saveable))),
            ("torch SAC save-matmuls per block", lambda: Eager(data, block="sac")),
            ("fs remat(dots_saveable)", lambda: fsf(wrap=remat(policy=P.dots_saveable))),
            ("fs none (decomposition)", fsf),
            ("fs.functional + torch checkpoint (decomp.)", lambda: fsf(wrap=torch_wrap(False))),
            ("fs.functional + torch SAC (decomp.)", lambda: fsf(wrap=torch_wrap(True))),
        ]
    if section == "c":
        return [
            ("eager nn.Module, full batch", lambda: Eager(data, step_probe=True)),
            ("fs full batch", lambda: fsf(grad="plain", step_probe=True)),
            ("fs.accumulate(steps=4)", lambda: fsf(grad="accumulate", step_probe=True)),
            ("hand-written 4-microbatch loop", lambda: fsf(grad="hand", step_probe=True)),
        ]
    if section == "d":
        amp = fs.amp(policy="bf16")
        return [
            ("eager nn.Module fp32", lambda: Eager(data)),
            ("torch.autocast bf16", lambda: Eager(data, autocast=True)),
            ("fs.amp(loss_fn) bf16", lambda: fsf(outer=amp, precision="bf16")),
            ("fs amp per block bf16", lambda: fsf(wrap=amp, precision="bf16")),
        ]
    raise ValueError(f"unknown section {section!r}; valid: a, b, c, d")


# (variant, reference, goal) per section: the goals of the brief.
GOALS = {
    "b": [
        ("fs remat(nothing_saveable)", "torch checkpoint per block", 1.02),
        ("fs remat(dots_saveable)", "torch SAC save-matmuls per block", 1.02),
        # the same path: fs.functional with torch's checkpoint as the wrap transform
        ("fs remat(nothing_saveable)", "fs.functional + torch checkpoint (decomp.)", 1.02),
        ("fs remat(dots_saveable)", "fs.functional + torch SAC (decomp.)", 1.02),
        ("fs.functional + torch checkpoint (decomp.)", "torch checkpoint per block", None),
        ("fs none (decomposition)", "eager nn.Module", None),
    ],
    "c": [
        ("fs.accumulate(steps=4)", "hand-written 4-microbatch loop", 1.03),
        ("fs.accumulate(steps=4)", "fs full batch", None),
    ],
    "d": [
        ("fs.amp(loss_fn) bf16", "torch.autocast bf16", 1.05),
        ("fs amp per block bf16", "torch.autocast bf16", None),
        ("fs.amp(loss_fn) bf16", "eager nn.Module fp32", None),
    ],
}
MEMORY_KEYS = ["saved MiB", "offloaded MiB", "peak saved MiB (step)", "peak live MiB"]


def _variant(runners: dict[str, Any], name: str, build: Callable[[], Any]) -> Variant:
    """A ``common.Variant`` whose runner (built at setup) is kept in ``runners[name]``."""

    def setup() -> Callable[[], None]:
        runners[name] = build()
        return runners[name].step

    return Variant(name, setup, lambda: runners[name].memory())


def run_section(section: str, args: argparse.Namespace) -> tuple[str, bool]:
    """Runs one section; returns its markdown and whether every variant did the same work.

    Rounds (one step of each variant) whose contention exceeds 10% are dropped; if fewer
    than ``--steps`` quiet rounds came in ``--max-rounds``, the section is rerun (up to
    ``--retries`` times) and the run with the most quiet rounds is reported.
    """
    best = None
    tries: list[str] = []
    for _ in range(1 + args.retries):
        with tempfile.TemporaryDirectory() as tmp:
            data = batches(args.warmup + args.max_rounds)
            runners: dict[str, Any] = {}
            specs = section_variants(section, data, tmp)
            results, contention, per_round = run_side_by_side_quiet(
                [_variant(runners, n, b) for n, b in specs],
                warmup=args.warmup,
                steps=args.steps,
                max_rounds=args.max_rounds,
                threshold=QUIET,
                min_quiet=MIN_QUIET,
            )
            records = {n: (r.record, r.precision, r.final_params()) for n, r in runners.items()}
            runners.clear()
        n_quiet = sum(c <= QUIET for c in per_round)
        tries.append(f"{contention:.1%} overall, {n_quiet}/{len(per_round)} rounds quiet")
        print(f"section {section}: contention {tries[-1]}", flush=True)
        if best is None or (n_quiet, -contention) > (best[0], -best[2]):
            best = (n_quiet, results, contention, per_round, records)
        if n_quiet >= args.steps:
            break
    n_quiet, results, contention, per_round, records = best
    checks, ok = check_trajectories(results, records)
    used = "the quiet rounds" if n_quiet >= MIN_QUIET else "**all rounds** (too few quiet ones)"
    note = (
        f"Contention (other processes' CPU share) during the timed rounds: {contention:.1%} "
        f"overall; {n_quiet} of {len(per_round)} rounds had <= {QUIET:.0%}; times are over "
        f"{used}. Per round: {', '.join(f'{c:.0%}' for c in per_round)}. Runs: "
        f"{'; '.join(tries)}."
    )
    text = render(section, results, note, checks)
    print(text, flush=True)
    FIGURES[section] = {
        "contention": contention,
        "quiet_rounds": n_quiet,
        "rows": {
            r.name: {"median_s": r.median, "spread": r.spread, **r.extra, "check": checks[r.name]}
            for r in results
        },
        "ratios": [
            {"variant": a, "reference": b, "ratio": ratio, "paired": paired, "goal": goal}
            for a, b, goal, ratio, paired in ratios(section, results)
        ],
    }
    return text, ok


def ratios(section: str, results: list) -> list[tuple[str, str, float | None, float, list]]:
    """(variant, reference, goal, ratio of medians, per-round ratios) of ``GOALS[section]``."""
    by_name = {r.name: r for r in results}
    out = []
    for a, b, goal in GOALS.get(section, []):
        ratio = by_name[a].median / by_name[b].median
        paired = [x / y for x, y in zip(by_name[a].times, by_name[b].times)]
        out.append((a, b, goal, ratio, paired))
    return out


def check_trajectories(results: list, records: dict) -> tuple[dict[str, str], bool]:
    """Max relative loss / grad-norm gap to the first variant (eager fp32), and its params
    after the run (``param_deviation``), per variant."""
    ref, _, ref_params = records[results[0].name]
    init = {k: v.detach() for k, v in new_model().named_parameters()}
    out, ok = {}, True
    for r in results:
        rec, precision, params = records[r.name]
        tl, tg, tp = TOL[precision]
        dl = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(rec, ref))
        dg = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(rec, ref))
        dp, _ = param_deviation(params, ref_params, init)
        good = dl <= tl and dg <= tg and dp <= tp and len(rec) == len(ref)
        ok &= good
        out[r.name] = f"{dl:.1e} / {dg:.1e} / {dp:.1e} {'ok' if good else 'FAIL'} ({precision})"
    return out, ok


def render(section: str, results: list, note: str, checks: dict) -> str:
    keys = [k for k in MEMORY_KEYS if any(k in r.extra for r in results)]
    base = results[0].median
    head = f"| variant | median ms/step | spread (IQR/median) | × {results[0].name} |"
    head += "".join(f" {k} |" for k in keys) + " max rel Δ loss / grad norm / params vs eager |"
    lines = [head, "|" + " --- |" * (5 + len(keys))]
    for r in results:
        row = f"| {r.name} | {r.median * 1e3:.1f} | {r.spread * 100:.1f}% | {r.median / base:.3f} |"
        for k in keys:
            v = r.extra.get(k)
            row += f" {v:.1f} |" if v is not None else " – |"
        lines.append(row + f" {checks[r.name]} |")
    lines += ["", note]
    by_name = {r.name: r for r in results}
    if section in GOALS:
        lines += [
            "",
            "| ratio | ratio of medians | median of per-round ratios [IQR] | goal | met |",
            "| --- | --- | --- | --- | --- |",
        ]
        for a, b, goal, ratio, paired in ratios(section, results):
            q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            pr = f"{statistics.median(paired):.3f} [{q[0]:.3f}, {q[2]:.3f}]"
            met = "–" if goal is None else ("yes" if ratio <= goal else "**no**")
            g = "–" if goal is None else f"≤ {goal:.2f}"
            lines.append(f"| {a} / {b} | {ratio:.3f} | {pr} | {g} | {met} |")
    if section == "c":
        full = by_name["fs full batch"].extra["peak saved MiB (step)"]
        acc = by_name["fs.accumulate(steps=4)"].extra["peak saved MiB (step)"]
        lines.append("")
        lines.append(
            f"Peak saved bytes held at once, fs.accumulate(steps=4) / full batch: "
            f"{acc:.1f} / {full:.1f} MiB = {acc / full:.3f} (1/k = {1 / K:.3f})."
        )
    return "\n".join(lines)


TITLES = {
    "a": "a. What backward keeps: saved activations, offloaded bytes, peak live memory",
    "b": "b. fs.remat vs torch.utils.checkpoint per block (step time)",
    "c": "c. fs.accumulate(steps=4) vs a hand-written microbatch loop",
    "d": "d. fs.amp bf16 vs torch.autocast bf16",
}


def write_results(sections: dict[str, str], command: str, path: str = RESULTS) -> None:
    """Replaces the sections run in ``path`` (``results/memory.md``), keeps the others."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old = open(path).read() if os.path.exists(path) else ""
    stamp = f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}, `{command}`"
    blocks = {}
    for s in "abcd":
        m = re.search(rf"<!-- section {s} -->\n(.*?)<!-- /section {s} -->", old, re.S)
        if s in sections:
            blocks[s] = f"## {TITLES[s]}\n\nRun: {stamp}\n\n{sections[s]}\n"
        elif m:
            blocks[s] = m.group(1)
    intro = (__doc__ or "").split("Run:")[0].strip()
    body = ["# Memory transforms, one process (benchmarks/bench_memory.py)", "", intro, ""]
    for s, text in blocks.items():
        body += [f"<!-- section {s} -->", text + f"<!-- /section {s} -->", ""]
    notes = re.search(r"<!-- notes -->\n.*?<!-- /notes -->\n", old, re.S)  # hand-written
    if notes:
        body.append(notes.group(0))
    with open(path, "w") as f:
        f.write("\n".join(body))


def profile(name: str, section: str, args: argparse.Namespace) -> None:
    """One step of variant ``name`` (after warm-up) under cProfile (Python functions, by own
    time) and then under torch.profiler (aten ops, by self CPU time)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = batches(args.warmup + 2)
        runner = dict(section_variants(section, data, tmp))[name]()
        for _ in range(args.warmup):
            runner.step()
        prof = cProfile.Profile()
        prof.enable()
        runner.step()
        prof.disable()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            runner.step()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
    print(f"--- cProfile, one step of {name!r} (by own time)\n{s.getvalue()}")
    table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(f"--- torch.profiler, one step of {name!r}\n{table}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="a,b,c,d", help="sections, e.g. b,c")
    parser.add_argument("--max-rounds", type=int, default=40, help="rounds to find --steps quiet")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a contended section")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default=None, help="SECTION:VARIANT: cProfile one step")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", default=RESULTS, help="the results file to update")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--preset", default="small", help="GPT preset (tiny: smoke tests)")
    args = parser.parse_args(argv)
    CFG[0] = GPTConfig.preset(args.preset)
    torch.set_num_threads(args.threads)
    if args.profile:
        section, name = args.profile.split(":", 1)
        profile(name, section, args)
        return 0
    command = "python benchmarks/bench_memory.py " + shlex.join(argv or sys.argv[1:])
    texts, ok = {}, True
    for section in [s.strip() for s in args.only.split(",") if s.strip()]:
        texts[section], passed = run_section(section, args)
        ok &= passed
    if not args.no_write:
        write_results(texts, command.strip(), args.results)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(FIGURES, f, indent=1)
    if not ok:
        print("Some variant did not do eager's work: loss / grad norm / params (FAIL above).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
