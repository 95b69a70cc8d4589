"""Checkpoints side by side: fs.save / fs.load / fs.export vs DCP used directly and DeepSpeed.

State: ANCHORS.md's GPT "small" (10,893,312 params) under ``fs.zero`` stage 3 on 2 processes
x 1 thread (gloo): params and AdamW state (``mu``, ``nu``: ``DTensor`` shards, ``count``)
after one training step (``--preset tiny``: the smoke-test model). Every directory is fresh,
under ``--dir`` (default ``/tmp``: local disk, ext4 here).

Rows (``--repeats`` each, default 5; medians, spread = (max − min) / median):

* ``fs.save(path, {"params", "opt"})`` / ``fs.load(path, like)`` (a **new** tree: its
  allocation is part of the load).
* ``torch.distributed.checkpoint`` used directly on the same tensors:
  ``dcp.save(flat, checkpoint_id=...)`` of the ``{pytree path: tensor}`` dict fs.save hands
  DCP, and ``dcp.load(fresh, checkpoint_id=...)`` in place into DTensors allocated before the
  timing (DCP's stock use: the state exists and is overwritten).
* DeepSpeed (its own virtualenv, ``--ds-python``, a ``torchrun`` launch): a ZeRO-3 engine on
  the same model, batch and AdamW (``torch_adam`` fused), one step, then
  ``engine.save_checkpoint(dir)`` / ``engine.load_checkpoint(dir)``.
* Export: ``fs.export(dir, params)`` from the sharded params (2 ranks, safetensors + index)
  vs DeepSpeed's ``zero_to_fp32`` in one fresh process (how it is run: offline, from a saved
  checkpoint): ``get_fp32_state_dict_from_zero_checkpoint(dir)`` + ``safetensors``'
  ``save_file``, and ``convert_zero_checkpoint_to_fp32_state_dict(dir, out,
  safe_serialization=True)`` (its lazy, "memory-efficient" converter).

Order: fs and the DCP row alternate within each repeat (fs first on even repeats, DCP first
on odd). Time: per operation, the slower rank's wall time (a barrier before; fs.save, DCP
and fs.export fsync their files, DeepSpeed's ``torch.save`` does not: its rows also give the
time an ``fsync`` of its files takes afterwards). Loads read cold files: before each load
every file of the checkpoint is fsynced and dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (``/proc/sys/vm/drop_caches`` is not writable in this
container; ``fincore`` confirms what stays resident). Memory: per rank, the peak RSS during
the operation (``VmHWM`` reset through ``/proc/self/clear_refs`` before it) minus the RSS
just before it (``MALLOC_MMAP_THRESHOLD_=65536``: freed large blocks leave the process).

Same state (asserted, the run fails otherwise): fs.load and dcp.load give back every tensor
bit for bit; the exported safetensors equal the gathered params bit for bit; DeepSpeed's
load restores its zeroed partitions bit for bit; and DeepSpeed's exported params (its own
engine, the same step) equal fs's within 1e-3 of how far the step moved them
(``common.param_deviation``).

Run: ``python benchmarks/bench_checkpoint.py --repeats 5 --write`` (``--write``:
``benchmarks/results/checkpoint.md``; ``--json PATH``: the figures).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]
os.environ["OMP_NUM_THREADS"] = "1"  # before torch: 1 thread here and in every rank

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MIB = 2**20
MALLOC = "MALLOC_MMAP_THRESHOLD_"
TOL_PARAMS = 1e-3


# ----------------------------------------------------------------------------- measuring


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Resets this process's VmHWM to its current RSS (``/proc/self/clear_refs``: 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(fn: Callable[[], Any], collective: bool = True) -> tuple[Any, dict]:
    """Runs ``fn`` once: (its result, {"s": wall seconds, "rss0": RSS before MiB, "peak":
    peak RSS during MiB, "delta": peak − rss0}). With ``collective``: a barrier before."""
    gc.collect()
    if collective:
        dist.barrier()
    rss0 = status_mib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    s = time.perf_counter() - t0
    peak = status_mib("VmHWM")
    return out, {"s": s, "rss0": rss0, "peak": peak, "delta": peak - rss0}


def evict(directory: str) -> None:
    """fsync every file under ``directory`` and drop it from the page cache."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def resident_bytes(directory: str) -> int:
    """Bytes of ``directory``'s files in the page cache (``fincore``), -1 if unavailable."""
    files = [os.path.join(r, n) for r, _, fs_ in os.walk(directory) for n in fs_]
    if not files or shutil.which("fincore") is None:
        return -1
    res = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        return -1
    return sum(int(x) for x in res.stdout.split())


def fsync_time(directory: str) -> float:
    t0 = time.perf_counter()
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - t0


def du_mib(directory: str) -> float:
    return (
        sum(os.path.getsize(os.path.join(r, n)) for r, _, fs_ in os.walk(directory) for n in fs_)
        / MIB
    )


# ----------------------------------------------------------------------------- workload


def make_data(preset: str) -> dict:
    from fsharding import data
    from fsharding.models.gpt import GPTConfig

    seq = GPTConfig.preset(preset).seq_len
    corpus = data.load(max_bytes=1_000_000)
    it = corpus.batches("train", 8, seq, generator=torch.Generator().manual_seed(0))
    b = next(it)
    return {"x": b["x"][None], "y": b["y"][None]}  # one step of the global batch of 8


def zero3_state(data: dict) -> dict:
    """fs.zero stage 3's params + AdamW state after one step, on the 2-rank dp mesh."""
    import zero_common as zc

    import fsharding as fs
    from fsharding import optim

    model = zc.model()
    apply, params = fs.functional(model)

    def loss_fn(p: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return zc.lm_loss(apply(p, x), y)

    tx = optim.adamw(zc.LR, b1=zc.BETAS[0], b2=zc.BETAS[1], eps=zc.EPS, weight_decay=zc.WD)
    mesh = fs.Mesh(dp=dist.get_world_size())
    step = fs.zero(fs.value_and_grad(loss_fn), tx, mesh=mesh, stage=3)
    p, s = step.init(params)
    del params
    model.to("meta")
    p, s, _ = step.step(p, s, zc.rank_batch(data, 0), donate=True)
    return {"params": p, "opt": s}


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if hasattr(x, "to_local") else x


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """A zero tensor of ``x``'s layout (a DTensor with the same mesh and placements)."""
    if hasattr(x, "to_local"):
        from torch.distributed.tensor import DTensor

        local = torch.zeros_like(x.to_local())
        return DTensor.from_local(local, x.device_mesh, x.placements, shape=x.shape,
                                  stride=x.stride())  # fmt: skip
    return torch.zeros_like(x)


def same_tree(a: Any, b: Any, what: str) -> None:
    """Asserts that two trees hold the same leaves, tensors bit for bit (local shards)."""
    import fsharding as fs

    pa, pb = fs.tree.leaves_with_path(a), fs.tree.leaves_with_path(b)
    if [k for k, _ in pa] != [k for k, _ in pb]:
        raise AssertionError(f"{what}: the trees differ in structure")
    for (k, x), (_, y) in zip(pa, pb):
        if isinstance(x, torch.Tensor):
            if not torch.equal(_local(x), _local(y)):
                raise AssertionError(f"{what}: {k} differs")
        elif x != y:
            raise AssertionError(f"{what}: {k} = {y!r}, saved {x!r}")


# ----------------------------------------------------------------------------- rank side


def rank_fs(ws: str, data: dict, repeats: int) -> dict:
    """fs.save / fs.load / fs.export and dcp.save / dcp.load, alternating, on each rank."""
    import torch.distributed.checkpoint as dcp

    import fsharding as fs

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # DCP's notices about the process group / planner
    export = getattr(fs, "export", None)
    if export is None:  # engineer X's module before fs.export is exported
        from fsharding._export import export
    tree = zero3_state(data)
    flat = {k: x for k, x in fs.tree.leaves_with_path(tree) if isinstance(x, torch.Tensor)}
    params = tree["params"]
    rank = dist.get_rank()
    rec: dict[str, list[dict]] = {}
    evicted: dict[str, int] = {}

    def add(name: str, m: dict) -> None:
        rec.setdefault(name, []).append(m)

    def one_repeat(r: int) -> None:
        paths = {k: os.path.join(ws, f"{k}-{r}") for k in ("fs", "dcp", "export")}
        saves = [
            ("fs.save", lambda: fs.save(paths["fs"], tree)),
            ("dcp.save", lambda: dcp.save(flat, checkpoint_id=paths["dcp"])),
        ]
        for name, fn in saves if r % 2 == 0 else saves[::-1]:
            add(name, measure(fn)[1])
        dist.barrier()
        for k in ("fs", "dcp"):
            evict(paths[k])
        dist.barrier()
        if r == 0 and rank == 0:
            evicted.update({k: resident_bytes(paths[k]) for k in ("fs", "dcp")})
        fresh = {k: _fresh(x) for k, x in flat.items()}
        got: dict[str, Any] = {}

        def fs_load() -> None:
            got["fs"] = fs.load(paths["fs"], tree)

        def dcp_load() -> None:
            dcp.load(fresh, checkpoint_id=paths["dcp"])

        loads = [("fs.load", fs_load), ("dcp.load", dcp_load)]
        for name, fn in loads if r % 2 == 0 else loads[::-1]:
            add(name, measure(fn)[1])
        same_tree(tree, got.pop("fs"), "fs.load")
        same_tree(flat, fresh, "dcp.load")
        fresh.clear()
        add("fs.export", measure(lambda: export(paths["export"], params))[1])
        dist.barrier()

    for r in range(repeats):
        one_repeat(r)
    # the exported files hold the params bit for bit (rank 0 reads them)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in params.items()}
    if rank == 0:
        from safetensors.torch import load_file

        exp = os.path.join(ws, "export-0")
        loaded: dict[str, torch.Tensor] = {}
        for name in sorted(os.listdir(exp)):
            if name.endswith(".safetensors"):
                loaded.update(load_file(os.path.join(exp, name)))
        if set(loaded) != set(full):
            raise AssertionError(f"fs.export: names {sorted(set(loaded) ^ set(full))[:5]}")
        for k, v in full.items():
            if not torch.equal(loaded[k], v):
                raise AssertionError(f"fs.export: {k} differs from the params")
    sizes = {
        "largest_tensor": max(v.numel() * v.element_size() for v in full.values()) / MIB,
        "largest_local": max(_local(v).numel() * _local(v).element_size() for v in params.values())
        / MIB,
        "local_params": sum(_local(v).numel() * _local(v).element_size() for v in params.values())
        / MIB,
        "local_state": sum(_local(v).numel() * _local(v).element_size() for v in flat.values())
        / MIB,
        "full_params": sum(v.numel() * v.element_size() for v in full.values()) / MIB,
    }
    del full
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rec": rec, "sizes": sizes})
    out = {"per_rank": everyone, "evicted_resident": evicted}
    if rank == 0:
        out["disk"] = {k: du_mib(os.path.join(ws, f"{k}-0")) for k in ("fs", "dcp", "export")}
    return out


# ----------------------------------------------------------------------------- driver


def ds_env() -> dict:
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]),
    )


def run_ds_engine(ws: str, data_path: str, args) -> dict:
    out_path = os.path.join(ws, "ds-out.json")
    cmd = [
        args.ds_python, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(29500 + os.getpid() % 1000),
        os.path.join(HERE, "checkpoint_deepspeed.py"), "engine", "--data", data_path,
        "--dir", ws, "--out", out_path, "--repeats", str(args.repeats),
    ]  # fmt: skip
    res = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        sys.exit(f"DeepSpeed launch failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    with open(out_path) as f:
        return json.load(f)


def run_ds_export(ckpt: str, out_dir: str, how: str, args) -> dict:
    out_path = out_dir + ".json"
    cmd = [
        args.ds_python, os.path.join(HERE, "checkpoint_deepspeed.py"), "export", "--ckpt", ckpt,
        "--export-dir", out_dir, "--how", how, "--out", out_path,
    ]  # fmt: skip
    res = subprocess.run(cmd, env=ds_env(), capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        sys.exit(f"DeepSpeed export failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    with open(out_path) as f:
        return json.load(f)


def read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def stats(vals: list[float]) -> dict:
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals),
            "spread": (max(vals) - min(vals)) / med if med else 0.0, "n": len(vals)}  # fmt: skip


def combine(per_rank: list[dict]) -> dict[str, dict]:
    """Per operation: time = the slower rank's per repeat; memory deltas per rank."""
    ops = per_rank[0]["rec"].keys()
    out = {}
    for op in ops:
        reps = len(per_rank[0]["rec"][op])
        t = [max(pr["rec"][op][i]["s"] for pr in per_rank) for i in range(reps)]
        d = [statistics.median(m["delta"] for m in pr["rec"][op]) for pr in per_rank]
        peak = [max(m["peak"] for m in pr["rec"][op]) for pr in per_rank]
        out[op] = {"time": stats(t), "delta": d, "peak": peak}
    return out


def main() -> None:
    from common import machine, param_deviation

    import fsharding as fs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="small", help="GPT preset (tiny: smoke tests)")
    ap.add_argument("--dir", default="/tmp", help="where the fresh directories go")
    ap.add_argument("--ds-python", default="/work/dsvenv/bin/python", help="'' skips DeepSpeed")
    ap.add_argument("--ds-exports", default="get_fp32,convert", help="zero_to_fp32 ways to time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/checkpoint.md")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (a median of at least three)")
    os.environ["FS_BENCH_PRESET"] = args.preset  # read by zero_common.model() in the ranks
    started = datetime.datetime.now().astimezone()
    load0 = os.getloadavg()
    data = make_data(args.preset)
    ws = tempfile.mkdtemp(prefix="fsbench-ckpt-", dir=args.dir)
    os.environ[MALLOC] = "65536"
    try:
        print(f"fs.save / fs.load / fs.export vs DCP, {args.repeats} repeats, in {ws}", flush=True)
        fsr = fs.launch(rank_fs, 2, ws, data, args.repeats, timeout=1800)[0]
        ops = combine(fsr["per_rank"])
        ds = dsx = None
        if args.ds_python:
            data_path = os.path.join(ws, "data.pt")
            torch.save(data, data_path)
            print("DeepSpeed ZeRO-3 save_checkpoint / load_checkpoint", flush=True)
            ds = run_ds_engine(ws, data_path, args)
            ops.update(combine(ds["per_rank"]))
            dsx = {}
            for how in [h for h in args.ds_exports.split(",") if h]:
                for r in range(args.repeats):
                    got = run_ds_export(
                        os.path.join(ws, f"ds-{r}"), os.path.join(ws, f"dsx-{how}-{r}"), how, args
                    )
                    dsx.setdefault(how, []).append(got)
                print(f"  zero_to_fp32 ({how}): {[round(g['s'], 3) for g in dsx[how]]} s")
            # DeepSpeed's export of its own step equals fs.export's (same model, batch, AdamW)
            from fsharding.models.gpt import GPT, GPTConfig

            init = dict(GPT(GPTConfig.preset(args.preset), seed=0).named_parameters())
            init = {k: v.detach() for k, v in init.items()}
            ours = read_safetensors(os.path.join(ws, "export-0"))
            for how in dsx:
                theirs = read_safetensors(os.path.join(ws, f"dsx-{how}-0"))
                dev, leaf = param_deviation(theirs, ours, init)
                print(f"  same state: DeepSpeed ({how}) vs fs.export params dev {dev:.1e} ({leaf})")
                if dev > TOL_PARAMS:
                    raise AssertionError(
                        f"DeepSpeed's checkpoint ({how}) is not fs's state: params dev {dev:.2e}"
                    )
                for g in dsx[how]:
                    g["params_dev"] = dev
    finally:
        del os.environ[MALLOC]
        shutil.rmtree(ws, ignore_errors=True)
    load1 = os.getloadavg()
    report = render(args, started, fsr, ops, ds, dsx, load0, load1, machine())
    print(report)
    if args.write:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "checkpoint.md"), "w") as f:
            f.write(report + "\n")
    if args.json:
        exports = {how: {"time": stats([g["s"] for g in v]),
                         "delta": statistics.median(g["delta"] for g in v)}
                   for how, v in (dsx or {}).items()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"ops": ops, "sizes": fsr["per_rank"][0]["sizes"], "disk": fsr.get("disk"),
                       "evicted_resident": fsr["evicted_resident"], "ds_exports": exports,
                       "ds_version": ds.get("version") if ds else None,
                       "loadavg": [load0, load1]}, f, indent=1)  # fmt: skip


def render(args, started, fsr, ops, ds, dsx, load0, load1, mach) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    sizes = fsr["per_rank"][0]["sizes"]
    disk = fsr.get("disk", {})
    lines = [
        f"# fs.save / fs.load / fs.export vs torch.distributed.checkpoint and DeepSpeed "
        f"(GPT {args.preset}, fs.zero stage 3 state on 2 ranks x 1 thread)",
        "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Machine: {mach} (1 thread per rank), gloo. "
        f"Commit: {commit}. Load average before / after: {load0[0]:.2f} / {load1[0]:.2f}. "
        f"Directories: fresh, under {args.dir} (local disk).",
        "",
        f"Command: `python benchmarks/bench_checkpoint.py {' '.join(sys.argv[1:])}`",
        "",
        f"State per rank: {sizes['local_state']:.1f} MiB of tensors (params "
        f"{sizes['local_params']:.1f} MiB of {sizes['full_params']:.1f}, AdamW mu + nu, count). "
        f"On disk: fs.save {disk.get('fs', 0):.1f} MiB, dcp.save {disk.get('dcp', 0):.1f} MiB, "
        f"fs.export {disk.get('export', 0):.1f} MiB. Largest tensor {sizes['largest_tensor']:.2f}"
        f" MiB, its local shard {sizes['largest_local']:.2f} MiB. Loads are cold: after fsync + "
        "posix_fadvise(DONTNEED), the page cache held "
        + ", ".join(f"{k} {v / MIB:.2f} MiB" for k, v in fsr["evicted_resident"].items())
        + " of the files (fincore, -1: unknown).",
        "",
        f"Median of {args.repeats} repeats (spread = (max − min) / median); time = the slower "
        "rank's; memory = peak RSS during the operation − RSS just before it, per rank "
        "(median over repeats).",
        "",
        "| operation | median s | spread | × DCP direct | × DeepSpeed | "
        "peak RSS Δ MiB rank 0 / 1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def med(op: str) -> float | None:
        return ops[op]["time"]["median"] if op in ops else None

    pairs = {"fs.save": ("dcp.save", "ds.save"), "fs.load": ("dcp.load", "ds.load")}
    for op in ("fs.save", "dcp.save", "ds.save", "fs.load", "dcp.load", "ds.load", "fs.export"):
        if op not in ops:
            continue
        o = ops[op]
        vs_dcp = vs_ds = "–"
        if op in pairs:
            a, b = pairs[op]
            vs_dcp = f"{o['time']['median'] / med(a):.3f}" if med(a) else "–"
            vs_ds = f"{o['time']['median'] / med(b):.3f}" if med(b) else "–"
        name = {"ds.save": "DeepSpeed engine.save_checkpoint", "ds.load":
                "DeepSpeed engine.load_checkpoint"}.get(op, op)  # fmt: skip
        lines.append(
            f"| {name} | {o['time']['median']:.3f} | {o['time']['spread'] * 100:.0f}% | "
            f"{vs_dcp} | {vs_ds} | {' / '.join(f'{d:.1f}' for d in o['delta'])} |"
        )
    if dsx:
        names = {
            "get_fp32": "DeepSpeed get_fp32_state_dict_from_zero_checkpoint + safetensors "
            "save_file (1 process)",
            "convert": "DeepSpeed convert_zero_checkpoint_to_fp32_state_dict(safe_serialization"
            "=True) (1 process)",
        }
        for how, v in dsx.items():
            st = stats([g["s"] for g in v])
            d = statistics.median(g["delta"] for g in v)
            fsync = statistics.median(g["fsync_s"] for g in v)
            row = f"| {names[how]} | {st['median']:.3f} | {st['spread'] * 100:.0f}% | – | – |"
            lines.append(row + f" {d:.1f} (+ fsync afterwards {fsync:.3f} s) |")
    if ds and "fsync_s" in ds:
        fsync = statistics.median(ds["fsync_s"])
        lines += ["", f"DeepSpeed {ds.get('version')}: its save does not fsync; an fsync of its "
                  f"files right after took {fsync:.3f} s (median)."]  # fmt: skip
    lines += ["", "## Goals", ""]
    for op, (a, b) in pairs.items():
        if op in ops:
            parts = []
            for peer in (a, b):
                if peer in ops:
                    r = med(op) / med(peer)
                    parts.append(f"{r:.3f}× {peer}")
            ok = all(med(op) < med(p) for p in (a, b) if p in ops)
            if op == "fs.save" and b in ops and ds and ds.get("fsync_s"):
                synced = med(b) + statistics.median(ds["fsync_s"])
                parts.append(f"{med(op) / synced:.3f}× ds.save + an fsync of its files")
            lines.append(f"- {op} faster than DCP direct and DeepSpeed: {', '.join(parts)} — "
                         + ("**met**" if ok else "**not met**"))  # fmt: skip
    if "fs.export" in ops:
        d = max(ops["fs.export"]["delta"])
        bound = sizes["largest_tensor"] + sizes["largest_local"]
        lines.append(
            f"- fs.export peak RSS Δ ≤ largest tensor + one shard ({sizes['largest_tensor']:.2f}"
            f" + {sizes['largest_local']:.2f} = {bound:.2f} MiB): {d:.2f} MiB (larger rank) — "
            + ("**met**" if d <= bound else "**not met**")
        )
        if dsx:
            t = med("fs.export")
            for how, v in dsx.items():
                st = statistics.median(g["s"] for g in v)
                dd = statistics.median(g["delta"] for g in v)
                lines.append(f"- fs.export vs DeepSpeed {how}: {t / st:.3f}× time, peak RSS Δ "
                             f"{d:.1f} vs {dd:.1f} MiB")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    import bench_checkpoint as _self  # ranks import the functions by name (HERE on sys.path)

    _self.main()
