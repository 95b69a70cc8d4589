"""``inject_hyperparams``: hyperparameters in the optimizer state (optax's wrapper).

The state carries the numeric hyperparameters as a dict, so a loop can change the learning
rate or weight decay between steps without rebuilding the optimizer state; schedules given
for a hyperparameter are evaluated at the state's step count.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from fsharding.optim import _checks
from fsharding.optim import base as _base
from fsharding.optim.base import GradientTransformation

__all__ = ["InjectHyperparamsState", "inject_hyperparams"]

PyTree = Any


class InjectHyperparamsState(NamedTuple):
    """State of an :func:`inject_hyperparams` transform (optax's fields).

    Attributes:
        count: updates done so far (a python int): schedules are evaluated at it.
        hyperparams: ``{name: value}`` of the numeric hyperparameters the next update uses
            (python numbers). Set a value between steps to change it (e.g.
            ``state.hyperparams["learning_rate"] = 1e-4``); a scheduled one is overwritten
            by its schedule at each update, as in optax.
        inner_state: the inner transform's state.
    """

    count: int
    hyperparams: dict[str, Any]
    inner_state: Any


def _is_numeric(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.dim() == 0)


def _number(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: str | Iterable[str] = (),
) -> Callable[..., GradientTransformation]:
    """Wraps an optimizer factory so its numeric hyperparameters live in the state.

    ``inject_hyperparams(optim.adamw)(learning_rate=..., weight_decay=...)`` takes the
    factory's own arguments; a number is stored in ``state.hyperparams`` and can be changed
    between steps, a callable (other than in ``static_args``) is a schedule
    ``count -> value`` evaluated at each update (optax's rule: every callable is a schedule
    unless named in ``static_args``, e.g. a callable ``mask``). Each update builds the
    inner transform from the current values (cheap: a few checks) and runs it on the
    carried inner state. Bools, None, dtypes and other values stay fixed.

    Args:
        inner_factory: e.g. ``optim.adam``, ``optim.adamw``, ``optim.sgd``.
        static_args: names of arguments that are not hyperparameters (callables that are
            not schedules).

    Returns:
        A function with ``inner_factory``'s signature that returns a transform with state
        :class:`InjectHyperparamsState`.

    Raises:
        ValueError: ``static_args`` names an argument ``inner_factory`` does not have.

    Example:
        >>> import torch
        >>> from fsharding import optim
        >>> tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
        >>> p = {"w": torch.zeros(1)}
        >>> s = tx.init(p)
        >>> s.hyperparams["learning_rate"] = 0.5  # no new state needed
        >>> u, s = tx.update({"w": torch.ones(1)}, s, p)
        >>> u["w"].item()
        -0.5
    """
    api = "optim.inject_hyperparams"
    static = {static_args} if isinstance(static_args, str) else set(static_args)
    if not callable(inner_factory):
        raise TypeError(
            f"{api}: inner_factory must be an optimizer factory such as optim.adam, got "
            f"{inner_factory!r}."
        )
    sig = inspect.signature(inner_factory)
    if not static.issubset(sig.parameters):
        raise ValueError(
            f"{api}: static_args must name arguments of {inner_factory.__name__}, got "
            f"{sorted(static - set(sig.parameters))!r}; its arguments are "
            f"{list(sig.parameters)!r}."
        )

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        numeric: dict[str, Any] = {}
        sched: dict[str, Callable[[int], Any]] = {}
        other: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name in static or isinstance(value, bool):
                other[name] = value
            elif callable(value) and not isinstance(value, torch.dtype):
                try:
                    _checks.schedule(api, name, value)
                except TypeError as e:
                    why = str(e).split(": ", 1)[-1]
                    raise TypeError(
                        f"{api}: {name} is callable, so it is taken as a schedule (optax's "
                        f"rule); if it is not one, pass static_args=({name!r},). {why}"
                    ) from None
                sched[name] = value
            elif _is_numeric(value):
                numeric[name] = _number(value)
            else:
                other[name] = value

        def values_at(hyper: dict[str, Any], count: int) -> dict[str, Any]:
            out = dict(hyper)
            out.update({k: _number(f(count)) for k, f in sched.items()})
            return out

        cache: dict[tuple, GradientTransformation] = {}

        def build(hyper: dict[str, Any]) -> GradientTransformation:
            key = tuple(sorted(hyper.items()))
            tx = cache.get(key)
            if tx is None:
                cache.clear()  # keep one: values change every step under a schedule
                tx = cache[key] = inner_factory(**other, **hyper)
            return tx

        probe = build(values_at(numeric, 0))

        def init(params: PyTree) -> InjectHyperparamsState:
            hyper = values_at(numeric, 0)
            return InjectHyperparamsState(0, hyper, build(hyper).init(params))

        def update(
            updates: PyTree, state: InjectHyperparamsState, params: PyTree = None
        ) -> tuple[PyTree, InjectHyperparamsState]:
            if not isinstance(state, InjectHyperparamsState):
                raise TypeError(
                    f"{api}: state must be the InjectHyperparamsState returned by init, got "
                    f"{type(state).__name__}. A state from another optimizer? Pass the state "
                    "this optimizer's init(params) returned."
                )
            count = int(state.count)
            hyper = values_at(state.hyperparams, count)
            out, inner_state = build(hyper).update(updates, state.inner_state, params)
            return out, InjectHyperparamsState(count + 1, hyper, inner_state)

        def learning_rate(state: InjectHyperparamsState) -> float | None:
            for name in ("learning_rate", "lr"):
                if name in sched:
                    return float(_number(sched[name](int(state.count))))
                if name in state.hyperparams:
                    return float(state.hyperparams[name])
            return _base.learning_rate(build(values_at(state.hyperparams, 0)), state.inner_state)

        update.learning_rate = learning_rate  # type: ignore[attr-defined]
        update.elementwise = getattr(probe.update, "elementwise", True)  # type: ignore[attr-defined]
        return GradientTransformation(init, update)

    wrapped.__name__ = f"inject_hyperparams({getattr(inner_factory, '__name__', 'factory')})"
    wrapped.__doc__ = inner_factory.__doc__
    wrapped.__signature__ = sig.replace(return_annotation=GradientTransformation)  # type: ignore[attr-defined]
    return wrapped
