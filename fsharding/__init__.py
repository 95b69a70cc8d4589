"""fsharding: JAX-style functional sharding for PyTorch.

DeepSpeed's memory and parallelism techniques as pure function transforms over explicit
parameter pytrees, composed by nesting::

    import fsharding as fs
    from fsharding import optim

    apply, params = fs.functional(model)
    grad_fn = fs.value_and_grad(lambda p, b: loss(apply(p, b["x"]), b["y"]))
    step = fs.train_step(grad_fn, optim.adamw(3e-4))
    params, opt_state = step.init(params)
    params, opt_state, metrics = step.step(params, opt_state, batch)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The core is imported eagerly. (`from fsharding.functional import functional` also makes
# `fs.functional` the function, not the submodule of the same name.)
from fsharding import optim, tree
from fsharding.functional import functional, grad, value_and_grad
from fsharding.launch import LaunchError, launch
from fsharding.step import Step, TrainState, train_step
from fsharding.tree import all_finite

# Public name -> the module that defines it. Names are resolved on first access (PEP 562),
# so importing fsharding stays cheap and a heavy subsystem loads only when used.
_EXPORTS: dict[str, str] = {
    # pytrees and the functional core
    "tree": "fsharding.tree",
    "all_finite": "fsharding.tree",
    "functional": "fsharding.functional",
    "value_and_grad": "fsharding.functional",
    "grad": "fsharding.functional",
    # training steps
    "Step": "fsharding.step",
    "TrainState": "fsharding.step",
    "train_step": "fsharding.step",
    # memory transforms
    "remat": "fsharding.transforms.remat",
    "checkpoint_name": "fsharding.transforms.remat",
    "policies": "fsharding.transforms.policies",
    "print_saved_activations": "fsharding.introspect",
    "saved_activations": "fsharding.introspect",
    "offload": "fsharding.transforms.offload",
    "accumulate": "fsharding.transforms.accumulate",
    "Policy": "fsharding.transforms.amp",
    "amp": "fsharding.transforms.amp",
    "LossScale": "fsharding.transforms.loss_scale",
    "DynamicLossScale": "fsharding.transforms.loss_scale",
    "StaticLossScale": "fsharding.transforms.loss_scale",
    "NoOpLossScale": "fsharding.transforms.loss_scale",
    # meshes and SPMD
    "Mesh": "fsharding.mesh",
    "P": "fsharding.mesh",
    "from_local": "fsharding.mesh",
    "launch": "fsharding.launch",
    "LaunchError": "fsharding.launch",
    "psum": "fsharding.collectives",
    "pmean": "fsharding.collectives",
    "pmax": "fsharding.collectives",
    "all_gather": "fsharding.collectives",
    "psum_scatter": "fsharding.collectives",
    "ppermute": "fsharding.collectives",
    "axis_index": "fsharding.collectives",
    "axis_size": "fsharding.collectives",
    "shard": "fsharding.transforms.shard",
    "gather": "fsharding.transforms.gather",
    "zero": "fsharding.transforms.zero",
    "memory_report": "fsharding.memory",
    # optimizers (also importable as `from fsharding import optim`)
    "optim": "fsharding.optim",
}

_MODULES = {"tree", "optim", "policies"}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fsharding' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
