"""Shared test setup: a deterministic hypothesis profile and float64 helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic in CI (derandomize: same examples every run), no per-example deadline (the
# machine is shared and small). `HYPOTHESIS_PROFILE=dev` explores more and randomly.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
