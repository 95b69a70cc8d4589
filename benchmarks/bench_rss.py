"""Process memory: peak RSS with Python's cyclic GC on and off, next to peak live tensors.

Peak live tensors (``common.PeakLiveMemory``) say what a step needs; peak RSS says what the
process really took, including memory kept reachable by reference cycles until the
collector runs, caches and allocator slack. Training loops often run with the collector
off (torchtitan's default: ``gc.disable()``, then a generation-1 collection every 50
steps), where a per-step cycle is a leak.

Each variant runs alone in a fresh process (1-process variants: ``python bench_rss.py
--child``, 2 threads; 2-process variants: an ``fs.launch`` of 2 ranks x 1 thread, figures
per rank, the larger reported), once with the collector on and once with ``gc.disable()``
for the whole loop (model built and ``--steps`` steps; for fewer than 50 steps that is
torchtitan's loop). Per run: RSS before building the variant, peak RSS (``VmHWM`` of
``/proc/self/status``) after the steps; with GC on, then one more step under
``PeakLiveMemory`` (params and optimizer state at entry, no .grad on either side).
Workload: ANCHORS.md's GPT "small" (``--preset tiny`` for smoke tests), batch 8, AdamW(lr
3e-3, betas (0.9, 0.95), wd 0.1), fp32, torch baselines on ``AdamW(fused=True)``; glibc
malloc as the user gets it (``--mmap-threshold N`` sets ``MALLOC_MMAP_THRESHOLD_``, as
``bench_zero.py --memory`` does).

Variants (``--variants``): one process — ``eager`` (nn.Module + torch AdamW), ``train_step``
(``fs.train_step``, donate), ``ckpt`` (nn.Module, ``torch.utils.checkpoint`` per block),
``remat`` (``fs.functional(model, wrap={Block: fs.remat})``), ``functional-ckpt``
(``fs.functional`` with torch's checkpoint as the wrap transform: the same path as
``remat``); two processes — ``ddp``, ``zero0`` (``fs.zero`` stage 0), ``fsdp2``,
``zero3`` (stage 3, gather at the grad_fn boundary), ``zero3-blocks-reshard`` (per-block
``fs.gather(reshard_after_forward=True)``, FSDP2's semantics). Pairs compared: train_step /
eager, remat / ckpt, remat / functional-ckpt, zero0 / ddp, zero3* / fsdp2; goal: peak RSS
<= the torch baseline's, GC on and off.

    python benchmarks/bench_rss.py [--steps 13 --variants ... --write --json PATH]

``--write`` writes ``benchmarks/results/rss.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]

import torch  # noqa: E402

RESULTS = os.path.join(HERE, "results", "rss.md")
ONE = {
    "eager": "eager nn.Module + AdamW(fused)",
    "train_step": "fs.train_step (donate)",
    "ckpt": "nn.Module + torch.utils.checkpoint per block",
    "remat": "fs.functional(wrap={Block: fs.remat})",
    "functional-ckpt": "fs.functional + torch checkpoint as wrap (same path)",
}
TWO = {
    "ddp": "torch DDP, AdamW(fused)",
    "zero0": "fs.zero stage 0",
    "fsdp2": "torch FSDP2 fully_shard per block, AdamW(fused)",
    "zero3": "fs.zero stage 3 (boundary gather)",
    "zero3-blocks-reshard": "fs.zero stage 3, blocks, gather(reshard_after_forward=True)",
}
PAIRS = [
    ("train_step", "eager"),
    ("remat", "ckpt"),
    ("remat", "functional-ckpt"),
    ("zero0", "ddp"),
    ("zero3", "fsdp2"),
    ("zero3-blocks-reshard", "fsdp2"),
]
DEFAULT = ",".join([*ONE, *TWO])
# The harness's self-check (not in DEFAULT): each step leaves 16 MiB reachable only from a
# reference cycle; GC off must show it growing, GC on must not.
ONE["selfcheck-cycle"] = "self-check: 16 MiB per step held by a reference cycle"


class _CycleLeak:
    def __init__(self) -> None:
        self.record: list[tuple[float, float]] = []

    def step(self) -> None:
        # 10,000 container objects, as a real step makes: with the collector on, their count
        # triggers generation-0 collections (threshold 700) and a generation-1 one, which
        # free the previous step's cycle; then the cycle of this step
        objects = [[] for _ in range(10_000)]
        node: dict[str, Any] = {"t": torch.ones(2**22), "objects": objects}  # 16 MiB
        node["self"] = node
        self.record.append((float(node["t"][0]), 0.0))

    def live(self) -> list[torch.Tensor]:
        return []


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"bench_rss: no {key} in /proc/self/status (Linux only)")


def _runner(key: str, data: list) -> Any:
    import bench_memory as bm

    import fsharding as fs

    if key == "eager":
        return bm.Eager(data)
    if key == "ckpt":
        return bm.Eager(data, block="ckpt")
    if key == "train_step":
        return bm.Functional(data)
    if key == "remat":
        return bm.Functional(data, wrap=fs.remat)
    if key == "functional-ckpt":
        return bm.Functional(data, wrap=bm.torch_wrap(False))
    if key == "selfcheck-cycle":
        return _CycleLeak()
    raise ValueError(f"bench_rss: unknown 1-process variant {key!r}; valid: {sorted(ONE)}")


def child(key: str, gc_off: bool, steps: int, preset: str, threads: int) -> dict:
    """One 1-process variant in this (fresh) process: the figures of the module doc."""
    import bench_memory as bm
    from common import PeakLiveMemory

    from fsharding.models.gpt import GPTConfig

    torch.set_num_threads(threads)
    bm.CFG[0] = GPTConfig.preset(preset)
    data = bm.batches(steps + 1)
    gc.collect()
    base = _status_mib("VmRSS")
    if gc_off:
        gc.disable()
    try:
        runner = _runner(key, data)
        for _ in range(steps):
            runner.step()
        was_off = not gc.isenabled()
        peak = _status_mib("VmHWM")
    finally:
        gc.enable()
    out = {"base_rss": base, "peak_rss": peak, "gc_was_off": was_off}
    if not gc_off:
        gc.collect()
        probe = PeakLiveMemory(runner.live())
        with probe:
            runner.step()
            gc.collect()
        out["peak_live"] = probe.peak / 2**20
    out["losses"] = [r[0] for r in runner.record]
    return out


def run_one(key: str, gc_off: bool, args: argparse.Namespace, env: dict) -> dict:
    gc_arg = "off" if gc_off else "on"
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", key, "--gc", gc_arg,
        "--steps", str(args.steps), "--preset", args.preset, "--threads", str(args.threads),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"bench_rss: {key} (GC {'off' if gc_off else 'on'}) failed:\n"
                           f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")  # fmt: skip
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def run_two(key: str, gc_off: bool, args: argparse.Namespace, data: dict) -> dict:
    import zero_variants as zv

    import fsharding as fs

    got = fs.launch(zv.rank_memory, 2, key, data, args.steps, gc_off, not gc_off,
                    timeout=args.timeout)[0]  # fmt: skip
    ranks = sorted({k.rsplit("_r", 1)[1] for k in got})
    per_rank = {f: [got[f"{f}_r{r}"] for r in ranks] for f in ("base_rss", "peak_rss")}
    out: dict[str, Any] = {
        "base_rss": max(per_rank["base_rss"]),
        "peak_rss": max(per_rank["peak_rss"]),
        "peak_rss_per_rank": per_rank["peak_rss"],
        "gc_was_off": all(got[f"gc_was_off_r{r}"] for r in ranks),
    }
    if not gc_off:
        out["peak_live"] = max(got[f"peak_live_r{r}"] for r in ranks)
    return out


def two_data(steps: int, preset: str) -> dict:
    import bench_memory as bm

    from fsharding.models.gpt import GPTConfig

    bm.CFG[0] = GPTConfig.preset(preset)
    bs = bm.batches(steps + 1)
    return {"x": torch.stack([x for x, _ in bs]), "y": torch.stack([y for _, y in bs])}


def render(figs: dict, args: argparse.Namespace, started: datetime.datetime) -> str:
    from common import machine

    labels = {**ONE, **TWO}
    lines = [
        f"# Peak RSS with GC on and off, and peak live tensors (GPT {args.preset})",
        "",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Machine: {machine()}.",
        "",
        f"Command: `python benchmarks/bench_rss.py {' '.join(args.argv)}`",
        "",
        f"Each variant alone in a fresh process (two ranks: the larger rank's figure), "
        f"{args.steps} steps; GC off = `gc.disable()` for the whole loop; malloc: "
        + (
            f"`MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}`"
            if args.mmap_threshold
            else "glibc defaults"
        )
        + ". Peak live: one more step with GC on, params + optimizer state at entry, no "
        ".grad (DDP's gradient buckets, allocated when DDP wraps the model, not seen).",
        "",
        "| variant | processes x threads | peak RSS MiB, GC on | peak RSS MiB, GC off "
        "| RSS before the variant MiB | peak live MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, f in figs.items():
        on, off = f.get("on", {}), f.get("off", {})
        procs = "1 x 2" if k in ONE else "2 x 1"
        procs = procs if args.threads == 2 or k in TWO else f"1 x {args.threads}"

        def cell(d: dict, key: str) -> str:
            return f"{d[key]:.1f}" if key in d else "–"

        lines.append(
            f"| {labels[k]} | {procs} | {cell(on, 'peak_rss')} | {cell(off, 'peak_rss')} | "
            f"{cell(on or off, 'base_rss')} | {cell(on, 'peak_live')} |"
        )
    lines += [
        "",
        "| fsharding / torch | peak RSS GC on | peak RSS GC off | peak live | goal ≤ 1.0 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a, b in PAIRS:
        if a not in figs or b not in figs:
            continue
        cells, ok = [], True
        for mode, key in (("on", "peak_rss"), ("off", "peak_rss"), ("on", "peak_live")):
            fa, fb = figs[a].get(mode, {}), figs[b].get(mode, {})
            if key in fa and key in fb:
                r = fa[key] / fb[key]
                cells.append(f"{r:.3f}")
                ok &= key != "peak_rss" or r <= 1.0
            else:
                cells.append("–")
        verdict = "**met**" if ok else "**not met**"
        lines.append(f"| {labels[a]} / {labels[b]} | {' | '.join(cells)} | {verdict} (RSS) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--variants", default=DEFAULT, help=f"of {DEFAULT}")
    ap.add_argument("--gc", default="both", choices=["both", "on", "off"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2, help="1-process variants")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/rss.md")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.child:
        out = child(args.child, args.gc == "off", args.steps, args.preset, args.threads)
        out["pid"] = os.getpid()
        print(json.dumps(out))
        return 0
    keys = [k for k in args.variants.split(",") if k]
    unknown = [k for k in keys if k not in ONE and k not in TWO]
    if unknown:
        ap.error(f"unknown variants {unknown}; valid: {DEFAULT}")
    started = datetime.datetime.now(datetime.timezone.utc)
    modes = {"both": ("on", "off"), "on": ("on",), "off": ("off",)}[args.gc]
    os.environ["FS_BENCH_PRESET"] = args.preset  # zero_common.model() in the ranks
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    env = dict(os.environ)
    figs: dict[str, dict] = {}
    data = two_data(args.steps, args.preset) if any(k in TWO for k in keys) else None
    try:
        for k in keys:
            for mode in modes:
                if k in ONE:
                    f = run_one(k, mode == "off", args, env)
                else:
                    f = run_two(k, mode == "off", args, data)
                figs.setdefault(k, {})[mode] = f
                live = f" peak live {f['peak_live']:.1f}" if "peak_live" in f else ""
                print(f"  {k} GC {mode}: peak RSS {f['peak_rss']:.1f} MiB (before "
                      f"{f['base_rss']:.1f}){live}", flush=True)  # fmt: skip
    finally:
        if args.mmap_threshold:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    report = render(figs, args, started)
    print(report)
    if args.write:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            f.write(report + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
