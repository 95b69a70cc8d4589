"""The torch and fsharding variants of ``bench_zero.py`` and their rank entry points.

Each builder returns a :class:`zero_common.Stepper` with its own model, optimizer state and
step counter over the same batches. fs.zero's phases are timed by wrapping the library
functions it calls through module attributes (``parallel/_buckets``' bucketed collectives and
``Bucket``'s packing copies, ``optim.base.apply_updates[_]``) and its ``grad_fn`` and
optimizer ``update``: timers only, no behaviour change.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import zero_common as zc

import fsharding as fs
from fsharding import optim

# ----------------------------------------------------------------------------- fs.zero

_CURRENT: list[zc.Phases | None] = [None]  # the fs.zero variant now stepping
_INSTRUMENTED = [False]


def _timed_global(module: Any, name: str, phase: str) -> None:
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        ph = _CURRENT[0]
        return fn(*args, **kwargs) if ph is None else ph.region(phase, fn, *args, **kwargs)

    setattr(module, name, wrapped)


def _instrument() -> None:
    if _INSTRUMENTED[0]:
        return
    from fsharding.optim import base
    from fsharding.parallel import _buckets

    for name in ("all_reduce_mean", "reduce_scatter_buckets", "all_gather_buckets"):
        _timed_global(_buckets, name, "comm")
    for name in ("gather_input", "unpack_gathered", "scatter_input", "unpack_scattered"):
        _timed_global(_buckets.Bucket, name, "pack")  # copies in and out of buckets
    for name in ("apply_updates", "apply_updates_"):
        _timed_global(base, name, "opt")
    _INSTRUMENTED[0] = True


def has_block_gather() -> bool:
    """Whether fs.zero has the per-block ``gather=`` mode (being added in parallel)."""
    return "gather" in inspect.signature(fs.zero).parameters


_MESH: list[Any] = [None]


def _mesh() -> Any:
    if _MESH[0] is None:
        _MESH[0] = fs.Mesh(dp=dist.get_world_size())
    return _MESH[0]


def fs_zero(
    data: dict,
    stage: int,
    *,
    donate: bool = True,
    wrap: Any = None,
    overlap: bool | None = None,
    **zero_kw: Any,
) -> zc.Stepper:
    """``fs.zero(value_and_grad(loss), optim.adamw(...), stage=stage)`` on GPT small;
    ``wrap`` goes to ``fs.functional`` (per-block transforms); ``overlap``: force the
    reduction inside backward (``parallel/_overlap``) on or off (None: the library's choice,
    off on gloo)."""
    _instrument()
    ph = zc.Phases()
    model = zc.model()
    apply, params = fs.functional(model, wrap=wrap)

    def loss_fn(p: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return zc.lm_loss(apply(p, x), y)

    tx = optim.adamw(zc.LR, b1=zc.BETAS[0], b2=zc.BETAS[1], eps=zc.EPS, weight_decay=zc.WD)
    tx = optim.GradientTransformation(tx.init, ph.timed("opt", tx.update))
    grad_fn = ph.timed("fwd+bwd", fs.value_and_grad(loss_fn))
    step = fs.zero(grad_fn, tx, mesh=_mesh(), stage=stage, **zero_kw)
    box = dict(zip(("p", "s"), step.init(params)))
    if overlap is not None:  # the _ZeRO behind the Step: None = probe, then on; False = off
        step.step.__self__.overlap = None if overlap else False
    del params
    if stage == 3:  # apply passes every param explicitly: the module's own full copy can go
        model.to("meta")  # (FSDP2's fully_shard frees it too)
    world = dist.get_world_size()

    def one(i: int) -> tuple[float, float]:
        _CURRENT[0] = ph
        try:
            box["p"], box["s"], m = step.step(
                box["p"], box["s"], zc.rank_batch(data, i), donate=donate
            )
        finally:
            _CURRENT[0] = None
        return float(m["loss"]), float(m["grad_norm"])

    def state() -> float:
        leaves = [*fs.tree.leaves_with_path(box["p"])]
        plocal = [fs.tree.local_tensor(x) for _, x in leaves]
        # fs.zero keeps no gradient between steps; count the one the optimizer consumes:
        # full size at stages 0-1, this rank's shard at 2-3 (the ZeRO paper's accounting).
        g = sum(x.numel() * x.element_size() for _, x in leaves)
        g = g if stage <= 1 else g / world
        s = [fs.tree.local_tensor(x) for _, x in fs.tree.leaves_with_path(box["s"])]
        return zc.storage_mib([*plocal, *s]) + g / zc.MIB

    def full_params() -> dict[str, torch.Tensor]:
        return dict(step.gather(box["p"]))  # stage 3: all-gathered (every rank calls it)

    def live() -> list[torch.Tensor]:
        return [fs.tree.local_tensor(x) for x in fs.tree.leaves((box["p"], box["s"]))]

    return zc.Stepper(one, state, ph, full_params, live)


_COMPUTE = frozenset(
    getattr(torch.ops.aten, n)
    for n in (
        "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
        "gelu", "native_layer_norm", "add", "mul", "embedding", "_log_softmax",
    )
)  # fmt: skip


def save_compute(op: Any, *_: Any, **__: Any) -> bool:
    """A remat policy that saves every compute op's output and recomputes only the rest:
    the all-gather, its buffers and copies, views. ``remat(gather(block), policy=this)``
    then saves what plain autograd saves but drops the gathered params after forward and
    re-gathers them in backward: FSDP2's ``reshard_after_forward=True``."""
    return getattr(op, "overloadpacket", None) in _COMPUTE


def _blocks(remat: Any, reshard: bool = False) -> dict:
    """``wrap=`` for fs.functional: every GPT Block gathered per block, maybe under remat
    (``nothing_saveable``: full remat; ``dots_saveable``: recompute all but the matmuls —
    the all-gather included, like FSDP2's re-gather in backward)."""
    from fsharding.models.gpt import Block
    from fsharding.parallel.gather import gather  # (fs.gather once exported)

    if remat is None:
        return {Block: gather(reshard_after_forward=reshard)}
    policy = getattr(fs.policies, remat) if isinstance(remat, str) else remat
    return {Block: lambda f: fs.remat(gather(f), policy=policy)}


# ----------------------------------------------------------------------------- FSDP2


def fsdp2(data: dict, *, reshard_after_forward: bool = True, fused: bool = True) -> zc.Stepper:
    """torch FSDP2: ``fully_shard`` per Block, then the root; torch AdamW(fused=True)
    (``fused=False``: foreach)."""
    from torch.distributed.fsdp import fully_shard

    m = zc.model()
    for block in m.blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(m, reshard_after_forward=reshard_after_forward)
    return zc.torch_stepper(m, m, data, fused=fused)


# ----------------------------------------------------------------------------- registry

BUILDERS: dict[str, tuple[str, Callable[[dict], zc.Stepper]]] = {
    "ddp": ("torch DDP, AdamW(fused)", zc.ddp),
    "ddp-foreach": (
        "torch DDP, AdamW(foreach) [extra row, old baseline]",
        lambda d: zc.ddp(d, fused=False),
    ),
    "zero0": ("fs.zero stage 0", lambda d: fs_zero(d, 0)),
    "fsdp2": ("torch FSDP2 (fully_shard per block), AdamW(fused)", fsdp2),
    "fsdp2-foreach": (
        "torch FSDP2 (fully_shard per block), AdamW(foreach) [extra row, old baseline]",
        lambda d: fsdp2(d, fused=False),
    ),
    "zero3": ("fs.zero stage 3", lambda d: fs_zero(d, 3)),
    "zero3-blocks": (
        "fs.zero stage 3, gather='blocks', wrap gather",
        lambda d: fs_zero(d, 3, gather="blocks", wrap=_blocks(remat=None)),
    ),
    "zero3-blocks-reshard": (
        "fs.zero stage 3, gather='blocks', wrap gather(reshard_after_forward=True)",
        lambda d: fs_zero(d, 3, gather="blocks", wrap=_blocks(remat=None, reshard=True)),
    ),
    "zero3-blocks-sac": (
        "fs.zero stage 3, gather='blocks', wrap remat(gather, dots_saveable)",
        lambda d: fs_zero(d, 3, gather="blocks", wrap=_blocks(remat="dots_saveable")),
    ),
    "zero3-blocks-savecompute": (
        "fs.zero stage 3, gather='blocks', wrap remat(gather, save compute ops)",
        lambda d: fs_zero(d, 3, gather="blocks", wrap=_blocks(remat=save_compute)),
    ),
    "zero3-blocks-remat": (
        "fs.zero stage 3, gather='blocks', wrap remat(gather)",
        lambda d: fs_zero(d, 3, gather="blocks", wrap=_blocks(remat="nothing_saveable")),
    ),
    "zero1": ("fs.zero stage 1", lambda d: fs_zero(d, 1)),
    "zero2": ("fs.zero stage 2", lambda d: fs_zero(d, 2)),
    "fsdp2-nr": (
        "torch FSDP2 reshard_after_forward=False, AdamW(fused)",
        lambda d: fsdp2(d, reshard_after_forward=False),
    ),
    "zero0-overlap": ("fs.zero stage 0, overlap", lambda d: fs_zero(d, 0, overlap=True)),
    "zero1-overlap": ("fs.zero stage 1, overlap", lambda d: fs_zero(d, 1, overlap=True)),
    "zero2-overlap": ("fs.zero stage 2, overlap", lambda d: fs_zero(d, 2, overlap=True)),
    "zero3-overlap": ("fs.zero stage 3, overlap", lambda d: fs_zero(d, 3, overlap=True)),
    "zero0-nodonate": ("fs.zero stage 0, donate=False", lambda d: fs_zero(d, 0, donate=False)),
    "zero3-nodonate": ("fs.zero stage 3, donate=False", lambda d: fs_zero(d, 3, donate=False)),
}


def rank_time(
    keys: list[str], data: dict, warmup: int, steps: int, ref_path: str | None = None
) -> dict:
    """Entry of the timed launch: all ``keys`` side by side, alternating step by step; then
    each variant's full params against the eager reference's (``zc.param_check``)."""
    zc.set_threads()
    steppers = [BUILDERS[k][1](data) for k in keys]
    times, traj, contention = zc.run_alternating(steppers, warmup=warmup, steps=steps)
    params = zc.param_check(steppers, ref_path)
    states = [s.state_mib() for s in steppers]
    phases = [zc.phase_medians(s.phases) for s in steppers]
    _, hwm = zc.proc_status_mib("VmRSS"), zc.proc_status_mib("VmHWM")
    return {
        "keys": keys,
        "times": times,
        "traj": traj,
        "contention": contention,
        "state": states,
        "phases": phases,
        "shared_hwm": hwm,
        "params": params,
    }


def rank_memory(key: str, data: dict, steps: int, gc_off: bool = False, live: bool = False) -> dict:
    """Entry of a memory launch: one variant alone in fresh processes (``zc.memory_run``)."""
    zc.set_threads()
    return zc.memory_run(lambda: BUILDERS[key][1](data), steps, gc_off=gc_off, live=live)


def rank_profile(keys: list[str], data: dict, warmup: int, steps: int, top: int) -> dict:
    """Per variant: torch.profiler's ops by self CPU time and cProfile's Python functions by
    own time, over ``steps`` steps after ``warmup`` (rank 0's tables)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    zc.set_threads()
    out = {}
    for k in keys:
        s = BUILDERS[k][1](data)
        for i in range(warmup):
            dist.barrier()
            s.step(i)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(warmup, warmup + steps):
                dist.barrier()
                s.step(i)
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        cp = cProfile.Profile()
        dist.barrier()
        cp.enable()
        for i in range(warmup + steps, warmup + 2 * steps):
            dist.barrier()
            s.step(i)
        cp.disable()
        buf = io.StringIO()
        pstats.Stats(cp, stream=buf).sort_stats("tottime").print_stats(top)
        out[k] = ops + "\n" + buf.getvalue()
        del s
    return out
