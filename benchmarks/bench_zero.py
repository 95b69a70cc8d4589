"""Data parallel side by side: fs.zero stages 0-3 vs torch DDP, FSDP2 and DeepSpeed ZeRO.

Workload: ANCHORS.md's GPT "small" (10,893,312 params), global batch 8 x 128 tokens (4 per
rank), AdamW(lr 3e-3, betas (0.9, 0.95), wd 0.1), fp32, 2 processes x 1 thread, gloo.

* **Time** (one ``fs.launch`` of 2 ranks): every variant has its own model and optimizer
  state and steps alternately with the others on the same batches, the ranks in lock step
  (a barrier before each step). Per variant: median ms/step (a step's time is the slower
  rank's), spread (IQR / median), ratio to torch DDP, a phase breakdown (ms, medians) and
  the model state per rank (params + grads + optimizer state, local shards). Contention =
  other processes' share of the CPUs during the timed steps (``/proc/stat`` busy time minus
  both ranks' own CPU time); a contended run (> 5%) is retried once.
* **DeepSpeed** cannot share a process with the others: it runs right after, in its own
  ``torchrun`` launch from a separate virtualenv (``--ds-python``, default
  ``/work/dsvenv/bin/python``; ``DS_ACCELERATOR=cpu``), alternating DeepSpeed ZeRO stages with
  a re-run of torch DDP, so its ratios to DDP are measured side by side too.
* **Correctness**: every variant follows a one-process eager reference (full batch of 8,
  torch AdamW) over all warm-up and timed steps: loss within 1e-4 relative and global grad
  norm within 1e-3 relative; asserted.
* **Memory** (``--memory``): each variant alone in its own fresh 2-rank launch; per rank
  the RSS before building the variant and the peak RSS (``VmHWM``) after ``--memory-steps``
  steps (alternating variants in one process would share one peak).
* **Profile** (``--profile``): torch.profiler self-CPU tables per variant (rank 0).

Variants (``--variants``, keys of ``zero_variants.BUILDERS``): ``ddp`` (baseline, torch
AdamW foreach), ``ddp-fused`` (torch AdamW fused: the kernel fsharding's adamw runs),
``zero0``-``zero3`` (fs.zero; stage 3 gathers at the grad_fn boundary), ``zero3-blocks``
(``gather="blocks"``, every Block wrapped in ``fs.gather``: full block params live from
forward to backward), ``zero3-blocks-reshard`` (``fs.gather(block,
reshard_after_forward=True)``: freed after forward, re-gathered in backward with prefetch,
FSDP2's default), ``zero3-blocks-sac`` (``fs.remat(fs.gather(block),
policy=dots_saveable)``: re-gathered in backward, ZeRO-3 memory), ``zero3-blocks-remat``
(full remat), ``zero3-blocks-savecompute`` (a policy saving every compute op), ``fsdp2``,
``fsdp2-nr`` (reshard_after_forward=False). At stage 3 the fs variants drop the module's
own full copy of the params after ``init`` (``model.to("meta")``: ``apply`` passes every
param explicitly), as ``fully_shard`` does. ``--ds-variants``: ``ds-ddp``, ``ds0``-``ds3``
and any fs key (run inside the DeepSpeed launch).

Run: ``python benchmarks/bench_zero.py [--steps 10 --warmup 3 --variants ddp,zero0,...
--ds-variants ds-ddp,ds3,... --memory --write]`` (about 4 minutes without ``--memory``, 9
with it, on a busy 2-core machine; ``nice -n -10`` helps against contention); ``--write``
updates ``benchmarks/results/zero.md``; ``--profile`` prints profiler tables instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]
os.environ["OMP_NUM_THREADS"] = "1"  # before torch: 1 thread here and in every rank

import torch  # noqa: E402
import zero_common as zc  # noqa: E402
import zero_variants as zv  # noqa: E402
from common import Result, machine, markdown_table  # noqa: E402

import fsharding as fs  # noqa: E402

DEFAULT = (
    "ddp,ddp-fused,zero0,fsdp2,zero3,zero3-blocks,zero3-blocks-reshard,zero3-blocks-sac,zero1,zero2"
)
DS_LABELS = {
    "ds-ddp": "torch DDP (DeepSpeed launch)",
    "ds0": "DeepSpeed ZeRO-0",
    "ds1": "DeepSpeed ZeRO-1",
    "ds2": "DeepSpeed ZeRO-2",
    "ds3": "DeepSpeed ZeRO-3",
}
CONTENDED = 0.05
MALLOC = "MALLOC_MMAP_THRESHOLD_"


def make_data(n: int) -> dict:
    from fsharding import data

    corpus = data.load(max_bytes=1_000_000)
    it = corpus.batches("train", 8, 128, generator=torch.Generator().manual_seed(0))
    bs = [next(it) for _ in range(n)]
    return {"x": torch.stack([b["x"] for b in bs]), "y": torch.stack([b["y"] for b in bs])}


def eager_reference(data: dict) -> list[tuple[float, float]]:
    """One process, the whole batch of 8: torch AdamW, (loss, grad norm) per step."""
    m = zc.model()
    opt = zc.torch_adamw(m.parameters())
    out = []
    for i in range(data["x"].shape[0]):
        opt.zero_grad(set_to_none=True)
        loss = zc.lm_loss(m(data["x"][i]), data["y"][i])
        loss.backward()
        gn = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()], foreach=True)
        opt.step()
        out.append((float(loss), float(gn)))
    return out


def check(name: str, traj: list, ref: list) -> tuple[float, float]:
    """Max relative loss / grad-norm deviation from the reference; asserts the tolerances."""
    dl = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(traj, ref))
    dg = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(traj, ref))
    ok = dl <= 1e-4 and dg <= 1e-3
    verdict = "ok" if ok else "FAIL"
    print(f"  check {name}: max rel loss dev {dl:.1e}, grad-norm dev {dg:.1e} {verdict}")
    assert ok, f"{name} does not follow eager: loss dev {dl:.2e} (1e-4), grad norm {dg:.2e} (1e-3)"
    return dl, dg


def run_fs(keys: list[str], data: dict, args) -> dict:
    """The timed launch; a contended run is repeated (``--retries``), the quietest kept."""
    best = None
    for _ in range(1 + args.retries):
        out = fs.launch(zv.rank_time, 2, keys, data, args.warmup, args.steps, timeout=1800)[0]
        print(f"  fs/torch launch: contention {out['contention']:.1%}")
        if best is None or out["contention"] < best["contention"]:
            best = out
        if out["contention"] <= CONTENDED:
            break
        print("  contended: rerunning")
    return best


def run_ds(keys: list[str], data_path: str, args, extra: list[str] = ()) -> dict:
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    with tempfile.TemporaryDirectory() as d:
        out_path = os.path.join(d, "out.json")
        cmd = [
            args.ds_python, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29500 + os.getpid() % 1000),
            os.path.join(HERE, "zero_deepspeed.py"), "--data", data_path, "--out", out_path,
            "--variants", ",".join(keys), "--warmup", str(args.warmup),
            "--steps", str(args.steps), *extra,
        ]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            sys.exit(f"DeepSpeed launch failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
        with open(out_path) as f:
            return json.load(f)


def results_of(out: dict, labels: dict) -> list[Result]:
    rs = []
    for k, ts, st, ph in zip(out["keys"], out["times"], out["state"], out["phases"]):
        extra = {"state MiB/rank": st}
        fb = ph.get("fwd+bwd", 0.0)
        extra["fwd+bwd ms"] = fb
        extra["comm ms"] = ph["comm"] if "comm" in ph else "–"
        extra["pack ms"] = ph["pack"] if "pack" in ph else "–"
        extra["opt ms"] = ph.get("opt", 0.0)
        rs.append(Result(labels[k], ts, extra))
    for r in rs:
        known = sum(v for k, v in r.extra.items() if k.endswith(" ms") and isinstance(v, float))
        r.extra["other ms"] = r.median * 1e3 - known
    return rs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=DEFAULT, help=f"of {','.join(zv.BUILDERS)}")
    ap.add_argument(
        "--ds-variants",
        default="ds-ddp,ds3,ds1,ds2,zero3-blocks,zero3-blocks-reshard",
        help="'' skips DeepSpeed",
    )
    ap.add_argument("--ds-python", default="/work/dsvenv/bin/python")
    ap.add_argument("--retries", type=int, default=1, help="reruns of a contended launch")
    ap.add_argument("--memory", action="store_true", help="also one launch per variant")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profiler tables instead of timing")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/zero.md")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the spread needs two timed steps)")
    keys = [k for k in args.variants.split(",") if k]
    if not zv.has_block_gather():
        print("fs.zero has no gather= option yet: skipping the zero3-blocks variants")
        keys = [k for k in keys if not k.startswith("zero3-blocks")]
    ds_keys = [k for k in args.ds_variants.split(",") if k]
    n = args.warmup + args.steps
    data = make_data(max(n, args.memory_steps, 5))
    labels = {k: v[0] for k, v in zv.BUILDERS.items()} | DS_LABELS
    started = datetime.datetime.now().astimezone()
    if args.profile:
        return profile(keys, data)
    torch.set_num_threads(2)  # ANCHORS: 1-process runs use 2 threads
    ref = eager_reference({k: v[:n] for k, v in data.items()})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        data_path = os.path.join(d, "data.pt")
        torch.save(data, data_path)
        print(f"timing {keys} ({args.warmup} warm-up + {args.steps} steps)")
        out = run_fs(keys, data, args)
        ds = None
        for _ in range(1 + args.retries if ds_keys else 0):  # the quietest DeepSpeed launch
            got = run_ds(ds_keys, data_path, args)
            print(f"  DeepSpeed launch: contention {got['contention']:.1%}")
            if ds is None or got["contention"] < ds["contention"]:
                ds = got
            if got["contention"] <= CONTENDED:
                break
        mem = memory(keys, ds_keys, data, data_path, args) if args.memory else {}
    print("correctness vs one-process eager (all warm-up + timed steps):")
    for k, t in zip(out["keys"], out["traj"]):
        check(labels[k], t, ref)
    for k, t in zip(ds["keys"] if ds else [], ds["traj"] if ds else []):
        check(labels[k], t, ref)
    report = render(out, ds, mem, labels, args, started)
    print(report)
    if args.write:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "zero.md"), "w") as f:
            f.write(report + "\n")


def memory(keys, ds_keys, data, data_path, args) -> dict:
    """One fresh 2-rank launch per variant. ``MALLOC_MMAP_THRESHOLD_=65536``: large blocks
    are mmapped and go back to the OS when freed, so peak RSS follows peak live memory
    rather than the allocator's fragmentation."""
    mem = {}
    os.environ[MALLOC] = "65536"  # inherited by fs.launch's children and the DS launch
    try:
        for k in keys:
            mem[k] = fs.launch(zv.rank_memory, 2, k, data, args.memory_steps, timeout=900)[0]
            print(f"  memory {k}: {_mem_line(mem[k])}")
        for k in [k for k in ds_keys if k in DS_LABELS]:  # fs rows: measured above
            extra = ["--memory-steps", str(args.memory_steps)]
            mem[k] = run_ds([k], data_path, args, extra)["memory"]
            print(f"  memory {k}: {_mem_line(mem[k])}")
    finally:
        del os.environ[MALLOC]
    return mem


def _peak_base(m: dict) -> tuple[float, float]:
    peak = max(v for k, v in m.items() if k.startswith("peak_rss"))
    base = max(v for k, v in m.items() if k.startswith("base_rss"))
    return peak, base


def _mem_line(m: dict) -> str:
    peak, base = _peak_base(m)
    return f"peak RSS {peak:.1f} MiB/rank (before the variant {base:.1f})"


def profile(keys: list[str], data: dict) -> None:
    tables = fs.launch(zv.rank_profile, 2, keys, data, 1, 2, 30, timeout=1800)[0]
    for k, t in tables.items():
        print(f"\n### {k}\n{t}")


def _mem_cols(r: Result, m: dict | None) -> None:
    if not m:
        return
    peak, base = _peak_base(m)
    r.extra["peak RSS MiB/rank (alone)"] = peak
    r.extra["peak − base RSS MiB"] = peak - base


def render(out, ds, mem, labels, args, started) -> str:
    lines = [
        "# fs.zero vs torch DDP / FSDP2 / DeepSpeed ZeRO (GPT small, 2 ranks x 1 thread)",
        "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Machine: {machine()} (1 thread per rank), gloo.",
        "",
        f"Command: `python benchmarks/bench_zero.py {' '.join(sys.argv[1:])}`",
        "",
        f"Median of {args.steps} steps after {args.warmup} warm-up, variants alternating step "
        "by step in one 2-rank launch; × is the ratio to torch DDP of the same launch. "
        f"Contention (other processes' CPU share): {out['contention']:.1%}. Phases (medians, "
        "exclusive): fwd+bwd (torch: incl. the collectives DDP/FSDP2 run inside backward), "
        "comm (fs.zero's bucketed collectives, exposed; stage 0/1's flattening `cat` included), "
        "pack (copies into and out of fs.zero's collective buckets), opt (update + "
        "apply; torch: grad norm + optimizer.step), other (the rest of the step). Peak RSS: "
        "each variant alone in a fresh launch, `MALLOC_MMAP_THRESHOLD_=65536`, "
        f"{args.memory_steps} steps. All variants follow the eager loss and grad-norm "
        "trajectory (checked).",
        "",
    ]
    rs = results_of(out, labels)
    for r, k in zip(rs, out["keys"]):
        _mem_cols(r, mem.get(k))
    keys = ["state MiB/rank", "fwd+bwd ms", "comm ms", "pack ms", "opt ms", "other ms"]
    if mem:
        keys += ["peak RSS MiB/rank (alone)", "peak − base RSS MiB"]
    lines.append(markdown_table(rs, extra_keys=keys))
    if ds:
        lines += [
            "",
            f"DeepSpeed {ds['version']}: its own torchrun launch (DeepSpeed's virtualenv), "
            "alternating with a re-run of torch DDP (and fs.zero rows marked 'DS launch'); "
            f"contention {ds['contention']:.1%}:",
            "",
        ]
        dl = {k: labels[k] if k in DS_LABELS else labels[k] + " (DS launch)" for k in ds["keys"]}
        rd = results_of(ds, dl)
        for r, k in zip(rd, ds["keys"]):
            _mem_cols(r, mem.get(k) if k in DS_LABELS else None)
        lines.append(markdown_table(rd, extra_keys=keys))
    lines += ["", *goals(out, ds, mem, labels)]
    return "\n".join(lines)


def goals(out, ds, mem, labels) -> list[str]:
    """The targets of the brief, each met or not, from this run's numbers."""
    t = {k: statistics.median(v) for k, v in zip(out["keys"], out["times"])}
    st = dict(zip(out["keys"], out["state"]))
    lines = ["## Goals", ""]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    if "zero0" in t and "ddp" in t:
        r = t["zero0"] / t["ddp"]
        lines.append(f"- fs.zero stage 0 ≤ 1.05× DDP time: {r:.3f}× — {verdict(r <= 1.05)}")
    dt = {k: statistics.median(v) for k, v in zip(ds["keys"], ds["times"])} if ds else {}
    ds3 = dt["ds3"] / dt["ds-ddp"] if "ds3" in dt and "ds-ddp" in dt else None
    for k in [k for k in out["keys"] if k.startswith("zero3")]:
        parts = []
        if "fsdp2" in t:
            rt, rs = t[k] / t["fsdp2"], st[k] / st["fsdp2"]
            parts.append(f"time {rt:.3f}× FSDP2 (≤ 1.10: {verdict(rt <= 1.10)})")
            parts.append(f"model state {rs:.2f}× (≤ 1.0: {verdict(rs <= 1.0 + 1e-9)})")
            if k in mem and "fsdp2" in mem:
                rp = _peak_base(mem[k])[0] / _peak_base(mem["fsdp2"])[0]
                parts.append(f"peak RSS {rp:.3f}× (≤ 1.0: {verdict(rp <= 1.0)})")
        if ds3 is not None and "ddp" in t:
            rf = t[k] / t["ddp"]
            parts.append(
                f"vs DeepSpeed ZeRO-3 by ratio to DDP {rf:.2f} vs {ds3:.2f} "
                f"(faster: {verdict(rf < ds3)})"
            )
        if k in dt and "ds3" in dt:
            rd = dt[k] / dt["ds3"]
            parts.append(f"same launch: {rd:.2f}× DeepSpeed ZeRO-3 (faster: {verdict(rd < 1)})")
        lines.append(f"- {labels[k]}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    main()
