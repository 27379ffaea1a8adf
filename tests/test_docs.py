"""The docstring examples of the public API run, the API is what __all__ and the stub say, and
the docs' relative links resolve."""

import doctest
import importlib
import pathlib
import re

import pytest

import pyeffort

MODULES = ["pyeffort", "pyeffort.api", "pyeffort.buckets"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_every_public_function_has_an_example():
    for name in pyeffort.__all__:
        obj = getattr(pyeffort, name)
        if callable(obj) and not isinstance(obj, type) or name == "Buckets":
            assert ">>>" in (obj.__doc__ or ""), name


def test_stub_lists_every_public_name():
    stub = (pathlib.Path(pyeffort.__file__).parent / "__init__.pyi").read_text()
    for name in pyeffort.__all__:
        assert f" {name}" in stub, name


DOCS = ["README.md", "DEVELOPERS.md", "bench/README.md", "experiments/README.md"]


def test_relative_links_of_the_docs_resolve():
    root = pathlib.Path(__file__).parents[1]
    files = [root / d for d in DOCS if d.endswith(".md")] + list((root / "docs").glob("*.md"))
    for md in files:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", md.read_text()):
            assert (md.parent / target).exists(), (md.name, target)
