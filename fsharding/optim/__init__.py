"""Optimizers: optax's data model on torch tensors (see ``fsharding.optim.base``)."""

from fsharding.optim.base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    apply_updates_,
    chain,
    donating,
    donation,
    global_norm,
    identity,
    learning_rate,
)

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "apply_updates",
    "apply_updates_",
    "chain",
    "donating",
    "donation",
    "global_norm",
    "identity",
    "learning_rate",
]
