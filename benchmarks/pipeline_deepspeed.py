"""DeepSpeed's PipelineEngine on the workload of ``bench_pipeline.py`` (one rank of a torchrun).

Started by ``bench_pipeline.py`` with the DeepSpeed virtualenv's Python (``DS_ACCELERATOR=cpu``,
gloo, 1 thread per rank); DeepSpeed is never a dependency of fsharding. The model is a
``PipelineModule`` of ``LayerSpec`` s — the embeddings, the 6 blocks, the final LayerNorm +
head, each built from the same ``GPT(seed=0)`` (same weights, nothing tied) — partitioned
uniformly over 2 stages: layers 0-3 | 4-7, the split of the other rows. ``train_batch`` runs
DeepSpeed's 1F1B ``TrainSchedule`` over ``--microbatches`` microbatches
(``gradient_accumulation_steps``; ``train_micro_batch_size_per_gpu`` = batch / m; DeepSpeed
scales each microbatch's loss by 1/m: the mean),
then its optimizer step: ``torch_adam`` + ``fused`` = ``torch.optim.AdamW(fused=True)``,
ZeRO stage 0 (DeepSpeed's pipeline refuses ZeRO-2/3), fp32, no clipping. Variants of
``bench_pipeline.BUILDERS`` (torch / fs rows) alternate with it in the same launch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pipeline as bp  # noqa: E402


class Embed(nn.Module):
    """Layer 0: token + position embeddings (GPT's ``tok_emb``, ``pos_emb``, ``drop``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.tok_emb(ids) + self.pos_emb(pos))


class BlockLayer(nn.Module):
    """Layers 1-6: GPT's block ``i``."""

    def __init__(self, model: nn.Module, i: int) -> None:
        super().__init__()
        self.block = model.blocks[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Final(nn.Module):
    """Layer 7: the final LayerNorm and the head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


def gpt_name(ds_name: str, n_layers: int) -> str:
    """DeepSpeed's ``"<layer>.<...>"`` param name -> the GPT name."""
    idx, rest = ds_name.split(".", 1)
    i = int(idx)
    if i == 0 or i == n_layers + 1:
        return rest
    return f"blocks.{i - 1}.{rest.removeprefix('block.')}"


def ds_config(batch: int, m: int) -> dict:
    return {
        "train_batch_size": batch,  # data-parallel size 1: m microbatches of batch / m
        "train_micro_batch_size_per_gpu": batch // m,
        "gradient_accumulation_steps": m,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": bp.LR,
                "betas": list(bp.BETAS),
                "eps": bp.EPS,
                "weight_decay": bp.WD,
                "torch_adam": True,
                "fused": True,
            },
        },
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 0.0,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def ds_variant(data: dict, m: int) -> bp.Stepper:
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    model = bp.gpt()
    n = len(model.blocks)
    specs = [LayerSpec(Embed, model)]
    specs += [LayerSpec(BlockLayer, model, i) for i in range(n)]
    specs += [LayerSpec(Final, model)]
    net = PipelineModule(layers=specs, num_stages=2, loss_fn=bp.lm_loss, partition_method="uniform")
    if list(net.parts) != [0, (n + 2) // 2, n + 2]:
        raise AssertionError(f"DeepSpeed partitioned the layers as {net.parts}, not 4 | 4")
    del specs, model
    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=list(net.parameters()), config=ds_config(data["x"].shape[1], m)
    )

    def one(i: int) -> tuple[float | None, float | None]:
        batches = iter(list(zip(data["x"][i].chunk(m), data["y"][i].chunk(m))))
        loss = engine.train_batch(data_iter=batches)
        return float(loss), None

    def params() -> dict[str, torch.Tensor]:
        return {gpt_name(k, n): v.detach() for k, v in engine.module.named_parameters()}

    def live() -> list[torch.Tensor]:
        opt = engine.optimizer
        engine.module.zero_grad(set_to_none=True)
        return [*engine.module.parameters(), *(x for s in opt.state.values() for x in s.values())]

    return bp.Stepper(one, params, live)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--memory-steps", type=int, default=0, help="one variant alone: memory")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    data = torch.load(args.data)
    keys = args.variants.split(",")
    m = args.microbatches

    def build(k: str) -> bp.Stepper:
        return ds_variant(data, m) if k == "ds-1f1b" else bp.builder(k)(data, m)

    if args.memory_steps:
        (key,) = keys
        out: dict[str, Any] = {
            "memory": bp.rank_memory(key, data, m, args.memory_steps, lambda d, mm: build(key))
        }
    else:
        steppers = [build(k) for k in keys]
        out = bp.run_alternating(steppers, args.warmup, args.steps)
        out["keys"] = keys
        out["params_dev"] = bp.params_devs(steppers, args.ref)
    out["version"] = deepspeed.__version__
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
