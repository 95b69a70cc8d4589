"""DeepSpeed's checkpoints on the state of ``bench_checkpoint.py`` (DeepSpeed's virtualenv).

Two modes, started by ``bench_checkpoint.py`` with the DeepSpeed virtualenv's Python
(``DS_ACCELERATOR=cpu``; DeepSpeed is never a dependency of fsharding):

* ``engine`` (one rank of a 2-process ``torchrun``, gloo, 1 thread): a ZeRO-3 engine on GPT
  ``FS_BENCH_PRESET`` with ``bench_zero``'s DeepSpeed config (``torch_adam`` + ``fused``:
  ``torch.optim.AdamW(fused=True)``, fp32, no clipping), one step on the batch every fs row
  trains on, then per repeat ``engine.save_checkpoint(<dir>/ds-<r>)`` and, after the files
  are fsynced and dropped from the page cache (as the fs rows' loads), with the rank's fp32
  and param partitions and Adam moments zeroed, ``engine.load_checkpoint(<dir>/ds-<r>)``;
  asserts that the load restored them bit for bit. Measured as the fs rows (the slower
  rank's time; peak RSS − RSS before, ``VmHWM`` reset per operation).
* ``export`` (one plain process, how ``zero_to_fp32`` runs): ``get_fp32_state_dict_from_zero_
  checkpoint(ckpt)`` + ``safetensors.torch.save_file``, or ``convert_zero_checkpoint_to_fp32_
  state_dict(ckpt, out, safe_serialization=True, max_shard_size=None)`` (``--how``); time and
  peak RSS − RSS before (DeepSpeed and torch already imported).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_checkpoint as bc  # noqa: E402


def partitions(engine: Any) -> list[torch.Tensor]:
    """The rank's ZeRO-3 state: param partitions, fp32 master partitions, Adam moments."""
    opt = engine.optimizer
    ts = list(opt.fp16_partitioned_groups_flat) + list(opt.fp32_partitioned_groups_flat)
    for st in opt.optimizer.state.values():
        ts += [v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return ts


def engine_mode(args: argparse.Namespace) -> None:
    import deepspeed
    import zero_common as zc
    import zero_deepspeed as zd

    zc.set_threads()
    deepspeed.init_distributed(dist_backend="gloo")
    data = torch.load(args.data)
    model = zc.model()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=zd.ds_config(3, "fused")
    )
    x, y = zc.rank_batch(data, 0)
    loss = zc.lm_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    rank = dist.get_rank()
    rec: dict[str, list[dict]] = {}
    fsync_s = []
    for r in range(args.repeats):
        path = os.path.join(args.dir, f"ds-{r}")
        rec.setdefault("ds.save", []).append(
            bc.measure(lambda p=path: engine.save_checkpoint(p))[1]
        )
        dist.barrier()
        if rank == 0:
            fsync_s.append(bc.fsync_time(path))
        dist.barrier()
        bc.evict(path)
        dist.barrier()
        keep = [t.clone() for t in partitions(engine)]
        if not keep or sum(t.numel() for t in keep) == 0:
            raise AssertionError("DeepSpeed ZeRO-3: found no partitions to check the load on")
        with torch.no_grad():
            for t in partitions(engine):
                t.zero_()
        rec.setdefault("ds.load", []).append(
            bc.measure(lambda p=path: engine.load_checkpoint(p))[1]
        )
        for i, (a, b) in enumerate(zip(keep, partitions(engine))):
            if not torch.equal(a, b):
                raise AssertionError(f"DeepSpeed load_checkpoint did not restore partition {i}")
        del keep
        dist.barrier()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rec": rec})
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"per_rank": everyone, "fsync_s": fsync_s,
                       "version": deepspeed.__version__}, f)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def export_mode(args: argparse.Namespace) -> None:
    import deepspeed  # noqa: F401  (imported before the baseline RSS, as in a real run)
    from deepspeed.utils.zero_to_fp32 import (
        convert_zero_checkpoint_to_fp32_state_dict,
        get_fp32_state_dict_from_zero_checkpoint,
    )
    from safetensors.torch import save_file

    def run() -> None:
        if args.how == "get_fp32":
            sd = get_fp32_state_dict_from_zero_checkpoint(args.ckpt)
            os.makedirs(args.export_dir, exist_ok=True)
            save_file(
                sd, os.path.join(args.export_dir, "model.safetensors"), metadata={"format": "pt"}
            )
        else:
            convert_zero_checkpoint_to_fp32_state_dict(
                args.ckpt, args.export_dir, safe_serialization=True, max_shard_size=None
            )

    gc.collect()
    _, m = bc.measure(run, collective=False)
    m["fsync_s"] = bc.fsync_time(args.export_dir)
    with open(args.out, "w") as f:
        json.dump(m, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["engine", "export"])
    ap.add_argument("--data")
    ap.add_argument("--dir")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ckpt")
    ap.add_argument("--export-dir")
    ap.add_argument("--how", choices=["get_fp32", "convert"], default="get_fp32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine_mode(args) if args.mode == "engine" else export_mode(args)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
