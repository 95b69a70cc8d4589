"""Optimizers: optax's data model on torch tensors.

``GradientTransformation(init, update)`` pairs of pure functions, composed with ``chain``;
each transform's state is its own NamedTuple; aliases (``adamw``, ``sgd``, ...) are chains
with optax's names, formulas and defaults; schedules are functions ``step -> float``;
wrappers ``apply_if_finite``, ``masked``, ``MultiSteps`` and ``inject_hyperparams`` as in
optax. Every update checks each leaf's shape against the state and params before any
kernel runs, and every decision over all the grads is agreed by the ranks holding shards
(``optim.base.agree``). ``to_torch_state_dict`` / ``from_torch_state_dict`` convert
Adam/AdamW/SGD state to and from ``torch.optim`` state dicts.

This package is the public API of optimizers: use ``optim.<name>``. Where things live:
``base`` (public: the data model, ``apply_updates``, donation, ``global_norm`` and the
``sharded_norm`` / ``agree`` protocol of sharded steps); the private homes ``_transforms``
(scale, weight decay, trust ratio), ``_moments`` (adam, lion, momentum), ``_clipping``,
``_wrappers``, ``_inject``, ``_aliases`` (+ ``_fused``: adam/adamw in one pass),
``_schedules``, ``_torch_compat``, and the helpers every transform uses, ``_leaves`` (running
over the trees' leaves) and ``_checks`` (constructor argument checks). ``master_weights``
and ``offload`` are what ``fs.amp(optimizer)`` and ``fs.offload(optimizer)`` build.

Example:
    >>> import torch
    >>> from fsharding import optim
    >>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    >>> params = {"w": torch.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": torch.ones(3)}, state, params)
    >>> params = optim.apply_updates(params, updates)
"""

from fsharding.optim._aliases import adam, adamw, lamb, lion, sgd
from fsharding.optim._clipping import clip, clip_by_global_norm
from fsharding.optim._inject import InjectHyperparamsState, inject_hyperparams
from fsharding.optim._moments import (
    ScaleByAdamState,
    ScaleByLionState,
    TraceState,
    scale_by_adam,
    scale_by_lion,
    trace,
)
from fsharding.optim._schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    warmup_cosine_decay_schedule,
)
from fsharding.optim._torch_compat import (
    from_torch_state_dict,
    to_torch_state_dict,
    torch_optimizer,
)
from fsharding.optim._transforms import (
    ScaleByScheduleState,
    ScaleByTrustRatioState,
    add_decayed_weights,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    scale_by_trust_ratio,
)
from fsharding.optim._wrappers import (
    ApplyIfFiniteState,
    MaskedNode,
    MaskedState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    masked,
    skip_large_updates,
    skip_not_finite,
)
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
    # data model
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
    # transforms and their states
    "ApplyIfFiniteState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByScheduleState",
    "ScaleByTrustRatioState",
    "TraceState",
    "add_decayed_weights",
    "apply_if_finite",
    "clip",
    "clip_by_global_norm",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_schedule",
    "scale_by_trust_ratio",
    "trace",
    # wrappers
    "InjectHyperparamsState",
    "MaskedNode",
    "MaskedState",
    "MultiSteps",
    "MultiStepsState",
    "inject_hyperparams",
    "masked",
    "skip_large_updates",
    "skip_not_finite",
    # aliases
    "adam",
    "adamw",
    "lamb",
    "lion",
    "sgd",
    # schedules
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "warmup_cosine_decay_schedule",
    # torch.optim interop
    "from_torch_state_dict",
    "to_torch_state_dict",
    "torch_optimizer",
]
