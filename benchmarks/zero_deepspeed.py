"""DeepSpeed ZeRO on the GPT "small" workload of ``bench_zero.py`` (one rank of a torchrun).

Started by ``bench_zero.py`` with a DeepSpeed virtualenv's Python (``DS_ACCELERATOR=cpu``,
gloo, 1 thread per rank); DeepSpeed is never a dependency of fsharding. Same model,
batches and AdamW as the other variants: DeepSpeed's ``torch_adam`` path builds
``torch.optim.AdamW`` over its (flat) fp32 partitions, ``fused=True`` like the torch
baselines (``--adam foreach``: the configuration of the runs before 2026-12-06); no
clipping. Needs DeepSpeed, which is not a dependency of fsharding: a separate virtualenv
(``python -m venv /work/dsvenv && /work/dsvenv/bin/pip install deepspeed``, plus torch,
optree and cloudpickle), ``bench_zero.py --ds-python /work/dsvenv/bin/python``. A re-run of
torch DDP alternates with the DeepSpeed engines, so ratios to DDP are side by side; fs.zero
variants (``zero_variants.BUILDERS`` keys) may join the same launch for a direct comparison.

Model state per rank is counted by role from DeepSpeed's optimizer (params held by the
rank, fp32 master partitions when distinct from the params, gradient partitions and Adam
moments; each storage once); reserved-but-unused communication buckets are not counted
(they show, if touched, in peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import zero_common as zc
import zero_variants as zv


def ds_config(stage: int, adam: str = "fused") -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": zc.LR,
                "betas": list(zc.BETAS),
                "eps": zc.EPS,
                "weight_decay": zc.WD,
                "torch_adam": True,
                adam: True,  # "fused" or "foreach": passed on to torch.optim.AdamW
            },
        },
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _grad_norm(engine: Any, stage: int) -> float:
    gn = engine.get_global_grad_norm()
    if gn is None:
        raise RuntimeError(f"DeepSpeed ZeRO-{stage}: no global grad norm after step")
    return float(gn)


def ds_state_mib(engine: Any, stage: int) -> float:
    """Params + fp32 master + grads + Adam moments held by this rank (storages once)."""
    opt = engine.optimizer
    ts: list[torch.Tensor] = []
    for p in engine.module.parameters():
        ts.append(p.data)  # ZeRO-3: empty, or whole for params under the persistence threshold
        if stage == 3:
            ts.append(p.ds_tensor)  # the rank's partition
        if p.grad is not None:
            ts.append(p.grad)
    if stage == 0:
        ts += [p.data for p in engine.module.parameters()]  # grads: full size (nominal)
        grads = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        inner = opt
    else:
        inner = opt.optimizer
        grads = 0
        if stage in (1, 2):
            ts += list(opt.bit16_groups_flat) + list(opt.single_partition_of_fp32_groups)
            # fp32 gradient partitions, attached to the master partitions at step time
            grads = sum(p.numel() * p.element_size() for p in opt.single_partition_of_fp32_groups)
        else:
            ts += list(opt.fp16_partitioned_groups_flat) + list(opt.fp32_partitioned_groups_flat)
            flat = getattr(opt, "grad_partitions_flat_buffer", None)
            if flat is not None:
                ts.append(flat)
            grads = sum(p.numel() * p.element_size() for p in opt.fp32_partitioned_groups_flat)
    for st in inner.state.values():
        ts += [v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return zc.storage_mib(ts) + grads / zc.MIB


_LINEAR = F.linear  # torch's own, before any DeepSpeed engine exists


def deepspeed_stepper(data: dict, stage: int, adam: str = "fused") -> zc.Stepper:
    """One DeepSpeed engine. ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide
    with its ``LinearFunctionForZeroStage3`` ("persists unless manually reset"): that would
    also run under the other variants of this process (and broke a selective-checkpoint
    fs.zero variant's grads here), so it is in force only during this engine's steps."""
    import deepspeed

    m = zc.model()
    engine, *_ = deepspeed.initialize(
        model=m, model_parameters=m.parameters(), config=ds_config(stage, adam)
    )
    own_linear, F.linear = F.linear, _LINEAR
    ph = zc.Phases()

    def step(i: int) -> tuple[float, float]:
        F.linear = own_linear
        try:
            return _step(i)
        finally:
            F.linear = _LINEAR

    def _step(i: int) -> tuple[float, float]:
        x, y = zc.rank_batch(data, i)
        t0 = time.perf_counter()
        loss = zc.lm_loss(engine(x), y)
        engine.backward(loss)
        t1 = time.perf_counter()
        gn = None
        if stage == 0:  # grads are all-reduced in backward; step() clears them
            gn = torch.nn.utils.get_total_norm(
                [p.grad for p in engine.module.parameters()], foreach=True
            )
        engine.step()
        ph.add("fwd+bwd", t1 - t0)
        ph.add("opt", time.perf_counter() - t1)
        return float(loss.detach()), float(gn) if gn is not None else _grad_norm(engine, stage)

    return zc.Stepper(step, lambda: ds_state_mib(engine, stage), ph)


ADAM = ["fused"]  # set from --adam in main()
BUILDERS = {
    "ds-ddp": zc.ddp,
    **{k: b for k, (_, b) in zv.BUILDERS.items()},  # fs.zero next to DeepSpeed, if asked
    "ds0": lambda d: deepspeed_stepper(d, 0, ADAM[0]),
    "ds1": lambda d: deepspeed_stepper(d, 1, ADAM[0]),
    "ds2": lambda d: deepspeed_stepper(d, 2, ADAM[0]),
    "ds3": lambda d: deepspeed_stepper(d, 3, ADAM[0]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--memory-steps", type=int, default=0, help="one variant alone: memory")
    ap.add_argument("--adam", default="fused", choices=["fused", "foreach"])
    args = ap.parse_args()
    ADAM[0] = args.adam
    zc.set_threads()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    data = torch.load(args.data)
    keys = args.variants.split(",")
    if args.memory_steps:
        (key,) = keys
        out: dict[str, Any] = {
            "memory": zc.memory_run(lambda: BUILDERS[key](data), args.memory_steps)
        }
    else:
        steppers = [BUILDERS[k](data) for k in keys]
        times, traj, contention = zc.run_alternating(steppers, warmup=args.warmup, steps=args.steps)
        out = {
            "keys": keys,
            "times": times,
            "traj": traj,
            "contention": contention,
            "state": [s.state_mib() for s in steppers],
            "phases": [zc.phase_medians(s.phases) for s in steppers],
        }
    out["version"] = deepspeed.__version__
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
