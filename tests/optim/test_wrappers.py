"""apply_if_finite: optax's semantics (zero updates, inner state kept, counters)."""

from __future__ import annotations

import pytest
import torch
from optim_trees import bitwise_equal, snapshot

from fsharding import optim

NAN = float("nan")


def test_apply_if_finite_skips_then_gives_up():
    inner = optim.adam(0.1)
    tx = optim.apply_if_finite(inner, max_consecutive_errors=2)
    p = {"w": torch.ones(2)}
    s = tx.init(p)
    assert s == optim.ApplyIfFiniteState(0, True, 0, s.inner_state)

    u, s = tx.update({"w": torch.ones(2)}, s, p)  # finite: inner runs
    assert s.inner_state[0].count == 1 and (u["w"] != 0).all()
    assert (s.notfinite_count, s.last_finite, s.total_notfinite) == (0, True, 0)

    kept = s.inner_state
    for k in (1, 2):  # non-finite, within the limit: zero updates, inner state kept
        u, s = tx.update({"w": torch.tensor([NAN, 1.0])}, s, p)
        assert torch.equal(u["w"], torch.zeros(2)) and s.inner_state is kept
        assert (s.notfinite_count, s.last_finite, s.total_notfinite) == (k, False, k)

    u, s = tx.update({"w": torch.tensor([float("inf"), 1.0])}, s, p)  # 3 > 2: inner runs
    assert s.inner_state[0].count == 2 and not torch.isfinite(u["w"]).all()
    assert (s.notfinite_count, s.total_notfinite) == (3, 3)

    u, s = tx.update({"w": torch.ones(2)}, s, p)  # finite again: consecutive count resets
    assert (s.notfinite_count, s.last_finite, s.total_notfinite) == (0, True, 3)


def test_apply_if_finite_donated_skip_keeps_state_bitwise():
    tx = optim.apply_if_finite(optim.adamw(0.1), max_consecutive_errors=1)
    p = {"w": torch.ones(3)}
    _, s = tx.update({"w": torch.ones(3)}, tx.init(p), p)
    before = snapshot(s.inner_state)
    g = {"w": torch.tensor([1.0, NAN, 1.0])}
    with optim.donation():
        u, s2 = tx.update(g, s, p)
    assert torch.equal(u["w"], torch.zeros(3)) and bitwise_equal(s2.inner_state, before)


def test_apply_if_finite_reports_the_inner_learning_rate():
    sched = optim.linear_schedule(1.0, 0.0, 10)
    tx = optim.apply_if_finite(optim.sgd(sched), 1)
    p = {"w": torch.ones(1)}
    s = tx.init(p)
    assert optim.learning_rate(tx, s) == 1.0
    _, s = tx.update({"w": torch.ones(1)}, s, p)
    assert optim.learning_rate(tx, s) == pytest.approx(0.9)
    _, s = tx.update({"w": torch.tensor([NAN])}, s, p)  # skipped: the schedule did not advance
    assert optim.learning_rate(tx, s) == pytest.approx(0.9)


def test_apply_if_finite_bad_arguments():
    with pytest.raises(TypeError, match=r"optim\.apply_if_finite: inner must be a Gradient"):
        optim.apply_if_finite(lambda g: g, 1)
    with pytest.raises(ValueError, match=r"max_consecutive_errors must be >= 0, got -1"):
        optim.apply_if_finite(optim.sgd(0.1), -1)


def test_apply_if_finite_zero_errors_allowed_always_runs_inner():
    tx = optim.apply_if_finite(optim.sgd(1.0), max_consecutive_errors=0)
    u, s = tx.update({"w": torch.tensor([NAN])}, tx.init({"w": torch.ones(1)}))
    assert torch.isnan(u["w"]).all() and (s.notfinite_count, s.last_finite) == (1, False)
