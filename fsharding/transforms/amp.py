"""``fs.amp``: runs a function (or an optimizer) under a mixed-precision ``fs.Policy``.

This module owns the transform and its op rule; the policy itself (its dtypes, string form
and casts) and the loss scales live in ``fsharding.precision``, and ``fs.amp(optimizer)``
is ``optim/master_weights``. :func:`recompute_context` is here because only this module
knows the rule: ``fs.remat`` uses it to recompute in the forward's precision.

An ``fs.Policy`` (jmp's) names the dtype params are stored in, the dtype the computation
runs in and the dtype outputs are returned in. ``fs.amp(f, policy=...)`` runs ``f`` under a
policy: every floating tensor leaf of every argument is cast to ``compute_dtype`` on entry
(a differentiable cast: gradients come back in each argument's own dtype), outputs are cast
to ``output_dtype``, and inside ``f`` one stated op rule applies — the same on every device,
never the device's autocast table (CPU autocast keeps softmax and layer_norm in bf16 where
CUDA upcasts them):

=========================  ==========================================  =====================
ops                        rule                                        result dtype
=========================  ==========================================  =====================
norms: layer_norm,         half-precision (f16/bf16) floating inputs   compute_dtype
group_norm, batch_norm,    are upcast to float32, the op runs in
instance_norm, rms_norm,   float32 (differentiably: backward runs in
normalize, softmax,        float32 too)
log_softmax, softmin,
reductions (sum, mean,
prod, norm, vector_norm,
var, std, logsumexp,
cumsum, cumprod)
losses: cross_entropy,     half-precision inputs upcast; the op runs   float32 (a loss is
nll_loss, mse_loss, ...    in float32                                  read and scaled)
matmuls: linear, matmul,   float32 and half-precision floating inputs  compute_dtype
mm, bmm, addmm, baddbmm,   are cast to compute_dtype (float64 is
einsum, conv*,             left alone)
scaled_dot_product_attn
everything else            runs in its inputs' dtypes (elementwise     as torch decides
                           ops in compute_dtype)
=========================  ==========================================  =====================

An op called with an explicit ``dtype=`` or ``out=`` is left as the caller wrote it;
batch_norm's in-place update of half-precision running stats is written back to them. The
rule is a ``TorchFunctionMode``: it sees ``F.layer_norm`` or ``F.cross_entropy`` before
decomposition, and autograd stays exact because the casts are ordinary differentiable ops.
With a float32 or float64 ``compute_dtype`` no mode is entered: ``amp(f, policy="fp32")``
is ``f`` (bitwise) for float32 arguments.

Composition: ``remat(amp(f))`` recomputes through ``amp`` and so in the same precision;
``amp(remat(f))`` needs remat to re-enter the rule at recomputation
(:func:`recompute_context`). Both give the same values and grads; they differ in memory:
``remat`` keeps its inputs, so ``amp(remat(f))`` keeps the compute-dtype copies of the
params from forward to backward (like autocast's weight cache), while ``remat(amp(f))``
keeps the params themselves and casts again when it recomputes (like autocast around
``torch.utils.checkpoint``). Per block, both are within 1 MiB of autocast plus checkpoint
on GPT "small"; one ``amp`` around a loss whose blocks are rematerialised keeps every
cast copy until backward (measured 62.9 vs 57.5 MiB peak).

Memory: without remat, ``amp`` holds no more than ``torch.autocast`` (peak live memory on
GPT "small", batch 8 x 128: 107.3 MiB for the whole loss, 107.5 per block, autocast
108.2; counted as ANCHORS.md does, storages produced in the step). The cast copies of the
params that matmuls save for backward are the same ones autocast caches.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from fsharding.optim.base import GradientTransformation
from fsharding.optim.master_weights import master_weights
from fsharding.precision import HALF, Policy

__all__ = ["amp", "recompute_context"]

_T = TypeVar("_T")


def _as_policy(policy: Any, api: str) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return Policy.parse(policy)
    raise TypeError(
        f"{api}: policy must be an fs.Policy or a str such as 'bf16' or 'p=f32,c=bf16', got "
        f"{policy!r}."
    )


# --------------------------------------------------------------------------------------
# the op rule
# --------------------------------------------------------------------------------------

_FLOAT32_NAMES = (
    "layer_norm native_layer_norm group_norm native_group_norm batch_norm native_batch_norm "
    "instance_norm rms_norm normalize local_response_norm "
    "softmax log_softmax _softmax _log_softmax softmin "
    "sum nansum mean nanmean prod norm vector_norm var std var_mean std_mean logsumexp "
    "cumsum cumprod logcumsumexp"
).split()
# Losses compute in float32 and *return* float32 (as CUDA autocast does): a loss is a scalar
# that is read, logged and multiplied by a loss scale; in bf16 it keeps ~3 digits, and in
# fp16 the gradient of ``scale * loss`` would enter at the scale itself (> 65504 overflows).
_LOSS_NAMES = (
    "cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy "
    "binary_cross_entropy_with_logits kl_div poisson_nll_loss gaussian_nll_loss "
    "soft_margin_loss multilabel_soft_margin_loss cosine_embedding_loss margin_ranking_loss "
    "hinge_embedding_loss triplet_margin_loss multi_margin_loss multilabel_margin_loss ctc_loss"
).split()
_COMPUTE_NAMES = (
    "linear bilinear matmul __matmul__ __rmatmul__ mm bmm addmm addmv addbmm baddbmm mv dot "
    "einsum tensordot conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d "
    "convolution scaled_dot_product_attention"
).split()
_NAMESPACES = (torch, torch.Tensor, F, torch._C._nn, torch.linalg)


def _lookup(names: list[str]) -> set[Any]:
    return {getattr(ns, n) for ns in _NAMESPACES for n in names if hasattr(ns, n)}


_LOSS_OPS = _lookup(_LOSS_NAMES)
_FLOAT32_OPS = _lookup(_FLOAT32_NAMES) | _LOSS_OPS
_COMPUTE_OPS = _lookup(_COMPUTE_NAMES)


def _cast_where(tree: _T, src: tuple[torch.dtype, ...], dst: torch.dtype) -> tuple[_T, bool]:
    """Casts the tensor leaves whose dtype is in ``src`` to ``dst``; reports whether any was."""
    hit = False

    def cast(x: Any) -> Any:
        nonlocal hit
        if isinstance(x, torch.Tensor) and x.dtype in src and x.dtype != dst:
            hit = True
            return x.to(dst)
        return x

    return optree.tree_map(cast, tree), hit


def _chooses_dtype(args: tuple, kwargs: dict) -> bool:
    """True when the call names a dtype or an ``out=`` tensor: the caller decided."""
    return kwargs.get("out") is not None or any(
        isinstance(a, torch.dtype) for a in (*args, *kwargs.values())
    )


# Ops that update arguments in place: the positions of running_mean and running_var.
_RUNNING_STATS = {F.batch_norm: 1, F.instance_norm: 1}
_RUNNING_STATS.update(
    {getattr(torch, n): 3 for n in ("batch_norm", "instance_norm", "native_batch_norm")}
)


def _running_stats(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The running_mean / running_var tensors passed to a batch_norm-like op."""
    i = _RUNNING_STATS.get(func)
    if i is None:
        return []
    found = [
        kwargs.get(n, args[j] if j < len(args) else None)
        for j, n in ((i, "running_mean"), (i + 1, "running_var"))
    ]
    return [t for t in found if isinstance(t, torch.Tensor)]


class _OpRule(TorchFunctionMode):
    """The op rule of the module docstring, for one half-precision ``compute_dtype``."""

    def __init__(self, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _FLOAT32_OPS:
            if _chooses_dtype(args, kwargs):
                return func(*args, **kwargs)
            stats = _running_stats(func, args, kwargs)
            (args, kwargs), hit = _cast_where((args, kwargs), HALF, torch.float32)
            if not hit:
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            # batch_norm in training updated float32 copies of half-precision running
            # stats: write them back into the caller's tensors.
            for orig, new in zip(stats, _running_stats(func, args, kwargs)):
                if new is not orig:
                    with torch.no_grad():
                        orig.copy_(new)
            if func in _LOSS_OPS:
                return out
            return _cast_where(out, (torch.float32,), self.compute_dtype)[0]
        if func in _COMPUTE_OPS and not _chooses_dtype(args, kwargs):
            dtypes = (torch.float32, *HALF)
            (args, kwargs), _ = _cast_where((args, kwargs), dtypes, self.compute_dtype)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    """Turns off any enabled device autocast: the policy alone decides the precision."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def recompute_context() -> contextlib.AbstractContextManager:
    """A context manager that re-establishes the amp op rules active *now*.

    For ``fs.remat``: call it during the forward pass of a checkpointed region and enter
    the result around each recomputation, so that ``amp(remat(f))`` recomputes in the
    forward's precision. It may be entered any number of times (also nested). Outside any
    ``amp`` region it does nothing.

    Example:
        >>> import torch, fsharding as fs
        >>> x = torch.ones(2, 2)
        >>> ctx = fs.amp(recompute_context, policy="bf16")()  # taken inside an amp region
        >>> with ctx:  # re-enters its rule: matmuls in bfloat16
        ...     (x @ x).dtype
        torch.bfloat16
        >>> with recompute_context():  # taken outside amp: nothing to re-establish
        ...     (x @ x).dtype
        torch.float32
    """
    return _Reenter(
        [m.compute_dtype for m in _get_current_function_mode_stack() if isinstance(m, _OpRule)]
    )


class _Reenter:
    """Pushes one fresh ``_OpRule`` per recorded compute dtype on each ``__enter__``."""

    def __init__(self, dtypes: list[torch.dtype]) -> None:
        self.dtypes = dtypes
        self.stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for dtype in self.dtypes:
            stack.enter_context(_OpRule(dtype))
        self.stacks.append(stack)

    def __exit__(self, *exc: Any) -> bool:
        return bool(self.stacks.pop().__exit__(*exc))


# --------------------------------------------------------------------------------------
# amp
# --------------------------------------------------------------------------------------

_Fn = Callable[..., Any]


@overload
def amp(fn_or_optimizer: _Fn, /, *, policy: Policy | str = "bf16") -> _Fn: ...


@overload
def amp(
    fn_or_optimizer: GradientTransformation, /, *, policy: Policy | str = "bf16"
) -> GradientTransformation: ...


@overload
def amp(fn_or_optimizer: None = None, /, *, policy: Policy | str = "bf16") -> Callable: ...


def amp(fn_or_optimizer: Any = None, /, *, policy: Policy | str = "bf16") -> Any:
    """Runs a function, or an optimizer, under a mixed-precision policy.

    On a function: floating tensor leaves of all arguments are cast to
    ``policy.compute_dtype`` on entry (differentiably, so gradients come back in each
    argument's dtype), outputs to ``policy.output_dtype``, and inside, the op rule of the
    module docstring applies (norms, softmax and reductions in float32 returning
    ``compute_dtype``; losses in float32 returning float32; matmuls in ``compute_dtype``).
    Measured error of ``"bf16"`` against float64 on an MLP with layer_norm, softmax and
    cross_entropy: loss within 1e-2 relative, gradients within 5e-2
    relative L2 (``"fp16"``: 1e-3 and 1e-2).

    A loss op (``F.cross_entropy`` & co.) inside ``amp`` computes and returns float32, as
    CUDA autocast does: the loss keeps its digits, and under float16 the gradient of
    ``scale * loss`` enters the float16 region only after the loss op's float32 backward.

    On an ``optim.GradientTransformation``: fp32 master weights for the params stored in
    float16 / bfloat16 (pure half-precision training); see
    ``optim/master_weights``.

    Args:
        fn_or_optimizer: the function or optimizer; omit it to get a decorator.
        policy: an ``fs.Policy`` or a string for ``fs.Policy.parse`` (default ``"bf16"``:
            params and outputs float32, compute bfloat16).

    Returns:
        The wrapped function (``functools.wraps``) or ``GradientTransformation``.

    Raises:
        ValueError: ``policy`` does not parse.
        TypeError: ``fn_or_optimizer`` is neither callable nor a ``GradientTransformation``.

    Example:
        >>> import torch, fsharding as fs
        >>> f = fs.amp(lambda w, x: x @ w, policy="bf16")
        >>> w = torch.ones(3, 2, requires_grad=True)
        >>> out = f(w, torch.ones(4, 3))
        >>> out.dtype, fs.grad(lambda w: f(w, torch.ones(4, 3)).sum())(w).dtype
        (torch.float32, torch.float32)
    """
    pol = _as_policy(policy, "fs.amp")
    if fn_or_optimizer is None:
        return functools.partial(amp, policy=pol)
    if isinstance(fn_or_optimizer, GradientTransformation):
        return master_weights(fn_or_optimizer, pol)
    if isinstance(fn_or_optimizer, torch.nn.Module):
        raise TypeError(
            f"fs.amp: got an nn.Module ({type(fn_or_optimizer).__name__}); amp transforms "
            "functions of explicit params. Make the module one with fs.functional: "
            "apply, params = fs.functional(model); then "
            f"fs.amp(lambda params, *args: apply(params, *args), policy='{pol}'), or per "
            f"block fs.functional(model, wrap={{Block: fs.amp(policy='{pol}')}})."
        ) from None
    if not callable(fn_or_optimizer):
        raise TypeError(
            "fs.amp: fn_or_optimizer must be a function or an optim.GradientTransformation, "
            f"got {type(fn_or_optimizer).__name__}."
        )
    return _amp_fn(fn_or_optimizer, pol)


def _amp_fn(fn: _Fn, policy: Policy) -> _Fn:
    half = policy.compute_dtype in HALF

    @functools.wraps(fn)
    def amp_fn(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = policy.cast_to_compute((args, kwargs))
        with _no_autocast():
            if half:
                with _OpRule(policy.compute_dtype):
                    out = fn(*args, **kwargs)
            else:
                out = fn(*args, **kwargs)
        return policy.cast_to_output(out)

    amp_fn.policy = policy  # type: ignore[attr-defined]
    return amp_fn
