"""Schedules against float64 references written from optax's formulas."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsharding import optim

steps = st.integers(0, 5000)
values = st.floats(-10, 10, allow_nan=False).filter(lambda v: abs(v) > 1e-3)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def ref_linear(t, init, end, T, B):
    if t < B:
        return init
    if t >= B + T:
        return end
    return init + (t - B) / T * (end - init)


def ref_cosine(t, init, T, alpha, p):
    if t > T:
        return alpha * init
    return alpha * init + (1 - alpha) * init * (0.5 * (1 + math.cos(math.pi * t / T))) ** p


@given(t=steps, init=values, end=values, T=st.integers(1, 300), B=st.integers(0, 300))
def test_linear_schedule(t, init, end, T, B):
    sched = optim.linear_schedule(init, end, T, B)
    for s in (t, 0, B, B + 1, B + T - 1, B + T, B + T + 1):
        out = sched(s)
        assert type(out) is float and close(out, ref_linear(s, init, end, T, B))


def test_linear_schedule_zero_steps_is_constant():
    assert [optim.linear_schedule(2.0, 5.0, 0)(s) for s in (0, 10)] == [2.0, 2.0]


@given(
    t=steps,
    init=values,
    T=st.integers(1, 500),
    alpha=st.floats(0, 1),
    p=st.sampled_from([1.0, 2.0, 0.5]),
)
def test_cosine_decay_schedule(t, init, T, alpha, p):
    sched = optim.cosine_decay_schedule(init, T, alpha=alpha, exponent=p)
    for s in (t, 0, T // 2, T, T + 1):
        assert close(sched(s), ref_cosine(s, init, T, alpha, p))
    assert close(sched(0), init) and close(sched(T), alpha * init)


@given(
    t=steps,
    init=st.floats(0, 1),
    peak=st.floats(0.01, 2),
    warmup=st.integers(0, 100),
    decay=st.integers(1, 400),
    end=st.floats(0, 0.01),
)
def test_warmup_cosine_decay_schedule(t, init, peak, warmup, decay, end):
    total = warmup + decay
    sched = optim.warmup_cosine_decay_schedule(init, peak, warmup, total, end_value=end)

    def ref(s):
        if s < warmup:
            return ref_linear(s, init, peak, warmup, 0)
        return ref_cosine(s - warmup, peak, decay, end / peak, 1.0)

    for s in (t, 0, max(warmup - 1, 0), warmup, warmup + 1, total - 1, total, total + 7):
        assert close(sched(s), ref(s))
    assert close(sched(warmup), peak) and close(sched(total), end)
    if warmup:
        assert close(sched(0), init)


@given(
    t=steps,
    init=values,
    T=st.integers(1, 100),
    rate=st.floats(0.1, 2.0),
    B=st.integers(0, 100),
    staircase=st.booleans(),
    end=st.one_of(st.none(), st.floats(0.01, 5)),
)
def test_exponential_decay(t, init, T, rate, B, staircase, end):
    sched = optim.exponential_decay(init, T, rate, B, staircase, end)

    def ref(s):
        if s <= B:
            v = init
        else:
            e = (s - B) // T if staircase else (s - B) / T
            v = init * rate**e
        if end is not None:
            v = max(v, end) if rate < 1 else min(v, end)
        return v

    for s in (t, 0, B, B + 1, B + T, B + T + 1, B + 3 * T):
        assert close(sched(s), ref(s))


def test_exponential_decay_degenerate_cases_are_constant():
    assert optim.exponential_decay(3.0, 0, 0.5)(100) == 3.0
    assert optim.exponential_decay(3.0, 10, 0.0)(100) == 3.0


@given(
    t=steps,
    init=values,
    b1=st.integers(0, 100),
    gap=st.integers(0, 100),
    s1=st.floats(0, 2),
    s2=st.floats(0, 2),
)
def test_piecewise_constant_schedule(t, init, b1, gap, s1, s2):
    b2 = b1 + gap
    sched = optim.piecewise_constant_schedule(init, {b2: s2, b1: s1} if gap else {b1: s1})

    def ref(s):
        v = init
        if s >= b1:
            v *= s1
        if gap and s >= b2:
            v *= s2
        return v

    for s in (t, 0, b1 - 1, b1, b2 - 1, b2, b2 + 1):
        if s >= 0:
            assert close(sched(s), ref(s))
    assert optim.piecewise_constant_schedule(2.0)(10) == 2.0


def test_join_schedules_passes_steps_since_boundary():
    seen = []

    def rec(tag):
        def f(s):
            seen.append((tag, s))
            return float(tag)

        return f

    sched = optim.join_schedules([rec(0), rec(1), rec(2)], [3, 5])
    assert [sched(s) for s in (0, 2, 3, 4, 5, 9)] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert (1, 0) in seen and (2, 4) in seen


def test_constant_schedule():
    assert optim.constant_schedule(0.25)(123456) == 0.25


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: optim.linear_schedule(1.0, 0.0, -1),
            r"optim\.linear_schedule: transition_steps must be >= 0, got -1",
        ),
        (lambda: optim.linear_schedule(1.0, 0.0, 10, -5), r"transition_begin must be >= 0"),
        (
            lambda: optim.linear_schedule(1.0, 0.0, 2.5),
            r"transition_steps must be an int, got 2\.5",
        ),
        (
            lambda: optim.cosine_decay_schedule(1.0, 0),
            r"optim\.cosine_decay_schedule: decay_steps must be >= 1, got 0",
        ),
        (
            lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 100, 50),
            r"must be greater than warmup_steps, got decay_steps=50 and warmup_steps=100",
        ),
        (
            lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, -1, 50),
            r"warmup_steps must be >= 0",
        ),
        (
            lambda: optim.exponential_decay(1.0, 10, -0.5),
            r"optim\.exponential_decay: decay_rate must be in \[0, inf\)",
        ),
        (
            lambda: optim.piecewise_constant_schedule(1.0, {10: -0.1}),
            r"the scale at boundary 10 must be in \[0, inf\)",
        ),
        (
            lambda: optim.piecewise_constant_schedule(1.0, {-3: 0.1}),
            r"boundary of boundaries_and_scales must be >= 0",
        ),
        (
            lambda: optim.join_schedules([lambda s: 1.0, 0.5], [3]),
            r"optim\.join_schedules: schedules\[1\] must be callable",
        ),
        (
            lambda: optim.join_schedules([lambda s: 1.0], [3]),
            r"boundaries must have one entry fewer",
        ),
        (
            lambda: optim.join_schedules([lambda s: 1.0] * 3, [5, 3]),
            r"non-decreasing, got \[5, 3\]",
        ),
        (lambda: optim.constant_schedule("a"), r"optim\.constant_schedule: value must be a finite"),
    ],
)
def test_bad_arguments_raise_at_construction(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
