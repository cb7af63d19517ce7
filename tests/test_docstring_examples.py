"""The runnable examples in the public docstrings run and print what they show."""

import doctest
import importlib

import pytest

# The modules whose public docstrings carry examples (the README's API and its records).
MODULES = [
    "vilab.errors",
    "vilab.inference.svi.api",
    "vilab.inference.nuts.api",
    "vilab.inference.comparison.api",
    "vilab.inference.common.diagnostics",
    "vilab.guides.registry",
    "vilab.models.registry",
]


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_of_a_public_module_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
