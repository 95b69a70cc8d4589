"""Small reference models (the GPT of the main job ``python -m fsharding.train``)."""

from fsharding.models.gpt import (
    GPT,
    PRESETS,
    Block,
    GPTConfig,
    GPTStage,
    decay_mask,
    generate,
    split_gpt,
)

__all__ = [
    "GPT",
    "Block",
    "GPTConfig",
    "GPTStage",
    "PRESETS",
    "decay_mask",
    "generate",
    "split_gpt",
]
