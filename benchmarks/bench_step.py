"""The functional training step vs ``nn.Module`` + ``torch.optim.AdamW(foreach=True)``.

GPT preset "small" (ANCHORS.md): batch 8 x 128 tokens, AdamW(lr 3e-3, betas (0.9, 0.95),
wd 0.1), fp32. Both variants run side by side, alternating step by step, on the same
batches; both must follow the same loss trajectory. Peak live memory of one step (fwd, bwd,
update) is measured with ``PeakLiveMemory`` counting params, optimizer state and (torch)
``.grad`` buffers alive at the start.

    python benchmarks/bench_step.py [--steps 10 --warmup 3 --threads 2]
"""

from __future__ import annotations

import argparse
import datetime
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


def make_batches(n: int, cfg: GPTConfig, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g) for _ in range(n)
    ]
    return [{"x": t[:, :-1], "y": t[:, 1:]} for t in ids]


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def torch_variant(cfg, batches, log):
    model = GPT(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, foreach=True)
    it = iter(range(10**9))

    def step():
        b = batches[next(it) % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(b["x"]), b["y"])
        loss.backward()
        opt.step()
        log.append(float(loss.detach()))

    def live():
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return [*model.parameters(), *state, *grads]

    return step, live


def fs_variant(cfg, batches, log):
    model = GPT(cfg, seed=0)
    apply, params = fs.functional(model)
    params = {k: v.clone() for k, v in params.items()}  # own them (donation writes in place)
    loss_fn = lambda p, b: loss_of(apply(p, b["x"]), b["y"])  # noqa: E731
    tx = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
    train = fs.train_step(fs.value_and_grad(loss_fn), tx)
    state = {"params": None, "opt": None}
    state["params"], state["opt"] = train.init(params)
    it = iter(range(10**9))

    def step():
        b = batches[next(it) % len(batches)]
        state["params"], state["opt"], m = train.step(state["params"], state["opt"], b, donate=True)
        log.append(float(m["loss"]))

    def live():
        return fs.tree.leaves((state["params"], state["opt"]))

    return step, live


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GPTConfig.preset(args.preset)
    batches = make_batches(args.warmup + args.steps + 2, cfg, args.batch)

    logs: dict[str, list[float]] = {"torch": [], "fsharding": []}
    built = {}

    def setup(name, make):
        def s():
            step, live = make(cfg, batches, logs[name])
            built[name] = (step, live)
            return step

        return s

    def memory(name):
        def m():
            step, live = built[name]
            return {"peak live MiB": common.peak_live_mib(step, live())}

        return m

    variants = [
        common.Variant(
            "nn.Module + AdamW(foreach)", setup("torch", torch_variant), memory("torch")
        ),
        common.Variant(
            "fs.train_step (donate)", setup("fsharding", fs_variant), memory("fsharding")
        ),
    ]
    results, contention = common.run_side_by_side(variants, warmup=args.warmup, steps=args.steps)
    a, b = logs["torch"], logs["fsharding"]
    n = min(len(a), len(b))
    worst = max(abs(x - y) / abs(x) for x, y in zip(a[:n], b[:n]))
    table = common.markdown_table(results, extra_keys=["peak live MiB"])
    cmd = "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## Functional step vs nn.Module + AdamW(foreach) — {datetime.date.today()}\n")
    print(f"Machine: {common.machine()}  \nCommand: `{cmd.strip()}`  ")
    print(f"Contention (other processes' CPU share during timed steps): {contention:.1%}  ")
    print(f"Same work: max relative loss difference over {n} steps: {worst:.2e}\n")
    print(table)
    assert worst < 1e-4, f"the variants diverged: {worst}"


if __name__ == "__main__":
    main()
