"""Data parallel side by side: fs.zero stages 0-3 vs torch DDP, FSDP2 and DeepSpeed ZeRO.

Workload: ANCHORS.md's GPT "small" (10,893,312 params), global batch 8 x 128 tokens (4 per
rank), AdamW(lr 3e-3, betas (0.9, 0.95), wd 0.1), fp32, 2 processes x 1 thread, gloo
(``--preset tiny``: the smoke-test model). Every torch baseline (DDP, FSDP2) runs
``torch.optim.AdamW(fused=True)``, the kernel fsharding's adamw runs (``torch._fused_adam_``);
the ``*-foreach`` variants (ANCHORS' older baseline) are extra rows.

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
  torch AdamW fused) over all warm-up and timed steps: loss within 1e-4 relative and
  global grad norm within 1e-3 relative; and its full params after the run are within
  1e-3 of the reference's, relative to how far the reference moved them
  (``common.param_deviation``; DeepSpeed rows: not checked); asserted.
* **Memory** (``--memory``): each variant alone in its own fresh 2-rank launch, once with
  Python's cyclic GC on and once with it off (``gc.disable()`` for the whole loop, as
  torchtitan's training loop does; ``--memory-gc``); per rank the RSS before building the
  variant and the peak RSS (``VmHWM``) after ``--memory-steps`` steps (alternating
  variants in one process would share one peak); with GC on, then one more step's peak
  live tensors (``common.PeakLiveMemory``, params and optimizer state at entry, no .grad;
  DDP's gradient buckets, allocated when DDP wraps the model, are not seen by it).
* **Profile** (``--profile``): torch.profiler self-CPU tables per variant (rank 0).

Variants (``--variants``, keys of ``zero_variants.BUILDERS``): ``ddp`` (baseline, torch
AdamW fused), ``ddp-foreach`` / ``fsdp2-foreach`` (torch AdamW foreach, extra rows),
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

DeepSpeed needs its own virtualenv (``python -m venv /work/dsvenv && /work/dsvenv/bin/pip
install deepspeed`` plus this repository's requirements); ``--ds-variants ''`` skips it.
Its engines run DeepSpeed's ``torch_adam`` path, i.e. ``torch.optim.AdamW`` with
``--ds-adam fused`` (default, like-for-like) or ``foreach`` (the runs before 2026-12-06).

Run: ``python benchmarks/bench_zero.py [--steps 10 --warmup 3 --variants ddp,zero0,...
--ds-variants ds-ddp,ds3,... --memory --write]`` (about 4 minutes without ``--memory`` on
a quiet 2-core machine; ``--memory`` adds two launches per variant, ~20 s each);
``--write`` updates ``benchmarks/results/zero.md``; ``--json PATH`` writes the figures;
``--profile`` prints profiler tables instead.
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
    "ddp,ddp-foreach,zero0,fsdp2,fsdp2-foreach,zero3,zero3-blocks,zero3-blocks-reshard,"
    "zero3-blocks-sac,zero1,zero2"
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
TOL_PARAMS = 1e-3


def make_data(n: int) -> dict:
    from fsharding import data
    from fsharding.models.gpt import GPTConfig

    seq = GPTConfig.preset(zc.preset()).seq_len
    corpus = data.load(max_bytes=1_000_000)
    it = corpus.batches("train", 8, seq, generator=torch.Generator().manual_seed(0))
    bs = [next(it) for _ in range(n)]
    return {"x": torch.stack([b["x"] for b in bs]), "y": torch.stack([b["y"] for b in bs])}


def eager_reference(data: dict, ref_path: str | None = None) -> list[tuple[float, float]]:
    """One process, the whole batch of 8: torch AdamW (fused), (loss, grad norm) per step;
    ``ref_path``: saves ``{"params": final, "init": initial}`` there (the params check)."""
    m = zc.model()
    init = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = zc.torch_adamw(m.parameters())
    out = []
    for i in range(data["x"].shape[0]):
        opt.zero_grad(set_to_none=True)
        loss = zc.lm_loss(m(data["x"][i]), data["y"][i])
        loss.backward()
        gn = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()], foreach=True)
        opt.step()
        out.append((float(loss), float(gn)))
    if ref_path is not None:
        final = {k: v.detach().clone() for k, v in m.named_parameters()}
        torch.save({"params": final, "init": init}, ref_path)
    return out


def check(
    name: str, traj: list, ref: list, params: list | None = None
) -> tuple[float, float, float | None]:
    """Max relative loss / grad-norm deviation from the reference and the params deviation
    after the run (``params``: ``(deviation, worst leaf)`` or None: not checked); asserts
    the tolerances."""
    dl = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(traj, ref))
    dg = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(traj, ref))
    dp = None if params is None else params[0]
    ok = dl <= 1e-4 and dg <= 1e-3 and len(traj) == len(ref)
    ok &= dp is None or dp <= TOL_PARAMS
    verdict = "ok" if ok else "FAIL"
    ptxt = "not checked" if params is None else f"{dp:.1e} (worst leaf {params[1]})"
    print(
        f"  check {name}: max rel loss dev {dl:.1e}, grad-norm dev {dg:.1e}, params {ptxt} "
        f"{verdict}"
    )
    assert ok, (
        f"{name} does not follow eager: loss dev {dl:.2e} (1e-4), grad norm {dg:.2e} (1e-3), "
        f"params {ptxt} ({TOL_PARAMS:g}), {len(traj)} vs {len(ref)} steps"
    )
    return dl, dg, dp


def run_fs(keys: list[str], data: dict, args, ref_path: str | None = None) -> dict:
    """The timed launch; a contended run is repeated (``--retries``), the quietest kept."""
    best = None
    for _ in range(1 + args.retries):
        out = fs.launch(
            zv.rank_time, 2, keys, data, args.warmup, args.steps, ref_path, timeout=1800
        )[0]
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
            "--steps", str(args.steps), "--adam", args.ds_adam, *extra,
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
    ap.add_argument(
        "--ds-adam", default="fused", choices=["fused", "foreach"], help="DeepSpeed's AdamW"
    )
    ap.add_argument("--preset", default="small", help="GPT preset (tiny: smoke tests)")
    ap.add_argument(
        "--memory-gc", default="both", choices=["both", "on", "off"], help="GC during --memory"
    )
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--retries", type=int, default=1, help="reruns of a contended launch")
    ap.add_argument("--memory", action="store_true", help="also one launch per variant")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profiler tables instead of timing")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/zero.md")
    args = ap.parse_args()
    os.environ["FS_BENCH_PRESET"] = args.preset  # read by zc.model() here and in the ranks
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
    with tempfile.TemporaryDirectory() as d:
        data_path, ref_path = os.path.join(d, "data.pt"), os.path.join(d, "ref.pt")
        torch.set_num_threads(2)  # ANCHORS: 1-process runs use 2 threads
        ref = eager_reference({k: v[:n] for k, v in data.items()}, ref_path)
        torch.set_num_threads(1)
        torch.save(data, data_path)
        print(f"timing {keys} ({args.warmup} warm-up + {args.steps} steps)")
        out = run_fs(keys, data, args, ref_path)
        ds = None
        for _ in range(1 + args.retries if ds_keys else 0):  # the quietest DeepSpeed launch
            got = run_ds(ds_keys, data_path, args)
            print(f"  DeepSpeed launch: contention {got['contention']:.1%}")
            if ds is None or got["contention"] < ds["contention"]:
                ds = got
            if got["contention"] <= CONTENDED:
                break
        mem = memory(keys, ds_keys, data, data_path, args) if args.memory else {}
    print("correctness vs one-process eager (all warm-up + timed steps; params after the run):")
    checks = {}
    for k, t, p in zip(out["keys"], out["traj"], out["params"]):
        checks[k] = check(labels[k], t, ref, p)
    for k, t in zip(ds["keys"] if ds else [], ds["traj"] if ds else []):
        check(labels[k], t, ref)
    report = render(out, ds, mem, labels, args, started, checks)
    print(report)
    if args.write:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "zero.md"), "w") as f:
            f.write(report + "\n")
    if args.json:
        rows = {
            k: {"label": labels[k], "median_s": statistics.median(t), "state_mib": st}
            for k, t, st in zip(out["keys"], out["times"], out["state"])
        }
        for k in rows:
            dl, dg, dp = checks[k]
            rows[k].update(loss_dev=dl, grad_norm_dev=dg, params_dev=dp)
        with open(args.json, "w") as f:
            json.dump({"contention": out["contention"], "rows": rows, "memory": mem}, f, indent=1)


def memory(keys, ds_keys, data, data_path, args) -> dict:
    """Fresh 2-rank launches per variant: ``mem[key]["on"|"off"]`` (GC on / off, see
    ``zero_common.memory_run``). ``MALLOC_MMAP_THRESHOLD_=65536``: large blocks are
    mmapped and go back to the OS when freed, so peak RSS follows peak live memory rather
    than the allocator's fragmentation."""
    mem: dict[str, dict] = {}
    modes = {"both": ("on", "off"), "on": ("on",), "off": ("off",)}[args.memory_gc]
    os.environ[MALLOC] = "65536"  # inherited by fs.launch's children and the DS launch
    try:
        for k in keys:
            for mode in modes:
                got = fs.launch(
                    zv.rank_memory, 2, k, data, args.memory_steps, mode == "off", mode == "on",
                    timeout=900,
                )[0]  # fmt: skip
                mem.setdefault(k, {})[mode] = got
                print(f"  memory {k} (GC {mode}): {_mem_line(got)}")
        for k in [k for k in ds_keys if k in DS_LABELS]:  # fs rows: measured above (GC on)
            extra = ["--memory-steps", str(args.memory_steps)]
            mem[k] = {"on": run_ds([k], data_path, args, extra)["memory"]}
            print(f"  memory {k} (GC on): {_mem_line(mem[k]['on'])}")
    finally:
        del os.environ[MALLOC]
    return mem


def _peak_base(m: dict) -> tuple[float, float]:
    """(peak RSS, RSS before the variant) of one memory launch: the larger rank's."""
    peak = max(v for k, v in m.items() if k.startswith("peak_rss"))
    base = max(v for k, v in m.items() if k.startswith("base_rss"))
    return peak, base


def _peak_live(m: dict) -> float | None:
    vals = [v for k, v in m.items() if k.startswith("peak_live")]
    return max(vals) if vals else None


def _mem_line(m: dict) -> str:
    peak, base = _peak_base(m)
    return f"peak RSS {peak:.1f} MiB/rank (before the variant {base:.1f})"


def profile(keys: list[str], data: dict) -> None:
    tables = fs.launch(zv.rank_profile, 2, keys, data, 1, 2, 30, timeout=1800)[0]
    for k, t in tables.items():
        print(f"\n### {k}\n{t}")


MEM_KEYS = ["peak RSS MiB/rank, GC on", "peak RSS MiB/rank, GC off", "peak live MiB/rank"]


def _mem_cols(r: Result, m: dict | None) -> None:
    if not m:
        return
    for mode, key in (("on", MEM_KEYS[0]), ("off", MEM_KEYS[1])):
        if mode in m:
            r.extra[key] = _peak_base(m[mode])[0]
    if "on" in m:
        live = _peak_live(m["on"])
        if live is not None:
            r.extra[MEM_KEYS[2]] = live


def render(out, ds, mem, labels, args, started, checks=None) -> str:
    lines = [
        f"# fs.zero vs torch DDP / FSDP2 / DeepSpeed ZeRO (GPT {zc.preset()}, 2 ranks x 1 thread)",
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
        f"{args.memory_steps} steps, the larger rank's; GC off = `gc.disable()` for the "
        "whole loop (torchtitan's default); peak live: one more step with GC on, params + "
        "optimizer state at entry (DDP's buckets, allocated at wrap time, not seen). Torch "
        "baselines run AdamW(fused=True); `[extra row]` = AdamW(foreach). All variants "
        "follow the eager loss and grad-norm trajectory and end with its params (checked; "
        "column `params Δ`: ||p − p_eager|| / ||p_eager − p_init||).",
        "",
    ]
    rs = results_of(out, labels)
    for r, k in zip(rs, out["keys"]):
        _mem_cols(r, mem.get(k))
        if checks and k in checks and checks[k][2] is not None:
            r.extra["params Δ"] = f"{checks[k][2]:.1e}"
    keys = ["state MiB/rank", "fwd+bwd ms", "comm ms", "pack ms", "opt ms", "other ms"]
    keys += ["params Δ"] if checks else []
    if mem:
        keys += MEM_KEYS
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
            r.extra.pop("params Δ", None)
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
        line = f"- fs.zero stage 0 ≤ 1.05× DDP (fused AdamW) time: {r:.3f}× — {verdict(r <= 1.05)}"
        if "ddp-foreach" in t:
            old = t["zero0"] / t["ddp-foreach"]
            line += f" (vs DDP with AdamW(foreach), the old baseline: {old:.3f}×)"
        lines.append(line)
    for k, base in (("zero0", "ddp"), ("zero1", "ddp"), ("zero2", "ddp")):
        if k in mem and base in mem:
            parts = [
                f"GC {mode} {_peak_base(mem[k][mode])[0] / _peak_base(mem[base][mode])[0]:.3f}×"
                for mode in ("on", "off")
                if mode in mem[k] and mode in mem[base]
            ]
            ok = all(
                _peak_base(mem[k][m])[0] <= _peak_base(mem[base][m])[0]
                for m in ("on", "off")
                if m in mem[k] and m in mem[base]
            )
            lines.append(f"- {labels[k]} peak RSS ≤ DDP's: {', '.join(parts)} — {verdict(ok)}")
    dt = {k: statistics.median(v) for k, v in zip(ds["keys"], ds["times"])} if ds else {}
    ds3 = dt["ds3"] / dt["ds-ddp"] if "ds3" in dt and "ds-ddp" in dt else None
    for k in [k for k in out["keys"] if k.startswith("zero3")]:
        parts = []
        if "fsdp2" in t:
            rt, rs = t[k] / t["fsdp2"], st[k] / st["fsdp2"]
            parts.append(f"time {rt:.3f}× FSDP2 (≤ 1.10: {verdict(rt <= 1.10)})")
            parts.append(f"model state {rs:.2f}× (≤ 1.0: {verdict(rs <= 1.0 + 1e-9)})")
            for mode in ("on", "off"):
                if mode in mem.get(k, {}) and mode in mem.get("fsdp2", {}):
                    rp = _peak_base(mem[k][mode])[0] / _peak_base(mem["fsdp2"][mode])[0]
                    parts.append(f"peak RSS GC {mode} {rp:.3f}× (≤ 1.0: {verdict(rp <= 1.0)})")
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
