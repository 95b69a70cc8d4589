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


# The public API is `fs.*` and `optim.*` (DESIGN.md "Layout"): examples show users only those
# (plus the reference models), never the internal module a name happens to live in.
ALLOWED_IMPORTS = ("import fsharding as fs", "from fsharding import optim", "from fsharding.models")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_use_public_names(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    bad = [
        f"{test.name}: {ex.source.strip()}"
        for test in finder.find(module)
        for ex in test.examples
        if "fsharding" in ex.source
        and any(line.strip().startswith(("import fsharding", "from fsharding"))
                and not line.strip().startswith(ALLOWED_IMPORTS)
                for line in ex.source.splitlines())
    ]  # fmt: skip
    assert not bad, "examples import internal paths; use fs./optim. names:\n" + "\n".join(bad)
