"""The functional training step vs ``nn.Module`` + ``torch.optim.AdamW(fused=True)``.

GPT preset "small" (ANCHORS.md): batch 8 x 128 tokens, AdamW(lr 3e-3, betas (0.9, 0.95),
wd 0.1), fp32. fsharding: ``fs.train_step(fs.value_and_grad(loss_fn), optim.adamw(...))``
with ``donate=True``; its update is the ``torch._fused_adam_`` kernel, so the baseline is
torch's AdamW with ``fused=True`` (the same kernel); ``AdamW(foreach=True)`` runs as an
extra row (``--no-foreach`` drops it). Every variant computes the global grad norm each
step (fsharding's metrics always hold it; torch: ``get_total_norm``). All run side by side,
alternating step by step, on the same batches.

Same work: the loss and grad-norm trajectories (every step, warm-up included) within 1e-4 /
1e-3 relative of the fused baseline's, and the params after the run within 1e-3 of it
relative to how far the run moved them (``common.param_deviation``: ``||p - p_torch|| /
||p_torch - p_init||`` over all leaves; float reordering gives ~1e-5, 1% more lr ~1e-2).

Peak live memory of one step (fwd, bwd, update; ``common.PeakLiveMemory``), measured the
same way on both sides: at entry the params and optimizer state, and no gradient (torch's
``.grad`` are set to None first: the loop's ``zero_grad(set_to_none=True)`` would free them
at the start of the step anyway; fsharding keeps none between steps).

    python benchmarks/bench_step.py [--steps 10 --warmup 3 --threads 2 --write]

``--write`` writes ``benchmarks/results/step.md``; ``--json PATH`` the figures as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import fsharding as fs  # noqa: E402
from fsharding import optim  # noqa: E402
from fsharding.models import GPT, GPTConfig  # noqa: E402

LR, BETAS, WD = 3e-3, (0.9, 0.95), 0.1
TOL_LOSS, TOL_GN, TOL_PARAMS = 1e-4, 1e-3, 1e-3
RESULTS = Path(__file__).parent / "results" / "step.md"
BASE = "nn.Module + AdamW(fused)"
FS = "fs.train_step (donate)"
FOREACH = "nn.Module + AdamW(foreach) [extra row]"


def make_batches(n: int, cfg: GPTConfig, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g) for _ in range(n)
    ]
    return [{"x": t[:, :-1], "y": t[:, 1:]} for t in ids]


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


class TorchRun:
    """nn.Module + torch AdamW (``impl``: "fused" or "foreach"), grad norm every step."""

    def __init__(self, cfg: GPTConfig, batches: list[dict], impl: str) -> None:
        self.model = GPT(cfg, seed=0)
        self.params = list(self.model.parameters())
        kw = {"fused": True} if impl == "fused" else {"foreach": True}
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, weight_decay=WD, **kw)
        self.batches, self.i, self.log = batches, 0, []

    def step(self) -> None:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of(self.model(b["x"]), b["y"])
        loss.backward()
        gn = torch.nn.utils.get_total_norm([p.grad for p in self.params], foreach=True)
        self.opt.step()
        self.log.append((float(loss.detach()), float(gn)))

    def live(self) -> list[torch.Tensor]:
        """Params and optimizer state; the ``.grad`` are dropped first (see the header)."""
        self.opt.zero_grad(set_to_none=True)
        state = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return [*self.params, *state]

    def final_params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}


class FsRun:
    """fs.functional + fs.train_step(optim.adamw), donate=True."""

    def __init__(self, cfg: GPTConfig, batches: list[dict]) -> None:
        model = GPT(cfg, seed=0)
        apply, params = fs.functional(model)
        params = {k: v.clone() for k, v in params.items()}  # own them (donation writes in place)
        loss_fn = lambda p, b: loss_of(apply(p, b["x"]), b["y"])  # noqa: E731
        tx = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
        self.train = fs.train_step(fs.value_and_grad(loss_fn), tx)
        self.params, self.opt = self.train.init(params)
        self.batches, self.i, self.log = batches, 0, []

    def step(self) -> None:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.params, self.opt, m = self.train.step(self.params, self.opt, b, donate=True)
        self.log.append((float(m["loss"]), float(m["grad_norm"])))

    def live(self) -> list[torch.Tensor]:
        return fs.tree.leaves((self.params, self.opt))

    def final_params(self) -> dict[str, torch.Tensor]:
        return dict(self.params)


def _variant(name: str, build, runs: dict) -> common.Variant:
    def setup():
        runs[name] = build()
        return runs[name].step

    def memory():
        r = runs[name]
        return {"peak live MiB": common.peak_live_mib(r.step, r.live)}

    return common.Variant(name, setup, memory)


def _deviation(log: list, ref: list) -> tuple[float, float]:
    n = min(len(log), len(ref))
    dl = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(log[:n], ref[:n]))
    dg = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(log[:n], ref[:n]))
    return dl, dg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-foreach", action="store_true", help="drop the AdamW(foreach) row")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.name} in results/")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GPTConfig.preset(args.preset)
    batches = make_batches(args.warmup + args.steps + 2, cfg, args.batch)

    runs: dict = {}
    variants = [
        _variant(BASE, lambda: TorchRun(cfg, batches, "fused"), runs),
        _variant(FS, lambda: FsRun(cfg, batches), runs),
    ]
    if not args.no_foreach:
        variants.append(_variant(FOREACH, lambda: TorchRun(cfg, batches, "foreach"), runs))
    results, contention = common.run_side_by_side(variants, warmup=args.warmup, steps=args.steps)
    ref = runs[BASE]
    init = {k: v.detach() for k, v in GPT(cfg, seed=0).named_parameters()}
    checks, ok = {}, True
    for name, r in runs.items():  # (the memory probe ran one more step on every variant)
        dl, dg = _deviation(r.log, ref.log)
        dp, leaf = common.param_deviation(r.final_params(), ref.final_params(), init)
        good = dl <= TOL_LOSS and dg <= TOL_GN and dp <= TOL_PARAMS and len(r.log) == len(ref.log)
        ok &= good
        checks[name] = {"loss": dl, "grad_norm": dg, "params": dp, "worst_leaf": leaf, "ok": good}
    for r in results:
        c = checks[r.name]
        r.extra["same work vs fused: loss / grad norm / params"] = (
            f"{c['loss']:.1e} / {c['grad_norm']:.1e} / {c['params']:.1e} "
            + ("ok" if c["ok"] else "**FAIL**")
        )
    table = common.markdown_table(
        results, extra_keys=["peak live MiB", "same work vs fused: loss / grad norm / params"]
    )
    cmd = "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc)
    report = "\n".join(
        [
            f"## Functional step vs nn.Module + AdamW(fused) — {now:%Y-%m-%d %H:%M} UTC",
            "",
            f"Machine: {common.machine()}  ",
            f"Command: `{cmd.strip()}`  ",
            f"Contention (other processes' CPU share during timed steps): {contention:.1%}  ",
            f"Median of {args.steps} steps after {args.warmup} warm-up, variants alternating. "
            f"Same work: max relative deviation from the fused baseline over "
            f"{len(ref.log)} steps (tolerances {TOL_LOSS:g} / {TOL_GN:g} / {TOL_PARAMS:g}; "
            "params after the run: ||Δp|| / ||p_fused - p_init||). Peak live: one step, params "
            "+ optimizer state at entry, no .grad on either side.",
            "",
            table,
            "",
        ]
    )
    print(report)
    if args.write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text("# Functional step (benchmarks/bench_step.py)\n\n" + report)
    if args.json:
        out = {
            "contention": contention,
            "rows": {
                r.name: {"median_s": r.median, "spread": r.spread, **r.extra} for r in results
            },
            "checks": checks,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not ok:
        print("Some variant did not do the same work as the fused baseline (FAIL above).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
