"""Small reference models (the GPT of the main job ``python -m fsharding.train``)."""

from fsharding.models.gpt import GPT, PRESETS, Block, GPTConfig, decay_mask, generate

__all__ = ["GPT", "Block", "GPTConfig", "PRESETS", "decay_mask", "generate"]
