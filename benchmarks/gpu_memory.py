"""The memory transforms on a CUDA GPU: peak device memory per policy, bf16 vs fp32 speed.

Issue 3's prepared GPU check: one run, a few minutes on one CUDA GPU. Workload: GPT preset
``small`` (batch 32 x 128 by default), every transform applied per block through
``fs.functional(model, wrap={Block: t})`` with params passed explicitly.

1. **Memory per remat policy and offload target.** For no transform, ``fs.remat`` with each
   of ``fs.policies``' policies, ``fs.offload(to="cpu")`` (pinned host memory),
   ``fs.offload(to=DIR)``, ``fs.offload(fs.remat(block))`` and, as the reference,
   ``torch.utils.checkpoint`` per block on the ``nn.Module``: the device bytes still held
   after the forward pass (what autograd keeps for backward), ``torch.cuda.max_memory_allocated``
   over one forward + backward (above params and batch), what ``fs.saved_activations``
   reports as saved on the device and as offloaded (to host memory or files), and the time
   of a gradient step.
2. **bf16 vs fp32 step time** (``fs.train_step`` with AdamW, ``donate=True``): fp32,
   ``fs.amp(loss_fn, policy="bf16")``, ``fs.amp`` per block, ``fs.amp("fp16")`` with
   ``fs.DynamicLossScale``, and ``torch.autocast("cuda", torch.bfloat16)`` on the
   ``nn.Module`` + ``torch.optim.AdamW``.
3. **Correctness on the device** (each a PASS / FAIL line; exit status 1 on any FAIL): the
   grads of every memory variant equal the untransformed grads with dropout 0.1 (the same
   seed: remat must replay the masks; to 1e-5 relative, whether bitwise is reported),
   ``offload(to="cpu")`` keeps its copies in pinned host memory and frees the device
   copies, and under ``fs.amp("bf16")`` the matmuls run in bfloat16, the loss comes out in
   float32 and the grads in the params' float32, within bf16 tolerance of the fp32 grads.

Run (GPU): ``python benchmarks/gpu_memory.py [--batch 32] [--steps 20] [--out gpu.md]``;
paste the printed tables into BENCHMARKS.md with the card's name (printed first).
Smoke run on CPU (tests/test_benchmarks.py): ``python benchmarks/gpu_memory.py --device cpu
--preset tiny --batch 2 --steps 1`` -- peak memory then comes from a live-storage tracker
instead of the CUDA allocator, and the pinned-memory check is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import fsharding as fs
from fsharding import optim
from fsharding.models.gpt import GPT, Block, GPTConfig
from fsharding.transforms import offload as _offload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakLiveMemory  # noqa: E402

MIB = 2**20
LR, B1, B2, EPS, WD = 3e-3, 0.9, 0.95, 1e-8, 0.1
P = fs.policies
_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}


# ------------------------------------------------------------------------------ workload


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_batch(cfg: GPTConfig, batch: int, device: torch.device, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def memory_variants(tmp: str) -> list[tuple[str, Any]]:
    """(name, per-block transform or a string naming a torch reference)."""
    remat = fs.remat
    return [
        ("none", None),
        ("remat(everything_saveable)", remat(policy=P.everything_saveable)),
        ("remat(dots_saveable)", remat(policy=P.dots_saveable)),
        (
            "remat(dots_with_no_batch_dims_saveable)",
            remat(policy=P.dots_with_no_batch_dims_saveable),
        ),
        ("remat(nothing_saveable)", remat(policy=P.nothing_saveable)),
        ("offload(to='cpu')", fs.offload(to="cpu")),
        ("offload(to=dir)", fs.offload(to=tmp)),
        ("offload(remat(block), to='cpu')", lambda f: fs.offload(remat(f), to="cpu")),
        ("torch: nn.Module, no checkpoint", "torch-none"),
        ("torch: checkpoint per block", "torch-ckpt"),
    ]


def module_loss(model: GPT, batch: tuple, ckpt: bool) -> torch.Tensor:
    """GPT.forward on the module itself, each block through torch's checkpoint if ``ckpt``."""
    x, y = batch
    h = model.drop(model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1], device=x.device)))
    for block in model.blocks:
        h = checkpoint(block, h, use_reentrant=False) if ckpt else block(h)
    return lm_loss(model.head(model.ln_f(h)), y)


# ------------------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@contextlib.contextmanager
def peak_above_start(device: torch.device, out: dict) -> Iterator[None]:
    """``out["peak"]``: the peak device bytes above those allocated at entry."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        sync(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - start
    else:  # CPU smoke run: live storages created inside the region
        with PeakLiveMemory() as probe:
            yield
        out["peak"] = probe.peak


def held_after_forward(loss_fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Device bytes still allocated after the forward pass (what backward will use)."""
    if device.type != "cuda":
        return -1
    sync(device)
    start = allocated(device)
    loss = loss_fn()
    sync(device)
    held = allocated(device) - start - loss.untyped_storage().nbytes()
    del loss
    return held


def median_ms(step: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a: dict, b: dict) -> float:
    """max over leaves of |a - b| / max|b| (float64)."""
    worst = 0.0
    for k in b:
        x, y = a[k].double(), b[k].double()
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the matmuls run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            self.dtypes.add(out.dtype)
        return out


@contextlib.contextmanager
def pinned_probe() -> Iterator[list[bool]]:
    """Whether each host copy fs.offload(to="cpu") makes is in pinned memory."""
    seen: list[bool] = []
    init = _offload._Entry.__init__

    def spy(self: Any, storage: torch.UntypedStorage, target: str) -> None:
        init(self, storage, target)
        if self.host is not None:
            seen.append(self.host.is_pinned())

    _offload._Entry.__init__ = spy
    try:
        yield seen
    finally:
        _offload._Entry.__init__ = init


# ------------------------------------------------------------------------------ sections


class Checks:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        self.failed += not ok
        self.lines.append(f"- {'PASS' if ok else '**FAIL**'}: {what}")


def memory_section(args: argparse.Namespace, device: torch.device, checks: Checks) -> str:
    # dropout on: remat must replay the same masks (the RNG state) when it recomputes
    cfg = GPTConfig.preset(args.preset).with_(dropout=args.dropout)
    batch = make_batch(cfg, args.batch, device)
    rows, ref_grads = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, wrap in memory_variants(tmp):
            model = GPT(cfg, seed=0).to(device)
            if isinstance(wrap, str):  # torch reference on the module itself
                ckpt = wrap == "torch-ckpt"
                params = dict(model.named_parameters())

                def loss_fn(model: GPT = model, ckpt: bool = ckpt) -> torch.Tensor:
                    return module_loss(model, batch, ckpt)

                def grad_step(loss_fn: Callable = loss_fn, params: dict = params) -> dict:
                    g = torch.autograd.grad(loss_fn(), list(params.values()))
                    return dict(zip(params, g))

                report = None
            else:
                apply, params = fs.functional(model, wrap=None if wrap is None else {Block: wrap})
                params = {k: v.detach().requires_grad_(True) for k, v in params.items()}

                def raw(p: dict, b: tuple, apply: Callable = apply) -> torch.Tensor:
                    return lm_loss(apply(p, b[0]), b[1])

                def loss_fn(raw: Callable = raw, params: dict = params) -> torch.Tensor:
                    return raw(params, batch)

                grad_fn = fs.grad(raw)

                def grad_step(grad_fn: Callable = grad_fn, params: dict = params) -> dict:
                    return grad_fn(params, batch)

                with _offload._recording() as log:  # fs.offload's copies (host or files)
                    report = fs.saved_activations(raw, params, batch)
                report = (report.saved_bytes, report.offloaded_bytes + sum(n for _, n, _ in log))
            held = held_after_forward(loss_fn, device)
            peak: dict = {}
            torch.manual_seed(0)  # the same dropout masks in every variant
            with peak_above_start(device, peak):
                grads = grad_step()
            if ref_grads is None:
                ref_grads = {k: g.detach().clone() for k, g in grads.items()}
                torch.manual_seed(1)
                other = grad_step()
                differ = any(not torch.equal(other[k], ref_grads[k]) for k in ref_grads)
                checks(
                    differ or args.dropout == 0,
                    f"dropout {args.dropout} is active: grads with another seed differ",
                )
                del other
            else:
                err = rel_err(grads, ref_grads)
                bitwise = all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
                checks(
                    err <= 1e-5,
                    f"{name}: grads equal the untransformed grads, max rel "
                    f"err {err:.1e} ({'bitwise' if bitwise else 'not bitwise'})",
                )
            del grads
            ms = median_ms(grad_step, device, args.steps, args.warmup)
            rows.append((name, held, peak["peak"], report, ms))
    base = rows[0][4]
    out = [
        "| variant | held after forward MiB | peak fwd+bwd MiB | fs saved MiB | fs offloaded "
        "MiB | ms / grad step | × none |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, held, pk, report, ms in rows:
        saved = "–" if report is None else f"{report[0] / MIB:.1f}"
        off = "–" if report is None else f"{report[1] / MIB:.1f}"
        held_s = "n/a (cpu)" if held < 0 else f"{held / MIB:.1f}"
        out.append(
            f"| {name} | {held_s} | {pk / MIB:.1f} | {saved} | {off} | {ms:.2f} | {ms / base:.3f} |"
        )
    return "\n".join(out)


def pinned_section(args: argparse.Namespace, device: torch.device, checks: Checks) -> None:
    if device.type != "cuda":
        return
    cfg = GPTConfig.preset(args.preset)
    batch = make_batch(cfg, args.batch, device)
    apply, params = fs.functional(GPT(cfg, seed=0).to(device), wrap={Block: fs.offload(to="cpu")})
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    plain_apply, _ = fs.functional(GPT(cfg, seed=0).to(device))
    plain = held_after_forward(lambda: lm_loss(plain_apply(params, batch[0]), batch[1]), device)
    with pinned_probe() as pinned:
        held = held_after_forward(lambda: lm_loss(apply(params, batch[0]), batch[1]), device)
    checks(
        bool(pinned) and all(pinned),
        f"offload(to='cpu'): {sum(pinned)} of {len(pinned)} host copies in pinned memory",
    )
    checks(
        held < plain / 2,
        f"offload(to='cpu'): device memory held after forward "
        f"{held / MIB:.1f} MiB vs {plain / MIB:.1f} MiB without offload",
    )


def amp_section(args: argparse.Namespace, device: torch.device, checks: Checks) -> str:
    cfg = GPTConfig.preset(args.preset)
    batches = [make_batch(cfg, args.batch, device, seed=i) for i in range(4)]
    rows = []

    def fs_variant(name: str, outer: Any = None, wrap: Any = None, scale: Any = None) -> None:
        apply, params = fs.functional(
            GPT(cfg, seed=0).to(device), wrap=None if wrap is None else {Block: wrap}
        )

        def raw(p: dict, b: tuple) -> torch.Tensor:
            return lm_loss(apply(p, b[0]), b[1])

        loss_fn = raw if outer is None else outer(raw)
        adamw = optim.adamw(LR, B1, B2, EPS, weight_decay=WD)
        train = fs.train_step(fs.value_and_grad(loss_fn), adamw, loss_scale=scale)
        state = {"s": train.init(params), "i": 0}

        def step() -> None:
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            state["s"] = train.step(*state["s"], b, donate=True)[:2]

        rows.append((name, median_ms(step, device, args.steps, args.warmup)))
        if outer is not None:
            check_amp(name, raw, loss_fn, params, batches[0], checks)

    def torch_variant(name: str, autocast: bool) -> None:
        model = GPT(cfg, seed=0).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
        state = {"i": 0}

        def step() -> None:
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = module_loss(model, b, ckpt=False)
            loss.backward()
            opt.step()

        rows.append((name, median_ms(step, device, args.steps, args.warmup)))

    fs_variant("fs fp32")
    torch_variant("torch: nn.Module fp32 + AdamW", autocast=False)
    torch_variant("torch: autocast bf16 + AdamW", autocast=True)
    fs_variant("fs.amp(loss_fn, 'bf16')", outer=fs.amp(policy="bf16"))
    fs_variant("fs.amp per block 'bf16'", wrap=fs.amp(policy="bf16"))
    fs_variant(
        "fs.amp(loss_fn, 'fp16') + DynamicLossScale",
        outer=fs.amp(policy="fp16"),
        scale=fs.DynamicLossScale(),
    )
    base = rows[0][1]
    out = ["| variant | ms / train step | × fs fp32 |", "| --- | --- | --- |"]
    out += [f"| {n} | {ms:.2f} | {ms / base:.3f} |" for n, ms in rows]
    return "\n".join(out)


def check_amp(
    name: str, raw: Callable, amp_fn: Callable, params: dict, batch: tuple, checks: Checks
) -> None:
    """bf16/fp16 inside, float32 loss and grads, within low-precision tolerance of fp32."""
    params = {k: v.detach().clone() for k, v in params.items()}
    ref_loss, ref = fs.value_and_grad(raw)(params, batch)
    with MatmulDtypes() as seen:
        loss, grads = fs.value_and_grad(amp_fn)(params, batch)
    low = {torch.bfloat16, torch.float16}
    checks(
        bool(seen.dtypes) and seen.dtypes <= low,
        f"{name}: matmuls ran in {sorted(map(str, seen.dtypes))}",
    )
    checks(
        loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values()),
        f"{name}: loss {loss.dtype}, grads {sorted({str(g.dtype) for g in grads.values()})}",
    )
    err = rel_err(grads, ref)
    checks(
        err < 0.1 and abs(float(loss) - float(ref_loss)) < 0.05 * abs(float(ref_loss)),
        f"{name}: loss {float(loss):.4f} vs fp32 {float(ref_loss):.4f}, grads max rel err "
        f"{err:.1e} (tolerance 1e-1)",
    )


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1, help="in the memory section")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_memory.py: no CUDA device here; use --device cpu for a smoke run.")
        return 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    cfg = GPTConfig.preset(args.preset)
    checks = Checks()
    head = (
        f"# gpu_memory.py — {card}\n\n{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}"
        f", GPT preset {args.preset!r} ({sum(p.numel() for p in GPT(cfg).parameters()):,} "
        f"params), batch {args.batch} x {cfg.seq_len}, medians of {args.steps} steps after "
        f"{args.warmup} warm-up. Command: `python benchmarks/gpu_memory.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    mem = memory_section(args, device, checks)
    pinned_section(args, device, checks)
    amp = amp_section(args, device, checks)
    report = (
        f"{head}\n\n## Memory per transform (per block)\n\n{mem}\n\n## bf16 vs fp32 step time"
        f"\n\n{amp}\n\n## Checks on the device\n\n" + "\n".join(checks.lines) + "\n"
    )
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
