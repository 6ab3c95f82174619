"""import-linter contract types of our own (pyproject's [tool.importlinter] names them)."""

from __future__ import annotations

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, output


class AcyclicModulesContract(Contract):
    """No import cycle among the modules of the root packages, across packages and through imports made
    inside functions: a cycle hidden by a lazy import is still two modules that need each other."""

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        ours = {m for m in graph.modules if m.split(".")[0] in self.session_options["root_packages"]}
        cycles = set()
        for importer in sorted(ours):
            for imported in sorted(graph.find_modules_directly_imported_by(importer) & ours):
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                if back:  # importer -> imported -> ... -> importer
                    cycles.add(min(_rotations((importer, *back[:-1]))))
        return ContractCheck(kept=not cycles, metadata={"cycles": sorted(cycles)})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(" -> ".join((*cycle, cycle[0])), bold=False)
            output.new_line()


def _rotations(cycle: tuple[str, ...]) -> list[tuple[str, ...]]:
    """A cycle written from each of its modules: the smallest names it once, whoever found it."""
    return [cycle[i:] + cycle[:i] for i in range(len(cycle))]
