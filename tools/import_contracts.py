"""Two import-linter contract types for rules the built-in types cannot state.

``lint-imports`` loads them through ``contract_types`` in ``[tool.importlinter]`` (pyproject.toml).
It puts the current folder first on ``sys.path``, so run from the repository root this module
imports as ``tools.import_contracts``; it is development tooling, never part of the wheel.
(``tools/`` has no ``__init__.py`` on purpose: a regular package of that generic name in the root
would shadow any installed ``tools`` for everything run from there.)

- ``forbidden_itself``: source packages never import one module *itself*. The built-in
  ``forbidden`` type treats a forbidden module as a package, so it cannot forbid ``freezeguard``
  (the root ``__init__``, which re-exports every layer) without forbidding all its children.
- ``siblings_never_reach_each_other``: under the given ancestors, at any depth, no two sibling
  modules reach each other through any chain of imports, even one that leaves their parent.

Both can count imports made only under ``if TYPE_CHECKING:`` (``count_type_checking_imports =
true``) while the session's graph leaves them out for the other contracts: they cost nothing at
run time, but they still tie two modules' designs together.

Example, in pyproject.toml::

    [tool.importlinter]
    contract_types = ["forbidden_itself: tools.import_contracts.ForbiddenItselfContract"]

    [[tool.importlinter.contracts]]
    name = "the layers never import the package itself"
    type = "forbidden_itself"
    source_modules = ["mypackage.core"]
    forbidden_module = "mypackage"
    count_type_checking_imports = true
"""
from __future__ import annotations

import itertools
from typing import Any

import grimp
from importlinter import Contract, ContractCheck, fields, output


def _is_true(option: Any) -> bool:
    # import-linter hands session options over as strings ("true"/"True"); a test may pass a bool.
    return str(option).lower() == "true"


def graph_to_check(graph: grimp.ImportGraph, session_options: dict[str, Any],
                   count_type_checking_imports: bool) -> grimp.ImportGraph:
    """The session's graph, or the same packages rebuilt with their type-checking imports when it lacks them.

    A rebuild reads only the root packages' sources (well under a second for freezeguard), so it
    skips import-linter's cache rather than sharing it.
    """
    if not count_type_checking_imports or not _is_true(session_options.get("exclude_type_checking_imports")):
        return graph
    return grimp.build_graph(*session_options["root_packages"],
                             include_external_packages=_is_true(session_options.get("include_external_packages")),
                             exclude_type_checking_imports=False, cache_dir=None)


def _line_numbers(numbers: tuple[int | None, ...]) -> str:
    # As import-linter's own reports write them; a graph built by hand may not know them.
    return ", ".join("l.?" if number is None else f"l.{number}" for number in numbers)


def _require_modules(graph: grimp.ImportGraph, names: list[str]) -> None:
    # A misspelt module would otherwise check nothing and pass.
    missing = [name for name in names if name not in graph.modules]
    if missing:
        raise ValueError(f"Module(s) not in the import graph: {', '.join(missing)}.")


class ForbiddenItselfContract(Contract):
    """No module of ``source_modules`` (each taken with its descendants) directly imports ``forbidden_module``.

    Only that module itself is forbidden, not its children; an indirect chain is not checked
    either, as each module on it is a source module in turn or outside the rule.
    """

    type_name = "forbidden_itself"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    forbidden_module = fields.ModuleField()
    count_type_checking_imports = fields.BooleanField(required=False, default=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        graph = graph_to_check(graph, self.session_options, self.count_type_checking_imports)  # type: ignore
        forbidden = self.forbidden_module.name  # type: ignore
        sources = [module.name for module in self.source_modules]  # type: ignore
        _require_modules(graph, [*sources, forbidden])
        importers = sorted({module for source in sources for module in {source, *graph.find_descendants(source)}
                            if forbidden in graph.find_modules_directly_imported_by(module)})
        offences = [{"importer": importer,
                     "line_numbers": tuple(detail["line_number"] for detail in
                                           graph.get_import_details(importer=importer, imported=forbidden))}
                    for importer in importers]
        return ContractCheck(kept=not offences, metadata={"forbidden": forbidden, "offences": offences})

    def render_broken_contract(self, check: ContractCheck) -> None:
        forbidden = check.metadata["forbidden"]
        for offence in check.metadata["offences"]:
            output.print_error(f"{offence['importer']} is not allowed to import {forbidden} itself "
                               f"({_line_numbers(offence['line_numbers'])})", bold=False)
        output.new_line()


class SiblingsNeverReachEachOtherContract(Contract):
    """Under each of ``ancestors`` and all their descendants, no two children reach each other by imports.

    Each child is taken as a package (with its descendants), and a chain may pass through any
    module of the graph, so a circle that detours through another package counts too.
    """

    type_name = "siblings_never_reach_each_other"

    ancestors = fields.ListField(subfield=fields.ModuleField())
    count_type_checking_imports = fields.BooleanField(required=False, default=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        graph = graph_to_check(graph, self.session_options, self.count_type_checking_imports)  # type: ignore
        ancestors = [module.name for module in self.ancestors]  # type: ignore
        _require_modules(graph, ancestors)
        parents = sorted({parent for ancestor in ancestors for parent in {ancestor, *graph.find_descendants(ancestor)}})
        circles = []
        for parent in parents:
            for a, b in itertools.combinations(sorted(graph.find_children(parent)), 2):
                there = graph.find_shortest_chain(a, b, as_packages=True)
                back = graph.find_shortest_chain(b, a, as_packages=True) if there else None
                if back:
                    circles.append({"siblings": (a, b), "chains": (there, back)})
        return ContractCheck(kept=not circles, metadata={"circles": circles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for circle in check.metadata["circles"]:
            a, b = circle["siblings"]
            output.print_error(f"{a} and {b} import each other:")
            for chain in circle["chains"]:
                output.indent_cursor()
                output.print_error(" -> ".join(chain), bold=False)
            output.new_line()
