"""Optimizers as chains of transforms, with optax's names, arguments and defaults.

=========  ==========================================================================
alias      chain
=========  ==========================================================================
``sgd``    ``trace(momentum, nesterov)`` (if momentum) → ``scale_by_learning_rate``
``adam``   ``scale_by_adam`` → ``scale_by_learning_rate``
``adamw``  ``scale_by_adam`` → ``add_decayed_weights(mask)`` → ``scale_by_learning_rate``
``lion``   ``scale_by_lion`` → ``add_decayed_weights(mask)`` → ``scale_by_learning_rate``
``lamb``   ``scale_by_adam`` → ``add_decayed_weights(mask)`` → ``scale_by_trust_ratio``
           → ``scale_by_learning_rate``
=========  ==========================================================================

The state is the chain's tuple of states. ``adam`` and ``adamw`` compute the same chain in
one fused pass per (device, dtype) group — torch's fused Adam kernel on CPU and CUDA, else
``torch._foreach_*`` ops (see ``fsharding.optim._fused``) — with one new buffer (the
updates) and, under ``optim.donation()``, the moments updated in place; they give the
unfused chain's values up to rounding.

Weight decay is decoupled and multiplied by the learning rate (optax): ``adamw``'s update is
``-lr * (adam_direction + weight_decay * params)``, which equals ``torch.optim.AdamW``'s.
"""

from __future__ import annotations

from typing import Any

from fsharding.optim import _checks
from fsharding.optim import _moments as _m
from fsharding.optim import _transforms as _t
from fsharding.optim._fused import fused_adam as _fused_adam
from fsharding.optim.base import GradientTransformation, chain, identity

__all__ = ["adam", "adamw", "lamb", "lion", "sgd"]

PyTree = Any
Schedule = _t.Schedule


def _recipe(tx: GradientTransformation, **fields: Any) -> GradientTransformation:
    """Records how ``tx`` was built, for ``optim.to_torch_state_dict`` and its kin."""
    tx.update.torch_recipe = fields  # type: ignore[attr-defined]
    return tx


def _named(tx: GradientTransformation, api: str) -> GradientTransformation:
    """The alias's name in the chain's own error messages."""
    tx.update.api = api  # type: ignore[attr-defined]
    return tx


def sgd(
    learning_rate: float | Schedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    Equals ``torch.optim.SGD(lr, momentum=momentum or 0, nesterov=nesterov)`` with
    ``dampening=0`` (torch's default) to rounding. optax's ``trace`` starts from a zero buffer
    where torch starts from the first gradient; the first step is the same.

    Args:
        learning_rate: a float >= 0 or a schedule.
        momentum: the momentum coefficient (None: plain SGD).
        nesterov: Nesterov momentum (needs ``momentum``).
        accumulator_dtype: the dtype of the momentum buffer (``optim.trace``'s; None: the
            params' dtype).

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.sgd(0.1, momentum=0.9)
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> u["w"].tolist()
        [-0.10000000149011612]
    """
    api = "optim.sgd"
    lr = _checks.learning_rate(api, learning_rate)
    if momentum is not None:
        _checks.non_negative(api, momentum=momentum)
    acc = _checks.dtype_arg(api, "accumulator_dtype", accumulator_dtype)
    first = (
        identity()
        if momentum is None
        else _m.trace(momentum, nesterov=nesterov, accumulator_dtype=acc)
    )
    tx = _named(chain(first, _t.scale_by_learning_rate(lr)), api)
    return _recipe(
        tx, kind="sgd", lr=lr, momentum=momentum, nesterov=bool(nesterov), state_dtype=acc
    )


def adam(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
) -> GradientTransformation:
    """Adam (Kingma & Ba), optax's formulas and defaults.

    Equals ``torch.optim.Adam(lr, betas=(b1, b2), eps=eps)`` to rounding (same defaults;
    torch has no ``eps_root``).

    Args:
        learning_rate: a float >= 0 or a schedule.
        b1: first-moment decay, in [0, 1).
        b2: second-moment decay, in [0, 1).
        eps: added outside the square root, >= 0.
        eps_root: added inside the square root, >= 0.
        mu_dtype: the dtype of the first moment (``scale_by_adam``'s; None: the params').

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.adam(0.1)
        >>> p = {"w": torch.ones(2)}
        >>> u, s = tx.update({"w": torch.tensor([1.0, -2.0])}, tx.init(p), p)
        >>> [round(x, 4) for x in u["w"].tolist()]
        [-0.1, 0.1]
    """
    api = "optim.adam"
    lr = _checks.learning_rate(api, learning_rate)
    mu_dtype = _checks.dtype_arg(api, "mu_dtype", mu_dtype)
    _checks.betas(api, b1=b1, b2=b2)
    _checks.non_negative(api, eps=eps, eps_root=eps_root)
    tx = _named(
        chain(
            _m.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype),
            _t.scale_by_learning_rate(lr),
        ),
        api,
    )
    fused = _fused_adam(tx, lr, b1, b2, eps, eps_root, 0.0, None, api)
    return _recipe(
        fused,
        kind="adam",
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        state_dtype=mu_dtype,
    )


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 1e-4,
    mask: Any = None,
) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter), optax's formulas and defaults.

    The update is ``-lr * (mu_hat / (sqrt(nu_hat + eps_root) + eps) + weight_decay * p)``,
    which equals ``torch.optim.AdamW(lr, betas=(b1, b2), eps=eps,
    weight_decay=weight_decay)`` to rounding. **Defaults differ:** optax's (and this)
    ``weight_decay`` is ``1e-4``, torch AdamW's is ``1e-2``.

    Args:
        learning_rate: a float >= 0 or a schedule.
        b1: first-moment decay, in [0, 1).
        b2: second-moment decay, in [0, 1).
        eps: added outside the square root, >= 0.
        eps_root: added inside the square root, >= 0.
        mu_dtype: the dtype of the first moment (``scale_by_adam``'s; None: the params').
        weight_decay: decoupled decay coefficient (times the learning rate), >= 0.
        mask: which params decay: a pytree of bools like params (or a prefix), or a callable
            ``params -> such a tree``; e.g. ``lambda p: {k: v.ndim > 1 for k, v in
            p.items()}`` leaves biases and norms undecayed.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.adamw(0.1, weight_decay=0.5)
        >>> p = {"w": torch.ones(1)}
        >>> u, s = tx.update({"w": torch.ones(1)}, tx.init(p), p)
        >>> round(u["w"].item(), 4)  # -0.1 * (1 + 0.5 * 1)
        -0.15
    """
    api = "optim.adamw"
    lr = _checks.learning_rate(api, learning_rate)
    mu_dtype = _checks.dtype_arg(api, "mu_dtype", mu_dtype)
    _checks.betas(api, b1=b1, b2=b2)
    _checks.non_negative(api, eps=eps, eps_root=eps_root, weight_decay=weight_decay)
    _checks.check_mask(api, mask)
    tx = chain(
        _m.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype),
        _t.add_decayed_weights(weight_decay, mask),
        _t.scale_by_learning_rate(lr),
    )
    tx = _named(tx, api)
    fused = _fused_adam(tx, lr, b1, b2, eps, eps_root, weight_decay, mask, api)
    return _recipe(
        fused,
        kind="adamw",
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
        mask=mask,
        state_dtype=mu_dtype,
    )


def lion(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Any = None,
) -> GradientTransformation:
    """Lion (Chen et al. 2023): ``-lr * (sign(b1 mu + (1 - b1) g) + weight_decay * p)``,
    then ``mu = b2 mu + (1 - b2) g``; optax's defaults.

    Args:
        learning_rate: a float >= 0 or a schedule (typically 3-10x smaller than AdamW's).
        b1: interpolation for the update direction, in [0, 1).
        b2: momentum decay, in [0, 1).
        weight_decay: decoupled decay coefficient (times the learning rate), >= 0.
        mask: which params decay, as in :func:`adamw`.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.lion(0.1, weight_decay=0.0)
        >>> p = {"w": torch.ones(2)}
        >>> tx.update({"w": torch.tensor([3.0, -0.1])}, tx.init(p), p)[0]["w"].tolist()
        [-0.10000000149011612, 0.10000000149011612]
    """
    api = "optim.lion"
    lr = _checks.learning_rate(api, learning_rate)
    _checks.betas(api, b1=b1, b2=b2)
    _checks.non_negative(api, weight_decay=weight_decay)
    _checks.check_mask(api, mask)
    tx = chain(
        _m.scale_by_lion(b1, b2),
        _t.add_decayed_weights(weight_decay, mask),
        _t.scale_by_learning_rate(lr),
    )
    return _named(tx, api)


def lamb(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """LAMB (You et al. 2020): Adam's direction plus decoupled decay, rescaled per leaf by
    the trust ratio ``|p| / |direction|``, times ``-lr``; optax's defaults (``eps=1e-6``).

    Args:
        learning_rate: a float >= 0 or a schedule.
        b1: first-moment decay, in [0, 1).
        b2: second-moment decay, in [0, 1).
        eps: added outside the square root, >= 0.
        eps_root: added inside the square root, >= 0.
        weight_decay: decoupled decay coefficient, >= 0.
        mask: which params decay, as in :func:`adamw`.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.lamb(0.1)
        >>> p = {"w": torch.tensor([3.0, 4.0])}
        >>> u, _ = tx.update({"w": torch.tensor([1.0, 1.0])}, tx.init(p), p)
        >>> [round(x, 4) for x in u["w"].tolist()]  # |u| = lr * |p|
        [-0.3536, -0.3536]
    """
    api = "optim.lamb"
    lr = _checks.learning_rate(api, learning_rate)
    _checks.betas(api, b1=b1, b2=b2)
    _checks.non_negative(api, eps=eps, eps_root=eps_root, weight_decay=weight_decay)
    _checks.check_mask(api, mask)
    tx = chain(
        _m.scale_by_adam(b1, b2, eps, eps_root),
        _t.add_decayed_weights(weight_decay, mask),
        _t.scale_by_trust_ratio(),
        _t.scale_by_learning_rate(lr),
    )
    return _named(tx, api)
