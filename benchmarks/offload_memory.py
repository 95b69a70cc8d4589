"""Peak anonymous RSS and step time of AdamW with its state in memory, on CPU and on disk.

Workload: ANCHORS.md's GPT "small" (10,893,312 params: 83.1 MiB of fp32 Adam state),
batch 8 x 128 tokens, AdamW(lr 3e-3, betas (0.9, 0.95), wd 0.1), one process.

* Memory: each variant runs in its own fresh process (RSS cannot be compared inside one)
  with ``MALLOC_MMAP_THRESHOLD_=65536``, so freed blocks go back to the OS and RSS follows
  live memory. A sampler thread reads ``RssAnon`` from ``/proc/self/status`` every 0.5 ms;
  the figure is the peak over ``init`` and the steps minus the RSS before ``init`` (params
  already built).
* Time: all variants in one process, stepping alternately (``benchmarks/common.py``), so
  contention hits them alike; median ms/step and the ratio to the in-memory optimizer.
* Saved: peak RssAnon of the in-memory optimizer with the same donation setting minus the
  variant's, also as a multiple of the state's size.
* Check: every variant's final params are bitwise those of the in-memory run.

Run: ``python benchmarks/offload_memory.py [--steps 10] [--warmup 3] [--rss-steps 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import optim
from fsharding.models.gpt import GPT, GPTConfig
from fsharding.transforms.offload import offload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Variant, machine, markdown_table, run_side_by_side  # noqa: E402

VARIANTS = {
    "in-memory adamw": {"to": None},
    "in-memory adamw, donate": {"to": None, "donate": True},
    "offload(adamw, to='cpu')": {"to": "cpu"},
    "offload(adamw, to=dir), 64 MiB chunks": {"to": "dir", "chunk": 64 * 2**20},
    "offload(adamw, to=dir), 4 MiB chunks": {"to": "dir", "chunk": 4 * 2**20},
    "offload(adamw, to=dir), 4 MiB, donate": {"to": "dir", "chunk": 4 * 2**20, "donate": True},
}


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def build(spec: dict, directory: str) -> tuple[fs.Step, dict]:
    apply, params = fs.functional(GPT(GPTConfig.preset("small")))

    def loss_fn(p: dict, batch: torch.Tensor) -> torch.Tensor:
        logits = apply(p, batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    tx = optim.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1)
    if spec["to"] is not None:
        to = "cpu" if spec["to"] == "cpu" else directory
        tx = offload(tx, to=to, chunk_bytes=spec.get("chunk", 64 * 2**20))
    return fs.train_step(fs.value_and_grad(loss_fn), tx), params


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (8, 129), generator=g) for _ in range(n)]


def rss_worker(name: str, directory: str, steps: int) -> dict:
    """Runs in a fresh process: peak RssAnon over init and ``steps`` steps."""
    spec = VARIANTS[name]
    step, params = build(spec, directory)
    data = batches(steps)
    peak, stop = [0], [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0005)

    base = _rss_anon()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    params, opt_state = step.init(params)
    for b in data:
        params, opt_state, _ = step.step(params, opt_state, b, donate=spec.get("donate", False))
    stop[0] = True
    sampler.join()
    peak[0] = max(peak[0], _rss_anon())
    state = 8 * sum(p.numel() for p in params.values())
    return {"peak_mib": (peak[0] - base) / 2**20, "state_mib": state / 2**20}


def measure_rss(directory: str, steps: int) -> dict[str, dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    out = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--rss-worker", name, "--dir", directory]
        res = subprocess.run(
            cmd + ["--rss-steps", str(steps)], env=env, capture_output=True, text=True
        )
        if res.returncode != 0:
            sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def variant(name: str, directory: str, finals: dict) -> Variant:
    spec = VARIANTS[name]

    def setup():
        step, params = build(spec, directory)
        params, opt_state = step.init(params)
        data, i = batches(64), [0]
        box = {"p": params, "s": opt_state}

        def one() -> None:
            b = data[i[0] % len(data)]
            i[0] += 1
            box["p"], box["s"], _ = step.step(
                box["p"], box["s"], b, donate=spec.get("donate", False)
            )
            finals[name] = box["p"]

        return one

    return Variant(name, setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rss-steps", type=int, default=3)
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker, args.dir, args.rss_steps)))
        return

    with tempfile.TemporaryDirectory() as d:
        rss = measure_rss(d, args.rss_steps)
        finals: dict[str, dict] = {}
        results, contention = run_side_by_side(
            [variant(n, d, finals) for n in VARIANTS], warmup=args.warmup, steps=args.steps
        )
        leftovers = os.listdir(d)
    ref_name = next(iter(VARIANTS))
    state = rss[ref_name]["state_mib"]
    for r in results:
        # Saved: against the in-memory optimizer with the same donation setting.
        donate = VARIANTS[r.name].get("donate", False)
        ref_peak = rss["in-memory adamw, donate" if donate else ref_name]["peak_mib"]
        peak = rss[r.name]["peak_mib"]
        r.extra["peak RssAnon MiB"] = peak
        r.extra["saved MiB"] = ref_peak - peak
        r.extra["saved / state"] = f"{(ref_peak - peak) / state:.2f}"
        same = all(torch.equal(finals[r.name][k], finals[ref_name][k]) for k in finals[ref_name])
        r.extra["params bitwise equal"] = str(same)
    print(f"{machine()}; contention {contention:.0%}")
    print(
        f"GPT small, AdamW state {state:.1f} MiB; RSS over init + {args.rss_steps} steps, "
        f"time: median of {args.steps} steps after {args.warmup} warm-up"
    )
    keys = ["peak RssAnon MiB", "saved MiB", "saved / state", "params bitwise equal"]
    print(markdown_table(results, extra_keys=keys))
    print(f"files left in the offload directory after the run: {len(leftovers)}")


if __name__ == "__main__":
    main()
