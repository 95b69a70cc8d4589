"""The public surface is a contract (DESIGN.md): pin it, and check every name resolves."""

from __future__ import annotations

import inspect

import fsharding as fs
from fsharding import optim

PUBLIC = {
    # pytrees and the functional core
    "tree", "all_finite", "functional", "value_and_grad", "grad",
    # optimizers
    "optim",
    # memory transforms
    "remat", "policies", "checkpoint_name", "print_saved_activations", "saved_activations",
    "offload", "Policy", "amp", "LossScale", "DynamicLossScale", "StaticLossScale",
    "NoOpLossScale", "accumulate",
    # meshes and SPMD
    "Mesh", "P", "from_local", "launch", "LaunchError", "psum", "pmean", "pmax",
    "all_gather", "psum_scatter", "ppermute", "axis_index", "axis_size", "shard", "gather",
    "pipeline",
    # training steps
    "Step", "TrainState", "train_step", "zero",
    # state on disk
    "save", "load", "latest", "CheckpointError", "export",
    # introspection
    "memory_report",
    "__version__",
}  # fmt: skip

OPTIM = {
    "GradientTransformation", "EmptyState", "chain", "identity", "apply_updates",
    "apply_updates_", "donation", "donating", "learning_rate", "global_norm",
    "scale", "scale_by_adam", "scale_by_lion", "scale_by_trust_ratio", "trace",
    "add_decayed_weights", "clip", "clip_by_global_norm", "scale_by_learning_rate",
    "scale_by_schedule", "apply_if_finite",
    "sgd", "adam", "adamw", "lion", "lamb",
    "constant_schedule", "linear_schedule", "cosine_decay_schedule",
    "warmup_cosine_decay_schedule", "exponential_decay", "piecewise_constant_schedule",
    "join_schedules",
}  # fmt: skip

POLICIES = {
    "everything_saveable", "nothing_saveable", "dots_saveable",
    "dots_with_no_batch_dims_saveable", "save_only_these_names", "save_any_names_but_these",
    "save_and_offload_only_these_names",
}  # fmt: skip


def test_public_surface_is_pinned():
    assert set(fs.__all__) == PUBLIC


def test_every_public_name_resolves_and_is_documented():
    for name in fs.__all__:
        obj = getattr(fs, name)
        if (
            name not in ("__version__", "LossScale")
            and callable(obj)
            and not isinstance(obj, type(fs))
        ):
            assert inspect.getdoc(obj), f"fs.{name} has no docstring"


def test_loss_scale_alias_names_the_three_scales():
    assert set(fs.LossScale.__args__) == {fs.DynamicLossScale, fs.StaticLossScale, fs.NoOpLossScale}


def test_optim_surface():
    missing = OPTIM - set(optim.__all__)
    assert not missing, missing
    for name in optim.__all__:
        obj = getattr(optim, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"optim.{name} has no docstring"


def test_policies_surface():
    assert POLICIES <= set(dir(fs.policies))


def test_transforms_have_the_common_signature():
    """t(fn=None, /, *, opts): usable as t(f, ...), @t and @t(...)."""
    for name in ("remat", "offload", "amp", "accumulate", "gather", "shard"):
        sig = inspect.signature(getattr(fs, name))
        params = list(sig.parameters.values())
        assert params[0].kind is inspect.Parameter.POSITIONAL_ONLY, name
        assert params[0].default is None, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name
