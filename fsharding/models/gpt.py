"""A small GPT (pre-LN decoder-only transformer): the reference model of the main job.

``GPT(GPTConfig.preset("small"))`` is the workload of ``ANCHORS.md`` (10,893,312 params):
byte vocabulary, learned position embeddings, pre-LN blocks with
``F.scaled_dot_product_attention(is_causal=True)`` and a 4x GELU MLP, a final LayerNorm and
an untied output head. Transforms reach each block through
``fs.functional(model, wrap={Block: transform})``; :func:`generate` samples through the
functional ``apply`` so it works on any params tree (trained, gathered, cast).
:func:`split_gpt` cuts a GPT into pipeline stages (:class:`GPTStage` modules sharing its
weights) for ``fs.pipeline``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPTConfig",
    "PRESETS",
    "GPT",
    "Block",
    "GPTStage",
    "split_gpt",
    "generate",
    "decay_mask",
]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`; immutable and validated.

    Attributes:
        vocab_size: number of token ids (256 for bytes).
        seq_len: the longest sequence (size of the position embedding).
        d_model: width of the residual stream.
        n_layers: number of :class:`Block` s.
        n_heads: attention heads; must divide ``d_model``.
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        dropout: dropout on attention weights and residual branches (0.0: none, and the
            model draws no random numbers).

    Example:
        >>> GPTConfig.preset("small").d_model
        384
        >>> GPTConfig.preset("tiny").with_(n_layers=1).n_layers
        1
    """

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig: n_heads={self.n_heads} must divide d_model={self.d_model}; pick "
                "a head count that divides the width."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}.")

    @classmethod
    def preset(cls, name: str) -> GPTConfig:
        """The named preset from :data:`PRESETS` (``"tiny"`` or ``"small"``).

        Raises:
            ValueError: unknown name (the message lists the presets).
        """
        if name not in PRESETS:
            raise ValueError(
                f"GPTConfig.preset: unknown preset {name!r}; valid presets: {sorted(PRESETS)}."
            )
        return PRESETS[name]

    def with_(self, **changes: Any) -> GPTConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, GPTConfig] = {
    # ANCHORS.md's reference workload: 10,893,312 params.
    "small": GPTConfig(),
    # The main job's default: learns visibly in well under two minutes on 2 CPU cores.
    "tiny": GPTConfig(seq_len=64, d_model=128, n_layers=2, n_heads=4),
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """``Linear -> GELU -> Linear`` with hidden width ``mlp_ratio * d_model``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    The unit per-block transforms select: ``fs.functional(model, wrap={Block: t})``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A decoder-only transformer: ``ids [B, T] -> logits [B, T, vocab_size]``.

    Parameters are initialised like GPT-2 — normal(0, 0.02) weights, zero biases, residual
    output projections scaled by ``1/sqrt(2 * n_layers)`` — from a private generator seeded
    with ``seed`` (the global RNG is untouched).

    Args:
        config: the model shape; see :class:`GPTConfig` and :data:`PRESETS`.
        seed: initialisation seed.
        device: where the parameters live (default CPU). ``"meta"`` allocates nothing and
            skips initialisation: materialise later with ``to_empty(device=...)`` and
            ``reset_parameters(seed)`` (same values as a direct build with that seed).

    Example:
        >>> model = GPT(GPTConfig.preset("tiny"))
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 256])
    """

    def __init__(
        self, config: GPTConfig, *, seed: int = 0, device: torch.device | str | None = None
    ):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(
                f"GPT: config must be a GPTConfig, got {type(config).__name__}; use "
                "GPTConfig.preset('tiny') or GPTConfig(...)."
            )
        self.config = config
        # Built on the meta device: no throwaway default init, no global RNG draws.
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        device = torch.device("cpu" if device is None else device)
        if device.type != "meta":  # meta: shapes only; to_empty() + reset_parameters() later
            self.to_empty(device=device)
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Re-initialises every parameter like GPT-2, deterministically from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(".proj") else 0.02  # attn.proj, mlp.proj
                w = module.weight
                # Drawn on CPU from the private generator: any device gets the same values.
                w.copy_(torch.empty(w.shape, dtype=w.dtype).normal_(0.0, std, generator=g))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = _embed(self, ids, "GPT.forward")
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _embed(model: nn.Module, ids: torch.Tensor, api: str) -> torch.Tensor:
    """Token plus position embeddings of ``ids`` (with dropout): the start of a GPT's
    forward, shared by :class:`GPT` and its first :class:`GPTStage`."""
    if (
        not isinstance(ids, torch.Tensor)
        or ids.ndim != 2
        or ids.dtype
        not in (
            torch.int32,
            torch.int64,
        )
    ):
        got = (
            f"{ids.dtype} of shape {tuple(ids.shape)}"
            if isinstance(ids, torch.Tensor)
            else (type(ids).__name__)
        )
        raise ValueError(f"{api}: ids must be an integer tensor of shape [batch, time], got {got}.")
    t = ids.shape[1]
    seq_len = model.pos_emb.num_embeddings
    if t > seq_len:
        raise ValueError(
            f"{api}: sequence length {t} exceeds config.seq_len={seq_len}; crop the input "
            "(generate() keeps the last seq_len ids)."
        )
    pos = torch.arange(t, device=ids.device)
    return model.drop(model.tok_emb(ids) + model.pos_emb(pos))


class GPTStage(nn.Module):
    """One pipeline stage of a :class:`GPT`: a contiguous run of its blocks, after the
    embeddings on the first stage and before the final LayerNorm and the head on the last.

    Built by :func:`split_gpt`. A stage holds the GPT's own submodules (no copy), so its
    parameters are the model's tensors under the model's names (``"tok_emb.weight"``,
    ``"blocks.3.attn.qkv.weight"``, ``"head.weight"``): the stages' params together are the
    model's, each once, and a checkpoint of the stages is one of the model. Its blocks are
    the model's :class:`Block` s, so ``fs.functional(stage, wrap={Block: ...})`` applies
    per-block transforms (``fs.remat``, ``fs.gather``) as on the whole model.

    ``forward(x)``: the first stage takes ids ``[B, T]`` (as :class:`GPT`), the others the
    residual stream ``[B, T, d_model]``; the last returns logits ``[B, T, vocab_size]``,
    the others the residual stream.

    Attributes:
        first: whether this stage embeds the ids.
        last: whether this stage ends with the final LayerNorm and the head.
        layers: the indices of its blocks in the model.
    """

    def __init__(self, model: GPT, layers: range, *, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.first, self.last, self.layers = first, last, layers
        if first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        # keyed by the model's block index: parameter names are the model's
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = _embed(self, x, "GPTStage.forward")
        for block in self.blocks.values():
            x = block(x)
        if self.last:
            x = self.head(self.ln_f(x))
        return x


def split_gpt(model: GPT, n: int, *, layers: Sequence[int] | None = None) -> list[GPTStage]:
    """Cuts ``model`` into ``n`` pipeline stages (modules sharing its weights).

    Stage 0 holds the embeddings and its first blocks, the middle stages blocks only, the
    last stage its last blocks, the final LayerNorm and the head; ``stage[n-1](...stage[0](
    ids))`` is ``model(ids)`` (the same operations in the same order: equal bits). The GPT's
    head is untied (no weight is shared between stages). For ``fs.pipeline`` take each
    stage's ``apply, params = fs.functional(stage)``: the stage functions are the applies,
    rank ``r`` passes the params of its stage(s). A rank that keeps only its own stage (and
    drops ``model`` and the other stages) holds only that stage's weights.

    Args:
        model: the :class:`GPT` to split.
        n: the number of stages (``mesh.shape["pp"] * virtual_stages`` of the pipeline).
        layers: the number of blocks of each stage (``n`` ints summing to
            ``config.n_layers``; the first and last stage may have 0). Default: as even as
            possible, the extra blocks on the last stages (under 1F1B stage ``s`` holds
            ``p - s`` microbatches' activations, so later stages have memory to spare).

    Returns:
        The ``n`` :class:`GPTStage` s, in order.

    Raises:
        TypeError: ``model`` is not a :class:`GPT`, ``n`` or ``layers`` not ints.
        ValueError: ``n < 1``; more stages than blocks (default ``layers``); ``layers`` of
            another length or sum, negative, or leaving a middle stage without blocks.

    Example:
        >>> import fsharding as fs
        >>> model = GPT(GPTConfig.preset("tiny").with_(n_layers=3))
        >>> stages = split_gpt(model, 2)
        >>> [list(s.layers) for s in stages]
        [[0], [1, 2]]
        >>> (apply0, p0), (apply1, p1) = fs.functional(stages[0]), fs.functional(stages[1])
        >>> sorted(p0)[:2], sorted(p1)[-2:]
        (['blocks.0.attn.proj.bias', 'blocks.0.attn.proj.weight'], ['ln_f.bias', 'ln_f.weight'])
        >>> ids = torch.zeros(2, 5, dtype=torch.long)
        >>> torch.equal(apply1(p1, apply0(p0, ids)), model(ids))
        True
    """
    if not isinstance(model, GPT):
        raise TypeError(f"split_gpt: model must be a GPT, got {type(model).__name__}.")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"split_gpt: n must be an int >= 1 (the stage count), got {n!r}.")
    if n < 1:
        raise ValueError(f"split_gpt: n must be >= 1 (the stage count), got {n}.")
    total = model.config.n_layers
    if layers is None:
        if n > total:
            raise ValueError(
                f"split_gpt: {n} stages but the model has {total} blocks; use at most {total} "
                f"stages, or pass layers= (n counts summing to {total}; only the first and "
                "last stage may have 0 blocks)."
            )
        layers = [total // n + (s >= n - total % n) for s in range(n)]
    else:
        layers = list(layers)
        if any(isinstance(k, bool) or not isinstance(k, int) for k in layers):
            raise TypeError(f"split_gpt: layers must be a sequence of ints, got {layers!r}.")
        if len(layers) != n or sum(layers) != total or min(layers) < 0:
            raise ValueError(
                f"split_gpt: layers must be {n} counts >= 0 (one per stage) summing to the "
                f"model's {total} blocks, got {layers}."
            )
        empty = [s for s in range(1, n - 1) if layers[s] == 0]
        if empty:
            raise ValueError(
                f"split_gpt: layers={layers} leaves middle stage {empty[0]} without blocks "
                "(it would have no params); give every middle stage at least one block."
            )
    stages, start = [], 0
    for s, k in enumerate(layers):
        stages.append(GPTStage(model, range(start, start + k), first=s == 0, last=s == n - 1))
        start += k
    return stages


def decay_mask(params: Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """Which params get weight decay: matrix weights of Linear layers only.

    Biases, LayerNorm weights and the embeddings are not decayed (GPT-2 / nanoGPT practice).
    Pass as ``optim.adamw(..., mask=decay_mask(params))``.

    Example:
        >>> import fsharding as fs
        >>> apply, params = fs.functional(GPT(GPTConfig.preset("tiny")))
        >>> m = decay_mask(params)
        >>> m["blocks.0.attn.qkv.weight"], m["blocks.0.attn.qkv.bias"], m["tok_emb.weight"]
        (True, False, False)
    """
    return {
        name: p.ndim >= 2 and not name.startswith(("tok_emb.", "pos_emb."))
        for name, p in params.items()
    }


@torch.no_grad()
def generate(
    apply: Callable[..., torch.Tensor],
    params: Mapping[str, torch.Tensor],
    prompt_ids: torch.Tensor,
    n: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples ``n`` tokens after ``prompt_ids`` through a functional ``apply``.

    The context is cropped to the last ``seq_len`` ids (the size of ``pos_emb.weight``).

    Args:
        apply: from ``fs.functional(GPT(...))``.
        params: the params to sample with.
        prompt_ids: integer ids, shape ``[T]`` or ``[B, T]`` with ``T >= 1``.
        n: number of tokens to append.
        temperature: softmax temperature; ``0`` picks the most likely token (greedy).
        generator: random generator for sampling (reproducible samples).

    Returns:
        The prompt followed by ``n`` sampled ids, with the prompt's number of dims.

    Example:
        >>> import fsharding as fs
        >>> apply, params = fs.functional(GPT(GPTConfig.preset("tiny")))
        >>> generate(apply, params, torch.tensor([1, 2]), 3, temperature=0.0).shape
        torch.Size([5])
    """
    if prompt_ids.ndim not in (1, 2) or prompt_ids.shape[-1] < 1:
        raise ValueError(
            "generate: prompt_ids must have shape [T] or [B, T] with T >= 1, got "
            f"{tuple(prompt_ids.shape)}."
        )
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}.")
    seq_len = params["pos_emb.weight"].shape[0]
    ids = prompt_ids.long().reshape(-1, prompt_ids.shape[-1])
    for _ in range(n):
        logits = apply(params, ids[:, -seq_len:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids.reshape(*prompt_ids.shape[:-1], -1)
