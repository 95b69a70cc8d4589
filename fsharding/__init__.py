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

Everything public is re-exported here (``__all__``); nothing else is public. Where things
live, lowest layer first (a module imports only from the layers below it; the rules are
import-linter contracts in ``pyproject.toml``):

==========================  ============================================================
``tree``, ``_context``      pytree helpers (the one storage-identity and DTensor checks);
                            every ambient channel (ContextVar) between layers, declared
``precision``               ``Policy`` and the loss scales (jmp's two halves)
``optim/``                  optax on torch tensors; ``master_weights`` (``fs.amp`` on an
                            optimizer), ``offload`` (``fs.offload`` on an optimizer)
``functional``              ``functional``, ``value_and_grad``, ``grad``
``transforms/``             one process: ``remat`` + ``policies``, ``offload``, ``amp``,
                            ``accumulate``
``step``                    ``Step``, ``TrainState``, ``train_step``: the update tail that
                            every step shares
``parallel/``               SPMD: ``mesh``, ``launch``, ``collectives``, ``shard``,
                            ``gather``, ``zero``, ``pipeline``
``serialization``,         ``save``, ``load``, ``latest``, ``CheckpointError``, ``export``:
``memory``, ``introspect``  state on disk; ``memory_report``, ``print_saved_activations``
``models/``, ``data``       the reference GPT and the bundled corpus (import nothing above)
``train``                   the main job, ``python -m fsharding.train``
==========================  ============================================================
"""

from __future__ import annotations

__version__ = "0.1.0"

# `from fsharding.functional import functional` (like launch) also makes `fs.functional`
# the function rather than the submodule of the same name.
from fsharding import optim, tree
from fsharding.functional import functional, grad, value_and_grad
from fsharding.introspect import print_saved_activations, saved_activations
from fsharding.memory import memory_report
from fsharding.parallel.collectives import (
    all_gather,
    axis_index,
    axis_size,
    pmax,
    pmean,
    ppermute,
    psum,
    psum_scatter,
)
from fsharding.parallel.gather import gather
from fsharding.parallel.launch import LaunchError, launch
from fsharding.parallel.mesh import Mesh, P, from_local
from fsharding.parallel.pipeline import pipeline
from fsharding.parallel.shard import shard
from fsharding.parallel.zero import zero
from fsharding.precision import (
    DynamicLossScale,
    LossScale,
    NoOpLossScale,
    Policy,
    StaticLossScale,
)
from fsharding.serialization import CheckpointError, export, latest, load, save
from fsharding.step import Step, TrainState, train_step
from fsharding.transforms import policies
from fsharding.transforms.accumulate import accumulate
from fsharding.transforms.amp import amp
from fsharding.transforms.offload import offload
from fsharding.transforms.remat import checkpoint_name, remat
from fsharding.tree import all_finite

__all__ = [
    "CheckpointError",
    "DynamicLossScale",
    "LaunchError",
    "LossScale",
    "Mesh",
    "NoOpLossScale",
    "P",
    "Policy",
    "StaticLossScale",
    "Step",
    "TrainState",
    "__version__",
    "accumulate",
    "all_finite",
    "all_gather",
    "amp",
    "axis_index",
    "axis_size",
    "checkpoint_name",
    "export",
    "from_local",
    "functional",
    "gather",
    "grad",
    "latest",
    "launch",
    "load",
    "memory_report",
    "offload",
    "optim",
    "pipeline",
    "pmax",
    "pmean",
    "policies",
    "ppermute",
    "print_saved_activations",
    "psum",
    "psum_scatter",
    "remat",
    "save",
    "saved_activations",
    "shard",
    "train_step",
    "tree",
    "value_and_grad",
    "zero",
]
