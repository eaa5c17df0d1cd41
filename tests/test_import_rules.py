"""Import rules the import-linter contracts in pyproject.toml do not state, on grimp's graph.

- No module of the layers imports the public package ``freezeguard`` itself: its ``__init__``
  re-exports every layer, so ``import freezeguard`` from inside one hides an upward arrow that the
  layers contract cannot see (``freezeguard`` is every layer's ancestor).
- No import circle between sibling modules, counting imports made only for type checking (the
  contracts exclude them, as they cost nothing at run time, but they still tie the two modules'
  designs together). None is allowed.
"""
from __future__ import annotations

import itertools

import grimp
import pytest

LAYERS = ("freezeguard.cli", "freezeguard.apps", "freezeguard.integrations", "freezeguard.core", "freezeguard.ops",
          "freezeguard.backends")

KNOWN_TYPE_ONLY_CIRCLES: set[frozenset[str]] = set()
KNOWN_ROOT_IMPORTS: set[str] = set()


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("freezeguard", exclude_type_checking_imports=False)


def test_layers_never_import_the_public_package(graph):
    offenders = sorted(m for layer in LAYERS for m in graph.find_descendants(layer) | {layer}
                       if "freezeguard" in graph.find_modules_directly_imported_by(m))
    assert set(offenders) <= KNOWN_ROOT_IMPORTS, f"these modules import the public package freezeguard: {offenders}"


def test_no_new_circle_between_siblings(graph):
    circles = set()
    for parent in ["freezeguard", *sorted(graph.find_descendants("freezeguard"))]:
        children = sorted(graph.find_children(parent))
        for a, b in itertools.combinations(children, 2):
            if graph.chain_exists(a, b, as_packages=True) and graph.chain_exists(b, a, as_packages=True):
                circles.add(frozenset({a, b}))
    assert not any("freezeguard.ops" in c for pair in circles for c in pair), circles  # ops/ is clean
    assert circles <= KNOWN_TYPE_ONLY_CIRCLES, sorted(map(sorted, circles - KNOWN_TYPE_ONLY_CIRCLES))
