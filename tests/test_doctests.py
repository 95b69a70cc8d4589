"""Every `>>>` example in the package's docstrings runs and gives the printed result."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fsharding

# Modules whose examples need several processes or start a whole training run.
SKIP = {"fsharding.train", "fsharding.__main__"}

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(fsharding.__path__, prefix="fsharding.")
    if m.name not in SKIP
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.IGNORE_EXCEPTION_DETAIL
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
