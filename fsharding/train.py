"""The main job: train the small GPT on the standard library's sources, the fsharding way.

    python -m fsharding.train                  # tiny preset, under two minutes on 2 CPU cores
    python -m fsharding.train --preset small   # ANCHORS.md's GPT "small" workload
    python -m fsharding.train --save-dir ckpt --save-every 100 --resume   # restartable
    torchrun --nproc-per-node 2 -m fsharding.train --pipeline 2 --schedule zero_bubble

Every piece is a plain function of ``args``: ``build_model``, ``build_apply`` (per-block
transforms go here, through ``fs.functional(model, wrap=...)``), ``build_grad_fn`` (wraps
``fs.value_and_grad(loss_fn)`` in further transforms), ``build_optimizer`` and
``build_step``; ``main`` only wires them into the loop. Adding a feature flag means adding
an argument and one line in the builder it concerns.

``--pipeline P`` cuts the GPT into stages (``split_gpt``; ``build_mesh``, ``build_stages``,
``build_pipeline_grad_fn``) on ``fs.Mesh(dp=world // P, pp=P)``: rank ``r`` keeps only its
own stages' weights, ``fs.pipeline`` runs them on ``--schedule`` over ``--microbatches``,
and ``build_step`` wraps it in ``fs.train_step`` (norms, clipping and the loss scale global
over the stages) or, with ``dp > 1``, in ``fs.zero(..., axis="dp")``. The ranks of one dp
row draw the same batches (the dp row's share of the global batch); evaluation and the
sample run on rank 0 with every stage's params gathered there (:func:`whole_params`).

The training state is one pytree, :func:`training_state`: ``params``, ``opt_state`` (with
the loss scale and the schedule count), the ``step`` index, the ``losses`` so far, every
rank's random state (torch's CPU generator, the CUDA one when CUDA is available, and the
position of its data stream) and the ``config`` fingerprint of the flags that decide the
trajectory. ``--save-dir`` writes it with ``fs.save`` every ``--save-every`` steps and at the
end; ``--resume`` loads ``fs.latest(--save-dir)`` into the layout this run built (any ZeRO
stage's DTensors) and continues bit for bit where the saved run was: the resumed losses and
params equal those of a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fsharding as fs
from fsharding import data, optim
from fsharding.models import GPT, Block, GPTConfig, decay_mask, generate, split_gpt

REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")

# Per-preset defaults for the flags left unset on the command line.
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 300, "batch_size": 32},
    "small": {"steps": 300, "batch_size": 8},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None) and fills defaults.

    Example:
        >>> parse_args(["--steps", "5"]).batch_size
        32
    """
    p = argparse.ArgumentParser(
        prog="python -m fsharding.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", choices=sorted(DEFAULTS), default="tiny", help="model size")
    p.add_argument("--steps", type=int, help="optimizer steps (preset default)")
    p.add_argument("--batch-size", type=int, help="sequences per step (preset default)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, batches and the sample")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warmup steps (default: steps // 10)")
    p.add_argument("--eval-batches", type=int, default=8, help="fixed val batches to average")
    p.add_argument("--data-bytes", type=int, default=data.DEFAULT_MAX_BYTES, help="corpus cap")
    p.add_argument("--sample-len", type=int, default=200, help="bytes to generate at the end")
    p.add_argument("--json", metavar="PATH", help="write the final metrics as JSON")
    p.add_argument(
        "--remat",
        metavar="POLICY",
        choices=REMAT_POLICIES,
        help=f"per-block activation checkpointing: {', '.join(REMAT_POLICIES)}",
    )
    p.add_argument("--amp", metavar="POLICY", help="mixed precision: bf16, fp16, pure_bf16, ...")
    p.add_argument("--accumulate", type=int, default=1, metavar="K", help="microbatches/step")
    p.add_argument(
        "--offload",
        metavar="cpu|DIR",
        help="optimizer state on CPU or in a directory (streamed in chunks)",
    )
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="with --offload: also keep each block's saved inputs there (needs --remat)",
    )
    p.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        metavar="STAGE",
        help="data parallel with ZeRO stage 0-3 (run under torchrun --nproc-per-node N)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        metavar="P",
        help="pipeline parallel: the GPT in P stages, one per rank (torchrun; dp = world // P)",
    )
    p.add_argument(
        "--schedule",
        choices=PIPELINE_SCHEDULES,
        help="with --pipeline: the schedule (default 1f1b; interleaved_1f1b: 2 stages per rank)",
    )
    p.add_argument(
        "--microbatches",
        type=int,
        metavar="M",
        help="with --pipeline: microbatches per step (default 2 * P, or P; divides --batch-size)",
    )
    p.add_argument("--dropout", type=float, default=0.0, help="GPT dropout probability")
    p.add_argument("--save-dir", metavar="DIR", help="write the training state here (fs.save)")
    p.add_argument(
        "--save-every",
        type=int,
        metavar="N",
        help="with --save-dir: every N steps (and at the end)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --save-dir: continue from fs.latest(DIR) (start afresh when it holds none)",
    )
    p.add_argument("--export", metavar="DIR", help="fs.export the final params (safetensors)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    for name in ("steps", "batch_size", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup <= args.steps:
        p.error(f"--warmup must be in [0, steps={args.steps}], got {args.warmup}")
    if args.accumulate < 1 or args.batch_size % args.accumulate:
        p.error(f"--accumulate must be >= 1 and divide --batch-size={args.batch_size}")
    if args.offload_activations and not (args.offload and args.remat):
        p.error("--offload-activations needs --offload TARGET and --remat POLICY")
    if args.amp is not None:
        try:
            args.amp = fs.Policy.parse(args.amp)
        except ValueError as e:
            p.error(f"--amp: {e}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if (args.save_every is not None or args.resume) and args.save_dir is None:
        p.error("--save-every and --resume need --save-dir DIR (where checkpoints live)")
    if args.save_every is not None and args.save_every < 1:
        p.error(f"--save-every must be >= 1, got {args.save_every}")
    _check_pipeline_args(p, args)
    if args.save_dir is not None and args.offload not in (None, "cpu"):
        p.error(
            f"--save-dir with --offload {args.offload}: the optimizer state lives in files there "
            "and is not saved; use --offload cpu (or no --offload) to save checkpoints"
        )
    return args


def _check_pipeline_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills --schedule/--microbatches under --pipeline and refuses what does not compose."""
    if args.pipeline is None:
        if args.schedule is not None or args.microbatches is not None:
            p.error("--schedule and --microbatches need --pipeline P (the number of stages)")
        return
    if args.pipeline < 2:
        p.error(f"--pipeline must be >= 2 (stages), got {args.pipeline}; leave it out for one")
    args.schedule = args.schedule or "1f1b"
    if args.microbatches is None:  # 2 P when it divides the batch, else P
        args.microbatches = 2 * args.pipeline
        if args.batch_size % args.microbatches and args.batch_size % args.pipeline == 0:
            args.microbatches = args.pipeline
    if args.microbatches < 1 or args.batch_size % args.microbatches:
        p.error(
            f"--microbatches must be >= 1 and divide --batch-size={args.batch_size}, "
            f"got {args.microbatches}"
        )
    if args.schedule == "interleaved_1f1b" and args.microbatches % args.pipeline:
        p.error(
            f"--schedule interleaved_1f1b needs --microbatches a multiple of --pipeline="
            f"{args.pipeline}, got {args.microbatches}"
        )
    if args.accumulate > 1:
        p.error(
            "--accumulate with --pipeline: the pipeline already splits the batch into "
            "--microbatches (and accumulates their grads); pass --microbatches instead"
        )
    if args.offload is not None:
        p.error(
            "--offload with --pipeline is not supported by the main job: each stage's "
            "optimizer state is only its own share already; leave --offload out"
        )


def build_model(args: argparse.Namespace) -> GPT:
    """The GPT of ``--preset``, initialised from ``--seed``.

    Example:
        >>> build_model(parse_args(["--preset", "small"])).config.d_model
        384
    """
    return GPT(GPTConfig.preset(args.preset).with_(dropout=args.dropout), seed=args.seed)


def build_apply(args: argparse.Namespace, model: GPT) -> tuple[Callable[..., Any], dict]:
    """``fs.functional(model)`` with per-block transforms (``wrap={Block: ...}``):
    ``--remat`` (``fs.remat``), ``--offload-activations`` (``fs.offload(fs.remat(...))``)
    and, under ``--zero 3``, ``fs.gather`` inside the remat region (ZeRO-3 per block).

    Example:
        >>> args = parse_args([])
        >>> apply, params = build_apply(args, build_model(args))
        >>> apply(params, torch.zeros(1, 3, dtype=torch.long)).shape
        torch.Size([1, 3, 256])
    """
    return fs.functional(model, wrap=_per_block(args))


def _per_block(args: argparse.Namespace) -> dict[type, Callable[..., Any]] | None:
    transforms: list[Callable] = []
    if args.zero == 3:  # innermost: re-gathered in backward (or when remat recomputes)
        transforms.append(fs.gather(reshard_after_forward=True))
    if args.remat:
        transforms.append(fs.remat(policy=getattr(fs.policies, args.remat)))
    if args.offload_activations:
        transforms.append(fs.offload(to=args.offload))
    if not transforms:
        return None

    def per_block(block_apply: Callable[..., Any]) -> Callable[..., Any]:
        for t in transforms:
            block_apply = t(block_apply)
        return block_apply

    return {Block: per_block}


def build_mesh(args: argparse.Namespace) -> fs.Mesh:
    """``--pipeline P``'s mesh: ``fs.Mesh(dp=world // P, pp=P)`` over torchrun's ranks.

    Rank ``r`` is ``(dp, pp) = divmod(r, P)``: the ranks of one pipeline are consecutive.

    Raises:
        SystemExit: the world size is not a multiple of ``P``.

    Example:
        >>> # under torchrun --nproc-per-node 4, --pipeline 2: fs.Mesh(dp=2, pp=2)
        >>> build_mesh(parse_args(["--pipeline", "2"]))  # one process
        Traceback (most recent call last):
        SystemExit: fsharding.train: --pipeline 2 needs a world size divisible by 2 ...
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.pipeline:
        raise SystemExit(
            f"fsharding.train: --pipeline {args.pipeline} needs a world size divisible by "
            f"{args.pipeline} (data parallel over world // {args.pipeline}), got {world} "
            f"processes; start e.g. `torchrun --nproc-per-node {args.pipeline} -m "
            f"fsharding.train --pipeline {args.pipeline}`."
        )
    return fs.Mesh(dp=world // args.pipeline, pp=args.pipeline)


def stage_layers(args: argparse.Namespace, n_layers: int) -> list[int]:
    """Blocks per pipeline stage: ``pipeline * virtual`` stages (2 virtual stages per rank
    under ``interleaved_1f1b``), as even as possible with the extra blocks last; with more
    stages than blocks, the first and last stage hold only the embedding and the head.

    Example:
        >>> stage_layers(parse_args(["--pipeline", "2"]), 2)
        [1, 1]
        >>> stage_layers(parse_args(["--pipeline", "2", "--schedule", "interleaved_1f1b"]), 2)
        [0, 1, 1, 0]
    """
    n = args.pipeline * (2 if args.schedule == "interleaved_1f1b" else 1)
    if n <= n_layers:
        return [n_layers // n + (s >= n - n_layers % n) for s in range(n)]
    if n - 2 <= n_layers:
        inner = n - 2
        return [0, *(n_layers // inner + (s >= inner - n_layers % inner) for s in range(inner)), 0]
    raise SystemExit(
        f"fsharding.train: --pipeline {args.pipeline} --schedule {args.schedule} makes {n} "
        f"stages, but the GPT has {n_layers} blocks (at most {n_layers + 2} stages: the first "
        "and last may hold only the embedding and the head); use fewer stages."
    )


def build_stages(
    args: argparse.Namespace, model: GPT, mesh: fs.Mesh
) -> tuple[list[Callable[..., Any]], Any]:
    """The pipeline's stage functions and this rank's stage params.

    ``split_gpt(model, n)`` (blocks per :func:`stage_layers`); for the stages of this rank
    (``pp, pp + P, ...``) ``fs.functional(stage, wrap={Block: remat})`` under ``--remat``,
    in ``fs.amp`` under ``--amp``; the other stages' functions raise if called (they run
    on other ranks). Params are keyed by the GPT's own names: one dict, or under
    ``interleaved_1f1b`` a list of this rank's 2 stages' dicts.

    Example:
        >>> args = parse_args(["--pipeline", "2"])
        >>> fns, params = build_stages(args, build_model(args), fs.Mesh(pp=1))  # as pp rank 0
        >>> len(fns), sorted(params)[-1]
        (2, 'tok_emb.weight')
    """
    layers = stage_layers(args, model.config.n_layers)
    stages = split_gpt(model, len(layers), layers=layers)
    p, r = args.pipeline, mesh.coordinate["pp"]
    wrap = _per_block(args)  # --remat; fs.gather under --zero 3
    fns: list[Callable[..., Any]] = []
    mine: list[dict] = []
    for s, stage in enumerate(stages):
        if s % p != r:
            fns.append(_elsewhere(s, s % p))
            continue
        apply, params = fs.functional(stage, wrap=wrap if len(stage.layers) else None)
        fns.append(apply if args.amp is None else fs.amp(apply, policy=args.amp))
        mine.append(params)
    return fns, mine[0] if len(mine) == 1 else mine


def _elsewhere(stage: int, rank: int) -> Callable[..., Any]:
    def runs_elsewhere(params: Any, x: Any) -> Any:
        raise RuntimeError(f"fsharding.train: stage {stage} runs on pipeline rank {rank}")

    return runs_elsewhere


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]``.

    Example:
        >>> round(float(lm_loss(torch.zeros(2, 3, 4), torch.ones(2, 3).long())), 4)  # ln(4)
        1.3863
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_pipeline_grad_fn(
    args: argparse.Namespace, fns: Sequence[Callable[..., Any]], mesh: fs.Mesh
) -> Callable[..., Any]:
    """``fs.pipeline(fns, lm_loss, ...)`` on the ``pp`` axis of ``mesh``: ``grad_fn(params,
    inputs, targets) -> (loss, grads)`` of this rank's stages, the loss on every rank.

    ``virtual_stages`` is ``len(fns) // mesh.shape["pp"]``: on a local mesh
    (``fs.Mesh(pp=1)``) one process runs every stage (``gpipe`` or ``interleaved_1f1b``).

    Example:
        >>> args = parse_args(["--pipeline", "2", "--schedule", "gpipe", "--batch-size", "4"])
        >>> stages = [fs.functional(s) for s in split_gpt(build_model(args), 2)]
        >>> f = build_pipeline_grad_fn(args, [a for a, _ in stages], fs.Mesh(pp=1))
        >>> ids = torch.zeros(4, 8, dtype=torch.long)
        >>> loss, grads = f([p for _, p in stages], ids, ids)  # both stages in this process
        >>> sorted(grads[1])[-1], loss.shape
        ('ln_f.weight', torch.Size([]))
    """
    return fs.pipeline(
        list(fns),
        lm_loss,
        mesh=mesh,
        axis="pp",
        microbatches=args.microbatches,
        schedule=args.schedule,
        virtual_stages=len(fns) // mesh.shape["pp"],
    )


def make_loss_fn(apply: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """Mean next-byte cross-entropy: ``loss_fn(params, batch)`` with ``batch = {"x", "y"}``.

    Example:
        >>> loss_fn = make_loss_fn(lambda params, x: params["logits"].expand(*x.shape, 4))
        >>> batch = {"x": torch.zeros(2, 3, dtype=torch.long), "y": torch.ones(2, 3).long()}
        >>> round(float(loss_fn({"logits": torch.zeros(4)}, batch)), 4)  # ln(4)
        1.3863
    """

    def loss_fn(params: dict, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(apply(params, batch["x"]), batch["y"])

    return loss_fn


def build_grad_fn(args: argparse.Namespace, apply: Callable[..., Any]) -> Callable[..., Any]:
    """``grad_fn(params, batch) -> (loss, grads)``: ``accumulate(value_and_grad(amp(loss)))``.

    Example:
        >>> args = parse_args([])
        >>> apply, params = build_apply(args, build_model(args))
        >>> batch = {"x": torch.zeros(2, 4, dtype=torch.long), "y": torch.ones(2, 4).long()}
        >>> loss, grads = build_grad_fn(args, apply)(params, batch)
        >>> grads.keys() == params.keys()
        True
    """
    loss_fn = make_loss_fn(apply)
    if args.amp is not None:
        loss_fn = fs.amp(loss_fn, policy=args.amp)
    grad_fn = fs.value_and_grad(loss_fn)
    if args.accumulate > 1:
        grad_fn = fs.accumulate(grad_fn, steps=args.accumulate)
    return grad_fn


def build_optimizer(args: argparse.Namespace) -> optim.GradientTransformation:
    """Global-norm clipping at 1.0, then AdamW on a warmup-cosine schedule (to ``lr / 10``).

    Weight decay 0.1 applies to matrix weights only (:func:`fsharding.models.decay_mask`).

    Example:
        >>> opt = build_optimizer(parse_args([]))
        >>> len(opt.init({"w": torch.zeros(2, 2)}))  # (clip state, adamw state)
        2
    """
    schedule = optim.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, args.steps, end_value=args.lr / 10
    )
    adamw = optim.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=_decay_mask)
    if args.amp is not None and args.amp.param_dtype != torch.float32:
        adamw = fs.amp(adamw, policy=args.amp)  # fp32 master weights
    if args.offload:
        adamw = fs.offload(adamw, to=args.offload)  # element-wise part; clipping stays here
    return optim.chain(optim.clip_by_global_norm(1.0), adamw)


def _decay_mask(params: Any) -> Any:
    # a pipeline rank's virtual stages: a list of dicts keyed by the GPT's names
    if isinstance(params, list):
        return [decay_mask(p) for p in params]
    return decay_mask(params)


def build_step(
    args: argparse.Namespace, grad_fn: Callable[..., Any], opt: optim.GradientTransformation
) -> fs.Step:
    """``fs.train_step``, or ``fs.zero`` over all ranks with ``--zero`` (fp16: a loss scale).

    Under ``--pipeline`` (``grad_fn`` from :func:`build_pipeline_grad_fn`): with one
    pipeline (``dp == 1``) ``fs.train_step`` (norms, clipping and the loss scale global over
    the stages; ``--zero`` has nothing to shard over), else ``fs.zero(..., axis="dp")`` at
    ``--zero`` (default 0: plain data parallel) over the pipelines.

    Example:
        >>> args = parse_args([])
        >>> apply, params = build_apply(args, build_model(args))
        >>> step = build_step(args, build_grad_fn(args, apply), build_optimizer(args))
        >>> params, opt_state = step.init(params)
    """
    scale = (
        fs.DynamicLossScale()
        if args.amp is not None and args.amp.compute_dtype == torch.float16
        else None
    )
    if args.pipeline is not None:
        mesh = grad_fn.mesh
        if mesh.shape["dp"] == 1:
            return fs.train_step(grad_fn, opt, loss_scale=scale)
        gather = "blocks" if args.zero == 3 else "boundary"
        stage = args.zero or 0
        return fs.zero(
            grad_fn, opt, mesh=mesh, stage=stage, loss_scale=scale, gather=gather, axis="dp"
        )
    if args.zero is None:
        return fs.train_step(grad_fn, opt, loss_scale=scale)
    mesh = fs.Mesh(dp=int(os.environ.get("WORLD_SIZE", "1")))
    gather = "blocks" if args.zero == 3 else "boundary"
    return fs.zero(grad_fn, opt, mesh=mesh, stage=args.zero, loss_scale=scale, gather=gather)


# The flags that decide a run's trajectory (its values, batches and random draws): a
# checkpoint resumes only a run with the same ones. --remat, --offload and the flags of
# evaluation and output change no value.
TRAJECTORY_FLAGS = (
    "preset",
    "seed",
    "lr",
    "warmup",
    "steps",
    "batch_size",
    "accumulate",
    "amp",
    "zero",
    "dropout",
    "data_bytes",
    "pipeline",
    "schedule",
    "microbatches",
)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def config_fingerprint(args: argparse.Namespace) -> str:
    """The :data:`TRAJECTORY_FLAGS` and the world size, as JSON: a checkpoint's ``config``.

    Example:
        >>> json.loads(config_fingerprint(parse_args(["--steps", "5", "--amp", "bf16"])))
        ... # doctest: +NORMALIZE_WHITESPACE
        {'accumulate': 1, 'amp': 'p=f32,c=bf16,o=f32', 'batch_size': 32, 'data_bytes': 4000000,
         'dropout': 0.0, 'lr': 0.003, 'preset': 'tiny', 'seed': 0, 'steps': 5, 'warmup': 1,
         'world_size': 1, 'zero': None}
    """
    flags = {name: getattr(args, name) for name in TRAJECTORY_FLAGS}
    if args.pipeline is None:  # (the fingerprint of the runs before --pipeline existed)
        for name in ("pipeline", "schedule", "microbatches"):
            del flags[name]
    flags["amp"] = None if args.amp is None else str(args.amp)
    flags["world_size"] = _world()[1]
    return json.dumps(flags, sort_keys=True)


def seed_rng(args: argparse.Namespace) -> torch.Generator:
    """Seeds torch's global generators (dropout) for this rank; returns the data generator.

    Rank ``r`` draws its dropout masks from ``args.seed + 104_729 * (r + 1)`` and its
    batches (its share of the global batch) from ``args.seed + 7919 * d``, ``d`` its data
    parallel index: ``r``, or ``r // P`` under ``--pipeline P`` (a pipeline's stages see the
    same batches).

    Example:
        >>> g = seed_rng(parse_args([]))
        >>> torch.rand(1, generator=g).item() == torch.rand(
        ...     1, generator=torch.Generator().manual_seed(0)).item()
        True
    """
    rank = _world()[0]
    torch.manual_seed(args.seed + 104_729 * (rank + 1))  # CPU and every CUDA device
    return torch.Generator().manual_seed(args.seed + 7919 * (rank // (args.pipeline or 1)))


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's random state as uint8 tensors.

    ``"cpu"``: torch's global CPU generator (dropout on CPU); ``"data"``: ``generator``, the
    position of the batch stream that draws with it; ``"cuda"`` (only when CUDA is
    available): the current CUDA device's generator (dropout on the GPU; one device per
    process, as under torchrun).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> state = rng_state(g)
        >>> a = torch.rand(2), torch.rand(2, generator=g)
        >>> set_rng_state(state, g)
        >>> b = torch.rand(2), torch.rand(2, generator=g)
        >>> all(torch.equal(x, y) for x, y in zip(a, b))
        True
    """
    state = {"cpu": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Restores what :func:`rng_state` captured into the global generators and ``generator``.

    Example:
        >>> g = torch.Generator()
        >>> set_rng_state(rng_state(torch.Generator().manual_seed(3)), g)
        >>> g.initial_seed()
        3
    """
    torch.set_rng_state(state["cpu"].contiguous())
    generator.set_state(state["data"].contiguous())
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].contiguous())


def _every_rank(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's ``tensor`` as row ``rank`` of a ``[world_size, ...]`` tensor sharded over
    all ranks (a DTensor with a process group): each rank saves and loads its own row."""
    world = _world()[1]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor[None]
    return fs.from_local(tensor[None], fs.Mesh(rank=world), fs.P("rank"))


def _this_rank(tensor: torch.Tensor) -> torch.Tensor:
    return fs.tree.local_tensor(tensor)[0].clone()


def training_state(
    params: Any,
    opt_state: Any,
    step: int,
    losses: torch.Tensor,
    generator: torch.Generator,
    config: str,
) -> dict[str, Any]:
    """The whole training state as one pytree: what ``--save-dir`` saves, ``--resume`` loads.

    ``{"params", "opt_state", "step", "losses", "rng", "config"}``: ``opt_state`` as the step
    returned it (with the schedule count, and the loss scale in a ``fs.TrainState``);
    ``step`` the number of steps done; ``losses`` a float64 tensor of every step's loss (0
    from ``step`` on); ``rng`` every rank's :func:`rng_state` (with ``generator``, the data
    position), each leaf ``[world_size, n]`` with row ``r`` from rank ``r`` (sharded over
    the ranks: each rank saves and loads its own row); ``config`` a string naming the run
    (the main job's :func:`config_fingerprint`). Built from a fresh run's values, it is the
    ``like`` that ``fs.load`` fills; :func:`resume_rng` then restores the random state.

    Example:
        >>> losses = torch.zeros(4, dtype=torch.float64)
        >>> state = training_state({"w": torch.zeros(2)}, (), 0, losses, torch.Generator(), "")
        >>> sorted(state), state["rng"]["data"].shape[0]
        (['config', 'losses', 'opt_state', 'params', 'rng', 'step'], 1)
    """
    return {
        "params": params,
        "opt_state": opt_state,
        "step": step,
        "losses": losses,
        "rng": {k: _every_rank(v) for k, v in rng_state(generator).items()},
        "config": config,
    }


def resume_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restores this rank's row of a loaded :func:`training_state`'s ``rng``.

    Call it just before the first step: anything drawing random numbers in between (an
    evaluation with dropout, a memory report) would shift the draws.

    Example:
        >>> g = torch.Generator().manual_seed(5)
        >>> state = training_state({}, (), 0, torch.zeros(0), g, "")
        >>> a = torch.rand(3), torch.rand(3, generator=g)
        >>> resume_rng(state, g)
        >>> torch.equal(torch.rand(3), a[0]) and torch.equal(torch.rand(3, generator=g), a[1])
        True
    """
    set_rng_state({k: _this_rank(v) for k, v in state["rng"].items()}, generator)


def checkpoint_path(save_dir: str | os.PathLike[str], step: int) -> str:
    """Where the main job saves the state after ``step`` steps: ``<save_dir>/step_<8 digits>``.

    Example:
        >>> checkpoint_path("ckpt", 300)
        'ckpt/step_00000300'
    """
    return os.path.join(save_dir, f"step_{step:08d}")


def load_training_state(save_dir: str, like: dict[str, Any]) -> dict[str, Any] | None:
    """``fs.load(fs.latest(save_dir), like)``; None when no checkpoint is there yet.

    ``like`` is :func:`training_state` of this run's fresh values: the loaded state comes
    back in its layout (this run's ZeRO stage and world), as new tensors.

    Raises:
        SystemExit: the checkpoint's ``config`` differs from ``like``'s (for the main job:
            other :data:`TRAJECTORY_FLAGS` or another world size; the message lists them):
            it would not continue that run.
        fs.CheckpointError: the checkpoint is damaged or does not fit ``like``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> losses = torch.zeros(4, dtype=torch.float64)
        >>> state = training_state({"w": torch.ones(2)}, (), 3, losses, torch.Generator(), "{}")
        >>> _ = fs.save(checkpoint_path(d, 3), state, step=3)
        >>> load_training_state(d, {**state, "step": 0})["step"]
        3
    """
    path = fs.latest(save_dir)
    if path is None:
        return None
    try:
        state = fs.load(path, like)
    except fs.CheckpointError:
        _check_config(path, _saved_config(path), like["config"])  # a clearer reason first
        raise
    _check_config(path, state["config"], like["config"])
    return state


def _saved_config(path: str) -> str | None:
    # fs.save's index (fsharding.json, see fsharding.serialization) records str leaves.
    try:
        with open(os.path.join(path, "fsharding.json")) as f:
            value = json.load(f)["leaves"]["['config']"]["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _check_config(path: str, saved: str | None, config: str) -> None:
    if saved is not None and saved != config:
        try:
            then, now = json.loads(saved), json.loads(config)
        except ValueError:
            then, now = {"config": saved}, {"config": config}
        diff = ", ".join(
            f"{k.replace('_', ' ') if k == 'world_size' else '--' + k.replace('_', '-')} "
            f"{then.get(k)!r} (this run: {now.get(k)!r})"
            for k in sorted(then.keys() | now.keys())
            if then.get(k) != now.get(k)
        )
        raise SystemExit(
            f"fsharding.train: --resume: {path} was saved by a run with {diff}; it would not "
            "continue that run. Resume with the same flags and world size, or pass another "
            "--save-dir to start afresh."
        )


def whole_params(args: argparse.Namespace, step: fs.Step, params: Any) -> dict | None:
    """The whole GPT's params (``step.gather``'ed): under ``--pipeline`` every stage's, sent
    to rank 0 (None on the other ranks; every rank must call it), else on every rank.

    Example:
        >>> args = parse_args([])
        >>> step = build_step(args, lambda p, b: (0, p), build_optimizer(args))
        >>> whole_params(args, step, {"w": torch.ones(2)})
        {'w': tensor([1., 1.])}
    """
    full = step.gather(params)
    if args.pipeline is None:
        return full
    parts = full if isinstance(full, list) else [full]
    mine = {k: fs.tree.local_tensor(v).detach().cpu() for part in parts for k, v in part.items()}
    rank, world = _world()
    got: list[Any] | None = [None] * world if rank == 0 else None
    # (other dp rows send their replica too: one collective, no group to build)
    torch.distributed.gather_object(mine if rank < args.pipeline else None, got, dst=0)
    if got is None:
        return None
    return {k: v for part in got[: args.pipeline] for k, v in part.items()}


def _from_rank0(args: argparse.Namespace, value: Any) -> Any:
    # under --pipeline rank 0 evaluates and samples: every rank returns its values
    if args.pipeline is None:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def evaluate(loss_fn: Callable[..., torch.Tensor], params: dict, batches: Iterable[dict]) -> float:
    """Mean of ``loss_fn(params, batch)`` over ``batches``.

    Example:
        >>> evaluate(lambda p, b: b * p, torch.tensor(2.0), [torch.tensor(1.0), torch.tensor(2.0)])
        3.0
    """
    losses = [float(loss_fn(params, b)) for b in batches]
    return sum(losses) / len(losses)


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _train_loop(
    args: argparse.Namespace,
    step: fs.Step,
    params: Any,
    opt_state: Any,
    batches: Iterator[dict],
    losses: torch.Tensor,
    start: int,
    save: Callable[[int, Any, Any], None] | None,
) -> tuple[Any, Any, float]:
    """Runs steps ``start, ..., args.steps - 1`` with a progress bar, writing each loss into
    ``losses`` and calling ``save(steps_done, params, opt_state)`` every ``--save-every``
    steps and after the last; returns ``(params, opt_state, tokens_per_s)``, tokens/s
    counted from this process's second step on (the first one warms up)."""
    bar = tqdm(
        range(start, args.steps),
        desc=f"train {args.preset}",
        initial=start,
        total=args.steps,
        disable=args.no_progress,
    )
    tokens, t0 = 0, math.nan
    for i in bar:
        batch = next(batches)
        # donate=True: the old params and opt_state are updated in place (one copy in memory)
        params, opt_state, metrics = step.step(params, opt_state, batch, donate=True)
        loss = float(metrics["loss"])
        losses[i] = loss
        if not math.isfinite(loss):
            raise FloatingPointError(f"fsharding.train: loss is {loss} at step {i}.")
        if i == start:
            t0 = time.perf_counter()
        else:
            tokens += batch["x"].numel() if isinstance(batch, dict) else batch[0].numel()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
        done = i + 1
        if save is not None and (done == args.steps or done % (args.save_every or args.steps) == 0):
            save(done, params, opt_state)
    tokens_per_s = tokens / (time.perf_counter() - t0) if tokens else float("nan")
    return params, opt_state, tokens_per_s


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the job; prints a summary and returns the final metrics (also ``--json``).

    Metrics: ``initial_val_loss``, ``train_loss`` (mean of the last 10 steps), ``val_loss``
    (the same fixed val batches), ``unigram_baseline`` (nats/byte), ``tokens_per_s`` (from
    the second step on), ``peak_rss_mib``, ``params_bytes``, ``opt_state_bytes``, the
    per-step ``losses`` (with ``--resume``: also those of the steps before, from the
    checkpoint), ``resumed_from`` (the checkpoint's step, or None), a generated ``sample``
    and timings.

    Example:
        >>> argv = ["--steps", "2", "--batch-size", "2", "--eval-batches", "1", "--no-progress"]
        >>> metrics = main(argv + ["--sample-len", "8"])  # doctest: +ELLIPSIS
        <BLANKLINE>
        tiny: ...
        >>> len(metrics["losses"])
        2
    """
    t_start = time.perf_counter()
    args = parse_args(argv)
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if args.pipeline is not None and "RANK" not in os.environ and not group:
        raise SystemExit(
            f"fsharding.train: --pipeline {args.pipeline} runs one stage per process; start it "
            f"with torchrun, e.g. `torchrun --nproc-per-node {args.pipeline} -m "
            f"fsharding.train --pipeline {args.pipeline}` (torchrun sets RANK and WORLD_SIZE; "
            f"{2 * args.pipeline} processes: 2 pipelines, data parallel). For one process, "
            "leave --pipeline out."
        )
    if args.zero is not None and "RANK" not in os.environ and not group:
        raise SystemExit(
            f"fsharding.train: --zero {args.zero} trains data parallel, one process per rank; "
            "start it with torchrun, e.g. `torchrun --nproc-per-node 2 -m fsharding.train "
            f"--zero {args.zero}` (torchrun sets RANK and WORLD_SIZE). For one process, "
            "leave --zero out."
        )
    distributed = args.zero is not None or args.pipeline is not None
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    corpus = data.load(args.data_bytes)
    model = build_model(args)
    seq_len = model.config.seq_len
    apply, params = build_apply(args, model)  # the whole model: evaluation and the sample
    loss_fn = make_loss_fn(apply)
    if args.pipeline is None:
        grad_fn = build_grad_fn(args, apply)
    else:  # this rank's stages only: the other stages' weights go below
        mesh = build_mesh(args)
        fns, params = build_stages(args, model, mesh)
        grad_fn = build_pipeline_grad_fn(args, fns, mesh)
    step = build_step(args, grad_fn, build_optimizer(args))
    if args.amp is not None:
        params = args.amp.cast_to_param(params)
    # params share storage with `model`, which is only used through `apply` from here on
    # (donation updates them in place).
    params, opt_state = step.init(params)
    if args.zero == 3 or args.pipeline is not None:
        # apply passes every param explicitly: drop the module's full replica (under
        # --pipeline: the other stages' weights, which `params` does not hold)
        model.to("meta")
    generator = seed_rng(args)  # after build_step: under torchrun the group is up
    losses = torch.zeros(args.steps, dtype=torch.float64)  # (fs.save refuses NaN)
    start, resumed = 0, None
    config = config_fingerprint(args)
    if args.resume:
        like = training_state(params, opt_state, 0, losses, generator, config)
        resumed = load_training_state(args.save_dir, like)
        del like
        if resumed is None:
            if rank == 0:
                print(f"fsharding.train: no checkpoint in {args.save_dir} yet: starting at step 0")
        else:
            params, opt_state = resumed.pop("params"), resumed.pop("opt_state")
            start, losses = resumed["step"], resumed["losses"]
            resume_rng(resumed, generator)  # the data position now; again before the loop
            model.to("meta")  # the module's initial weights: apply passes the loaded ones

    model.eval()  # no dropout while evaluating
    val_stream = corpus.batches(
        "val", args.batch_size, seq_len, torch.Generator().manual_seed(10_000 + args.seed)
    )
    val_batches = [next(val_stream) for _ in range(args.eval_batches)]
    full = whole_params(args, step, params)
    initial_val = _from_rank0(args, None if full is None else evaluate(loss_fn, full, val_batches))
    del full
    model.train()
    # Under --zero every rank draws its own batches (its share of the global batch); under
    # --pipeline every dp row (both inputs and targets: stage 0 reads x, the last stage y).
    train_stream = corpus.batches("train", args.batch_size, seq_len, generator)
    if args.pipeline is not None:
        train_stream = ((b["x"], b["y"]) for b in train_stream)
    first = next(train_stream)
    report = fs.memory_report(step, params, opt_state, first)
    reports = [report]
    if distributed and torch.distributed.is_initialized():  # (not for 1 rank)
        reports = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, report)
    args.no_progress = args.no_progress or rank != 0
    if resumed is not None:  # the memory report drew dropout masks: restore them last
        data_position = generator.get_state()
        resume_rng(resumed, generator)
        generator.set_state(data_position)  # (`first` was drawn: the position after it)

    def save(done: int, params: Any, opt_state: Any) -> None:
        # the data generator has drawn the batches of `done` steps (the stream is lazy)
        path = checkpoint_path(args.save_dir, done)
        fs.save(path, training_state(params, opt_state, done, losses, generator, config), step=done)
        if rank == 0 and not args.no_progress:
            tqdm.write(f"saved {path}")

    t_train = time.perf_counter()
    params, opt_state, tokens_per_s = _train_loop(
        args,
        step,
        params,
        opt_state,
        itertools.chain([first], train_stream),
        losses,
        start,
        save if args.save_dir is not None else None,
    )
    train_s = time.perf_counter() - t_train
    if args.export is not None:
        fs.export(args.export, params)  # every rank: each streams its own shards

    full = whole_params(args, step, params)
    model.eval()
    final = None
    if full is not None:
        sample_ids = generate(
            apply,
            full,
            data.encode("def "),
            args.sample_len,
            0.8,
            torch.Generator().manual_seed(args.seed),
        )
        final = {
            "params": sum(p.numel() for p in full.values()),
            "val_loss": evaluate(loss_fn, full, val_batches),
            "sample": data.decode(sample_ids),
        }
    final = _from_rank0(args, final)
    result = {
        "preset": args.preset,
        "params": final["params"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "initial_val_loss": initial_val,
        "train_loss": float(losses[-10:].mean()),
        "val_loss": final["val_loss"],
        "unigram_baseline": corpus.unigram_baseline(),
        "tokens_per_s": tokens_per_s,
        "train_s": train_s,
        "peak_rss_mib": _peak_rss_mib(),
        "params_bytes": fs.tree.nbytes(params),
        "opt_state_bytes": fs.tree.nbytes(opt_state),
        "saved_activations_bytes": report.saved_activations,
        "memory_reports": [str(r) for r in reports],
        "losses": losses.tolist(),
        "resumed_from": start if resumed is not None else None,
        "sample": final["sample"],
        "wall_s": time.perf_counter() - t_start,
    }
    if rank != 0:
        return result
    print(_summary(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _summary(r: dict[str, Any]) -> str:
    mib = 2**20
    return (
        f"\n{r['preset']}: {r['params']:,} params, {r['steps']} steps x {r['batch_size']} x "
        f"{r['seq_len']} tokens\n"
        f"loss    train {r['train_loss']:.3f}  val {r['val_loss']:.3f}  (unigram baseline "
        f"{r['unigram_baseline']:.3f}, val at init {r['initial_val_loss']:.3f}; nats/byte)\n"
        f"speed   {r['tokens_per_s']:,.0f} tokens/s  ({r['train_s']:.1f} s training, "
        f"{r['wall_s']:.1f} s in main)\n"
        f"memory  peak RSS {r['peak_rss_mib']:.0f} MiB; params {r['params_bytes'] / mib:.1f} "
        f"MiB, optimizer state {r['opt_state_bytes'] / mib:.1f} MiB, saved activations "
        f"{r['saved_activations_bytes'] / mib:.1f} MiB per step\n"
        + "".join(f"rank {i}: {rep}\n" for i, rep in enumerate(r["memory_reports"]))
        + f"sample  (temperature 0.8)\n{r['sample']}"
    )


if __name__ == "__main__":
    main()
