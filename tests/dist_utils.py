"""Shared helpers for multi-process tests: gloo ranks through fs.launch, bounded in time.

Worker functions live at module level of the test files (pickled by reference; the
children get the caller's ``sys.path``). Each test does many checks inside one launch,
since starting a rank (a fresh interpreter importing torch) costs seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fsharding.parallel.launch import launch

TIMEOUT = 120.0  # a hang fails the test instead of the suite


def run(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = TIMEOUT) -> list[Any]:
    """``fs.launch`` on gloo with a bounded timeout."""
    return launch(fn, nprocs, *args, timeout=timeout, backend="gloo")


def assert_close(actual: Any, expected: Any, what: str, **tol: float) -> None:
    """``torch.testing.assert_close`` on plain tensors (DTensors are gathered first)."""
    if type(actual).__name__ == "DTensor":
        actual = actual.full_tensor()
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


def raises(fn: Callable[[], Any], exc: type[BaseException]) -> str:
    """The message of the ``exc`` that ``fn()`` raises (AssertionError if none)."""
    try:
        fn()
    except exc as e:
        return str(e)
    raise AssertionError(f"expected {exc.__name__}")
