"""Schedules: functions ``step (int) -> value (python float)``, optax's formulas.

A schedule is evaluated on the host in float64 at the optimizer's python-int step count, so
it costs no device work and no sync. Arguments are checked when the schedule is built: a bad
value raises there, naming the schedule, the argument and the value. Where optax documents a
degenerate case (``transition_steps == 0`` holds ``init_value``), the same holds here.

Example:
    >>> from fsharding import optim
    >>> sched = optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110)
    >>> [round(sched(s), 3) for s in (0, 5, 10, 60, 110, 200)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence

from fsharding.optim import _checks

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "warmup_cosine_decay_schedule",
]

Schedule = Callable[[int], float]


def _step(count: int) -> int:
    return operator.index(count) if not hasattr(count, "item") else int(count.item())


@_checks.schedule_factory
def constant_schedule(value: float) -> Schedule:
    """The schedule that always returns ``value``.

    Example:
        >>> from fsharding import optim
        >>> optim.constant_schedule(0.5)(1000)
        0.5
    """
    v = _checks.number("optim.constant_schedule", "value", value)
    return lambda count: v


@_checks.schedule_factory
def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps`` steps, starting
    at step ``transition_begin``: ``init + (end - init) * clip(t - begin, 0, T) / T``.

    Args:
        init_value: the value up to ``transition_begin``.
        end_value: the value from ``transition_begin + transition_steps`` on.
        transition_steps: length of the ramp, >= 0 (0: constant ``init_value``, as optax).
        transition_begin: first step of the ramp, >= 0.

    Raises:
        ValueError: negative ``transition_steps`` or ``transition_begin``.

    Example:
        >>> from fsharding import optim
        >>> sched = optim.linear_schedule(1.0, 0.0, transition_steps=4)
        >>> [sched(s) for s in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    api = "optim.linear_schedule"
    init = _checks.number(api, "init_value", init_value)
    end = _checks.number(api, "end_value", end_value)
    steps = _checks.integer(api, "transition_steps", transition_steps)
    begin = _checks.integer(api, "transition_begin", transition_begin)
    if steps == 0:
        return lambda count: init

    def schedule(count: int) -> float:
        t = min(max(_step(count) - begin, 0), steps)
        frac = 1.0 - t / steps
        return (init - end) * frac + end

    return schedule


@_checks.schedule_factory
def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``:
    ``init * ((1 - alpha) * (0.5 * (1 + cos(pi * min(t, T) / T))) ** exponent + alpha)``.

    Args:
        init_value: the value at step 0.
        decay_steps: length of the decay, > 0.
        alpha: final value as a fraction of ``init_value``.
        exponent: power applied to the cosine factor.

    Raises:
        ValueError: ``decay_steps <= 0``.

    Example:
        >>> from fsharding import optim
        >>> sched = optim.cosine_decay_schedule(1.0, decay_steps=10, alpha=0.1)
        >>> [round(sched(s), 4) for s in (0, 5, 10, 20)]
        [1.0, 0.55, 0.1, 0.1]
    """
    api = "optim.cosine_decay_schedule"
    init = _checks.number(api, "init_value", init_value)
    steps = _checks.integer(api, "decay_steps", decay_steps, lo=1, hint="Pass a positive length.")
    a = _checks.number(api, "alpha", alpha)
    p = _checks.number(api, "exponent", exponent)

    def schedule(count: int) -> float:
        t = min(_step(count), steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * t / steps))
        return init * ((1.0 - a) * cosine**p + a)

    return schedule


@_checks.schedule_factory
def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` at step ``decay_steps`` (which *includes* the warmup), as optax.

    Args:
        init_value: the value at step 0.
        peak_value: the value at the end of warmup.
        warmup_steps: warmup length, >= 0.
        decay_steps: total length (warmup + decay), > ``warmup_steps``.
        end_value: the value from ``decay_steps`` on.
        exponent: power applied to the cosine factor.

    Raises:
        ValueError: negative ``warmup_steps`` or ``decay_steps <= warmup_steps``.

    Example:
        >>> from fsharding import optim
        >>> sched = optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=4)
        >>> [round(sched(s), 4) for s in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    api = "optim.warmup_cosine_decay_schedule"
    init = _checks.number(api, "init_value", init_value)
    peak = _checks.number(api, "peak_value", peak_value)
    end = _checks.number(api, "end_value", end_value)
    warmup = _checks.integer(api, "warmup_steps", warmup_steps)
    total = _checks.integer(api, "decay_steps", decay_steps)
    if total <= warmup:
        raise ValueError(
            f"{api}: decay_steps (the total length, warmup included) must be greater than "
            f"warmup_steps, got decay_steps={total!r} and warmup_steps={warmup!r}. Pass e.g. "
            f"decay_steps={warmup + 1000}."
        )
    alpha = 0.0 if peak == 0.0 else end / peak
    return join_schedules(
        [
            linear_schedule(init, peak, warmup),
            cosine_decay_schedule(peak, total - warmup, alpha=alpha, exponent=exponent),
        ],
        [warmup],
    )


@_checks.schedule_factory
def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init * decay_rate ** ((t - begin) / transition_steps)`` from ``transition_begin``
    on (``init`` before), optax's formula; the exponent is floored with ``staircase``, and
    ``end_value`` bounds the value (a floor when ``decay_rate < 1``, else a ceiling).

    Args:
        init_value: the initial value.
        transition_steps: steps per factor of ``decay_rate``, >= 0 (0: constant).
        decay_rate: the factor, >= 0 (0: constant ``init_value``, as optax).
        transition_begin: first step of the decay, >= 0.
        staircase: decay in discrete jumps.
        end_value: optional bound.

    Raises:
        ValueError: a negative step count or decay rate.

    Example:
        >>> from fsharding import optim
        >>> sched = optim.exponential_decay(1.0, transition_steps=10, decay_rate=0.5)
        >>> [sched(s) for s in (0, 10, 20)]
        [1.0, 0.5, 0.25]
    """
    api = "optim.exponential_decay"
    init = _checks.number(api, "init_value", init_value)
    steps = _checks.integer(api, "transition_steps", transition_steps)
    rate = _checks.number(api, "decay_rate", decay_rate, lo=0.0)
    begin = _checks.integer(api, "transition_begin", transition_begin)
    end = None if end_value is None else _checks.number(api, "end_value", end_value)
    if steps == 0 or rate == 0.0:
        return lambda count: init
    bound = max if rate < 1.0 else min

    def schedule(count: int) -> float:
        t = _step(count) - begin
        p = t / steps
        if staircase:
            p = math.floor(p)
        value = init if t <= 0 else init * rate**p
        return value if end is None else bound(value, end)

    return schedule


@_checks.schedule_factory
def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: Mapping[int, float] | None = None
) -> Schedule:
    """``init_value`` times the product of every ``scale`` whose ``boundary <= t``.

    Args:
        init_value: the value before the first boundary.
        boundaries_and_scales: ``{step: scale}``, steps >= 0 and scales >= 0.

    Raises:
        ValueError: a negative step or scale.

    Example:
        >>> from fsharding import optim
        >>> sched = optim.piecewise_constant_schedule(1.0, {10: 0.1, 20: 0.5})
        >>> [sched(s) for s in (9, 10, 20)]
        [1.0, 0.1, 0.05]
    """
    api = "optim.piecewise_constant_schedule"
    init = _checks.number(api, "init_value", init_value)
    items = []
    for b, s in sorted((boundaries_and_scales or {}).items()):
        items.append(
            (
                _checks.integer(api, "a boundary of boundaries_and_scales", b),
                _checks.number(api, f"the scale at boundary {b}", s, lo=0.0),
            )
        )

    def schedule(count: int) -> float:
        t = _step(count)
        v = init
        for boundary, s in items:
            if t >= boundary:
                v = v * s
        return v

    return schedule


@_checks.schedule_factory
def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``; each one
    sees the step count since its own start (optax semantics).

    Args:
        schedules: callables ``step -> float``.
        boundaries: ``len(schedules) - 1`` non-decreasing steps >= 0.

    Raises:
        TypeError: a schedule is not callable.
        ValueError: wrong number of boundaries, or boundaries that are negative or decrease.

    Example:
        >>> from fsharding import optim
        >>> parts = [optim.constant_schedule(1.0), optim.linear_schedule(1.0, 0.0, 2)]
        >>> sched = optim.join_schedules(parts, [5])
        >>> [sched(s) for s in (4, 5, 6, 7)]
        [1.0, 1.0, 0.5, 0.0]
    """
    api = "optim.join_schedules"
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules:
        raise ValueError(f"{api}: schedules must not be empty; pass at least one schedule.")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(
                f"{api}: schedules[{i}] must be callable (step -> float), got {s!r}. "
                "Pass schedules such as optim.constant_schedule(1e-3)."
            )
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"{api}: boundaries must have one entry fewer than schedules "
            f"({len(schedules) - 1}), got {len(boundaries)}: {boundaries!r}."
        )
    bs = [_checks.integer(api, f"boundaries[{i}]", b) for i, b in enumerate(boundaries)]
    if any(b < a for a, b in zip(bs, bs[1:])):
        raise ValueError(f"{api}: boundaries must be non-decreasing, got {bs!r}.")

    def schedule(count: int) -> float:
        t = _step(count)
        out = schedules[0](t)
        for boundary, s in zip(bs, schedules[1:]):
            if t >= boundary:
                out = s(t - boundary)
        return float(out)

    return schedule
