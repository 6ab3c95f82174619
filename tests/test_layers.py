"""The packages' one-way layers (pyproject's [tool.importlinter] contracts), checked with import-linter."""

import subprocess
import sys
from pathlib import Path

import grimp

from tests.import_contracts import AcyclicModulesContract

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in done.stdout


def _check(imports: list[tuple[str, str]]):
    graph = grimp.ImportGraph()
    for importer, imported in imports:
        graph.add_import(importer=importer, imported=imported)
    contract = AcyclicModulesContract(name="acyclic", session_options={"root_packages": ["ours", "theirs"]},
                                      contract_options={})
    return contract.check(graph, verbose=False)


def test_a_cycle_is_found_across_packages_and_named_once():
    # the cycle this contract was written for: a pipeline loading through the converter, which imported it back
    check = _check([("theirs.pipeline_io", "ours.pipeline"), ("ours.pipeline", "theirs.pipeline_io"),
                    ("ours.pipeline", "ours.sampling"), ("ours.pipeline", "numpy")])
    assert not check.kept
    assert check.metadata["cycles"] == [("ours.pipeline", "theirs.pipeline_io")]
    long = _check([("ours.a", "ours.b"), ("ours.b", "theirs.c"), ("theirs.c", "ours.a"), ("ours.a", "ours.d")])
    assert long.metadata["cycles"] == [("ours.a", "ours.b", "theirs.c")]


def test_one_way_imports_keep_the_contract():
    assert _check([("theirs.pipeline_io", "ours.pipeline_settings"), ("ours.pipeline", "theirs.pipeline_io"),
                   ("ours.pipeline", "ours.pipeline_settings"), ("ours.pipeline", "numpy")]).kept
