"""Clipping transforms: ``clip`` (element-wise) and ``clip_by_global_norm`` (optax formulas).

Both are stateless (state ``EmptyState``) and sync-free: ``clip_by_global_norm`` chooses
between the unchanged and the rescaled updates on the device, so a step never waits for the
norm on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from fsharding.optim import _checks, _leaves
from fsharding.optim.base import EmptyState, GradientTransformation, global_norm

__all__ = ["clip", "clip_by_global_norm"]

PyTree = Any


def clip(max_delta: float) -> GradientTransformation:
    """Clips every update element to ``[-max_delta, max_delta]``.

    Args:
        max_delta: the bound, >= 0.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.clip(1.0)
        >>> tx.update({"w": torch.tensor([-3.0, 0.5, 2.0])}, tx.init({}))[0]["w"].tolist()
        [-1.0, 0.5, 1.0]
    """
    api = "optim.clip"
    bound = _checks.number(api, "max_delta", max_delta, lo=0.0)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def fn(g: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
        g = _leaves.first("clamp_min", donate, g, -bound)
        torch._foreach_clamp_max_(g, bound)
        return g

    @torch.no_grad()
    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        return _leaves.map_updates(updates, api, fn), state

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescales all updates together so their global L2 norm is at most ``max_norm``.

    optax's rule: with ``g = global_norm(updates)``, each update becomes ``u`` if
    ``g < max_norm`` else ``(u / g) * max_norm``. The norm counts every floating leaf once
    (a DTensor leaf by its global value). Place it first in a chain to clip raw gradients
    (DeepSpeed's ``gradient_clipping``).

    Args:
        max_norm: the largest allowed global norm, >= 0.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.clip_by_global_norm(1.0)
        >>> u = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
        >>> tx.update(u, tx.init(u))[0]
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
    """
    api = "optim.clip_by_global_norm"
    limit = _checks.number(api, "max_norm", max_norm, lo=0.0)

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    @torch.no_grad()
    def update(updates: PyTree, state: EmptyState, params: PyTree = None):
        _leaves.flatten(updates, api, "updates")  # the leaf check, with paths
        norm = global_norm(updates)
        keep = norm < limit
        # (u / denom) * mult is u exactly when keep, else (u / norm) * max_norm (no sync).
        denom = torch.where(keep, torch.ones_like(norm), norm)
        mult = torch.where(keep, torch.ones_like(norm), torch.full_like(norm, limit))
        per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def fn(g: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
            dev = g[0].device
            if dev not in per_device:
                per_device[dev] = (denom.to(dev), mult.to(dev))
            d, m = per_device[dev]
            g = _leaves.first("div", donate, g, d.to(g[0].dtype))
            torch._foreach_mul_(g, m.to(g[0].dtype))
            return g

        return _leaves.map_updates(updates, api, fn), state

    update.elementwise = False  # needs the whole tree
    return GradientTransformation(init, update)
