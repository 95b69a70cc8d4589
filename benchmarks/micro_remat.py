"""Micro-benchmark: fs.remat's per-op overhead over torch.utils.checkpoint called directly.

A region of many tiny ops (``--layers`` x (mm, add, tanh) on ``--dim`` x ``--dim`` tensors,
so the work per op is a few microseconds and any per-op Python cost shows), forward plus
backward, timed for:

* ``torch checkpoint``: ``checkpoint(f, use_reentrant=False)`` (the reference);
* ``fs.remat``: ``fs.remat(f)`` (nothing_saveable);
* ``fs.remat, no recompute mode``: the same with fsharding's recompute dispatch mode
  replaced by a no-op (what the mode costs);
* ``torch checkpoint + bare mode``: torch's checkpoint with an empty ``TorchDispatchMode``
  around recomputation (the floor for any Python dispatch mode);
* ``torch SAC dots`` / ``fs.remat(dots_saveable)``: selective checkpointing, save matmuls;
* ``..., in-place``: the region writes in place (to its own values), so state protection
  stays on (fs.remat(dots_saveable) included).

Variants alternate within each repetition in a shuffled order (contention and drift hit all
alike), garbage collection off while timing; medians over ``--reps`` of this process's CPU
time (``--clock wall`` for wall time), with the spread (IQR / median). Overhead per op =
(variant - what it is compared with) / aten ops of the region's forward (a recomputation
runs them again, plus checkpoint's own ``detach`` calls).

Run: ``python benchmarks/micro_remat.py [--layers 70] [--dim 8] [--iters 20] [--reps 15]
[--baseline path/to/old/remat.py]`` (``--baseline``: also time another version of remat.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fsharding as fs  # noqa: E402
from fsharding.transforms import remat as _remat  # noqa: E402

_DOTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class _Bare(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.n += 1
        return func(*args, **(kwargs or {}))


def _sac(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _DOTS else CheckpointPolicy.PREFER_RECOMPUTE


def make_region(layers: int, *, inplace: bool = False) -> Callable[..., torch.Tensor]:
    def f(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for _ in range(layers):
            h = x @ w + 0.5
            x = h.tanh_() if inplace else h.tanh()
        return x.sum()

    return f


@contextlib.contextmanager
def _no_recompute_mode() -> Any:
    """fs.remat with its recompute-time dispatch mode replaced by a no-op."""
    real = _remat._RegionMode

    def fake(frame: Any, *, forward: bool) -> Any:
        return real(frame, forward=True) if forward else contextlib.nullcontext()

    _remat._RegionMode = fake  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        _remat._RegionMode = real  # type: ignore[misc]


def _load(path: str) -> Any:
    """Another version of remat.py (e.g. the previous one), as a module of its own."""
    spec = importlib.util.spec_from_file_location("_remat_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


Fn = Callable[..., torch.Tensor]


def variants(layers: int, baseline: str | None) -> dict[str, tuple[Fn, str | None]]:
    """name -> (function of (w, x), the variant it is compared with)."""
    f, f_inplace = make_region(layers), make_region(layers, inplace=True)
    dots = fs.policies.dots_saveable
    remat = fs.remat(f)
    sac = lambda: create_selective_checkpoint_contexts(_sac)  # noqa: E731
    bare = lambda: (contextlib.nullcontext(), _Bare())  # noqa: E731

    def torch_ckpt(g: Fn, **kw: Any) -> Fn:
        return lambda w, x: checkpoint(g, w, x, use_reentrant=False, **kw)

    def no_mode(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with _no_recompute_mode():
            out = remat(w, x)
            out.backward()  # recomputation happens here, still patched
        return out.detach()

    out: dict[str, tuple[Fn, str | None]] = {
        "torch checkpoint": (torch_ckpt(f), None),
        "fs.remat": (remat, "torch checkpoint"),
        "fs.remat, no recompute mode": (no_mode, "torch checkpoint"),
        "torch checkpoint + bare mode": (torch_ckpt(f, context_fn=bare), "torch checkpoint"),
        "torch SAC dots": (torch_ckpt(f, context_fn=sac), None),
        "fs.remat(dots_saveable)": (fs.remat(f, policy=dots), "torch SAC dots"),
        "torch checkpoint, in-place": (torch_ckpt(f_inplace), None),
        "fs.remat, in-place": (fs.remat(f_inplace), "torch checkpoint, in-place"),
        "torch SAC dots, in-place": (torch_ckpt(f_inplace, context_fn=sac), None),
        "fs.remat(dots_saveable), in-place": (
            fs.remat(f_inplace, policy=dots),
            "torch SAC dots, in-place",
        ),
    }
    if baseline:
        base = _load(baseline)
        out["baseline fs.remat"] = (base.remat(f), "torch checkpoint")
        out["baseline fs.remat(dots_saveable)"] = (base.remat(f, policy=dots), "torch SAC dots")
    return out


def step(fn: Callable[..., torch.Tensor], w: torch.Tensor, x: torch.Tensor) -> None:
    out = fn(w, x)
    if out.requires_grad:
        out.backward()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=70)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--iters", type=int, default=20, help="steps per timed sample")
    p.add_argument("--reps", type=int, default=15, help="interleaved samples per variant")
    p.add_argument("--baseline", help="path of another remat.py to time alongside")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="cpu: this process")
    args = p.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)  # tiny ops: one thread, and less exposed to other processes
    torch.manual_seed(0)
    random.seed(0)
    w = (torch.randn(args.dim, args.dim) * 0.3).requires_grad_()
    x = torch.randn(args.dim, args.dim)
    vs = variants(args.layers, args.baseline)
    with _Count() as fwd:
        make_region(args.layers)(w, x)
    for fn, _ in vs.values():  # warm up
        for _ in range(3):
            step(fn, w, x)
    times: dict[str, list[float]] = {k: [] for k in vs}
    order = list(vs.items())
    for _ in range(args.reps):
        random.shuffle(order)  # no variant always runs first (or after the same one)
        for name, (fn, _) in order:
            gc.collect()
            gc.disable()
            t0 = clock()
            for _ in range(args.iters):
                step(fn, w, x)
            times[name].append((clock() - t0) / args.iters)
            gc.enable()
    med = {k: statistics.median(v) for k, v in times.items()}
    quartiles = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    spread = {k: (q[2] - q[0]) / med[k] for k, q in quartiles.items()}
    print(f"region: {args.layers} layers, {fwd.n} aten ops per forward, dim {args.dim}; ", end="")
    print(f"{args.iters} steps x {args.reps} interleaved reps, {args.clock} time; ", end="")
    print(f"torch {torch.__version__}")
    print(
        f"{'variant':36s} {'median µs':>10s} {'spread':>6s} {'vs':>28s} {'ratio':>6s} {'µs/op':>6s}"
    )
    for name, (_, ref) in vs.items():
        t = med[name]
        cmp = f"{ref:>28s} {t / med[ref]:6.3f} {(t - med[ref]) * 1e6 / fwd.n:6.2f}" if ref else ""
        print(f"{name:36s} {t * 1e6:10.1f} {spread[name]:6.1%} {cmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
