"""Package hygiene: the library depends on what it imports, and on no model zoo."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_ac"
# import name -> distribution name, where they differ
DISTRIBUTION = {"typing_extensions": "typing_extensions"}


def _dependencies() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for req in project["dependencies"]:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.lower())
    return names


def _imported_top_level() -> set[str]:
    names = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency():
    third_party = {n for n in _imported_top_level()
                   if n not in sys.stdlib_module_names and n != "lightning_ac"}
    missing = {n for n in third_party if DISTRIBUTION.get(n, n).lower() not in _dependencies()}
    assert not missing, f"imported by lightning_ac but not in pyproject's dependencies: {missing}"


def test_no_model_zoo_and_nothing_undeclared_is_a_dependency():
    deps = _dependencies()
    assert not deps & {"torchvision", "transformers", "timm", "torchmetrics"}, deps
    imported = {DISTRIBUTION.get(n, n).lower() for n in _imported_top_level()}
    assert deps <= imported, f"declared but never imported: {deps - imported}"


def test_the_library_imports_no_recipe_benchmark_or_test_code():
    assert not _imported_top_level() & {"benchmarks", "recipes", "tests"}
