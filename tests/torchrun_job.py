"""A tiny ZeRO-3 training job run by tests/test_torchrun.py under plain torchrun.

Usage (what the test does, on loopback):
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr 127.0.0.1 \
        --master-port PORT tests/torchrun_job.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

import fsharding as fs
from fsharding import optim

STEPS, ROWS = 4, 4


def params0() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "v": torch.randn(3, 5, generator=g),
    }


def loss_fn(p, batch):
    return F.cross_entropy(torch.tanh(batch["x"] @ p["w"] + p["b"]) @ p["v"], batch["y"])


def batches(world: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(ROWS * world, 7, generator=g),
            "y": torch.randint(0, 5, (ROWS * world,), generator=g),
        }
        for _ in range(STEPS)
    ]


def train(world: int, rank: int, step, rows: int = ROWS) -> tuple[dict, list[float]]:
    params, state = step.init(params0())
    losses = []
    for b in batches(world):
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in b.items()}
        params, state, m = step.step(params, state, local)
        losses.append(float(m["loss"]))
    return step.gather(params), losses


def opt():
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))


def main() -> None:
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:  # the single-process reference on the global batch of 2 ranks
        step = fs.train_step(fs.value_and_grad(loss_fn), opt())
        params, losses = train(2, 0, step, rows=2 * ROWS)
    else:
        mesh = fs.Mesh(dp=world)  # initialises the process group from torchrun's env
        step = fs.zero(fs.value_and_grad(loss_fn), opt(), mesh=mesh, stage=3)
        params, losses = train(world, mesh.coordinate["dp"], step)
    with open(out, "w") as f:
        json.dump({"params": {k: v.tolist() for k, v in params.items()}, "losses": losses}, f)


if __name__ == "__main__":
    main()
