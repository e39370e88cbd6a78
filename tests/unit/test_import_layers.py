"""Import direction (STYLE.md): a lower package never imports a higher one.

Every module under src/tramontane is parsed with `ast`, not imported, so the graph includes imports that only
run inside functions or under `if TYPE_CHECKING:` (a lazy import is still a dependency), relative imports are
resolved, and `importlib.import_module("...")` with a literal name counts too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import tramontane

SRC = Path(tramontane.__file__).parent

# (lower, higher): no module in or under `lower` may import anything in or under `higher`. Add rules here.
FORBIDDEN = [
    ("tramontane.models", "tramontane.generation"),
    ("tramontane.models", "tramontane.cli"),
    ("tramontane.models", "tramontane.dp"),
    ("tramontane.models", "tramontane.training"),
    ("tramontane.models", "tramontane.synth"),
    ("tramontane.models", "tramontane.report"),
    ("tramontane.models", "tramontane.audit"),
    ("tramontane.tensorfiles", "tramontane.models"),
    ("tramontane.tensorfiles", "tramontane.generation"),
    # the reports read the synthesizer's public surface (passed in), the schema from tables/
    ("tramontane.report", "tramontane.synth"),
    # tables/ (the public schema) sits below everything that uses a table
    ("tramontane.tables", "tramontane.synth"),
    ("tramontane.tables", "tramontane.report"),
    ("tramontane.tables", "tramontane.dp"),
    ("tramontane.tables", "tramontane.training"),
    ("tramontane.tables", "tramontane.models"),
    ("tramontane.datasets", "tramontane.synth"),
    ("tramontane.datasets", "tramontane.report"),
    # the release-manifest vocabulary is below the synthesizer and the reports that both speak it
    ("tramontane.manifest", "tramontane.synth"),
    ("tramontane.manifest", "tramontane.report"),
    # accounting (no torch) is below everything that spends privacy
    ("tramontane.accounting", "tramontane.synth"),
    ("tramontane.accounting", "tramontane.report"),
    ("tramontane.accounting", "tramontane.training"),
    ("tramontane.accounting", "tramontane.models"),
    # fine-tuning sits on top of models, dp, training and audit; none of them knows about it
    ("tramontane.models", "tramontane.finetune"),
    ("tramontane.dp", "tramontane.finetune"),
    ("tramontane.training", "tramontane.finetune"),
    ("tramontane.audit", "tramontane.finetune"),
    ("tramontane.generation", "tramontane.finetune"),
    ("tramontane.finetune", "tramontane.synth"),
    # federated learning and the agent are applications: nothing below them knows about them
    ("tramontane.audit", "tramontane.federated"),
    ("tramontane.dp", "tramontane.federated"),
    ("tramontane.accounting", "tramontane.federated"),
    ("tramontane.training", "tramontane.federated"),
    ("tramontane.models", "tramontane.agent"),
    ("tramontane.serve", "tramontane.agent"),
    ("tramontane.finetune", "tramontane.agent"),
    ("tramontane.agent", "tramontane.serve"),
    ("tramontane.agent", "tramontane.models"),
    ("tramontane.agent", "tramontane.dp"),
]


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass(frozen=True)
class Import:
    line: int
    statement: str  # as written, e.g. "from ..generation import generate"
    targets: tuple[str, ...]  # the absolute module names it may load


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in `source`, the source of `module`. `from X import y` may load X and X.y (y may be a
    submodule), so `from tramontane import cli` counts as importing the CLI."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = (target, *(f"{target}.{alias.name}" for alias in node.names if alias.name != "*"))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            targets = (node.args[0].value,)
        else:
            continue
        found.append(Import(node.lineno, ast.unparse(node), targets))
    return found


def import_graph(root: Path = SRC) -> dict[str, list[tuple[str, Import]]]:
    """module -> [(its file, import)] for every module under `root`."""
    graph = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        rel = str(path.relative_to(root.parent))
        graph[module] = [(rel, imp) for imp in imports_of(path.read_text(), module, path.name == "__init__.py")]
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(graph: dict[str, list[tuple[str, Import]]], rules: list[tuple[str, str]]) -> list[str]:
    return [f"{module} ({file}:{imp.line}) `{imp.statement}`: {lower} must not import {higher}"
            for lower, higher in rules
            for module, edges in graph.items() if _within(module, lower)
            for file, imp in edges if any(_within(t, higher) for t in imp.targets)]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, Import]]]:
    return import_graph()


def test_no_forbidden_imports(graph):
    found = violations(graph, FORBIDDEN)
    assert not found, "imports against the layering (tests/unit/test_import_layers.py FORBIDDEN):\n" + \
        "\n".join(found)


def test_every_rule_names_existing_packages(graph):
    # A renamed package must not turn a rule into one that nothing can break.
    for lower, higher in FORBIDDEN:
        for package in (lower, higher):
            assert any(_within(m, package) for m in graph), f"no module {package} under {SRC}"


def test_the_graph_sees_the_known_imports(graph):
    edges = {m: {t for _, imp in e for t in imp.targets} for m, e in graph.items()}
    assert "tramontane.models.transformer" in edges["tramontane.generation.text"]
    assert "tramontane.models.vision" in edges["tramontane.generation.multimodal"]
    assert "tramontane.generation.text" in edges["tramontane.generation"]  # a package's __init__
    assert "tramontane.generation.multimodal" in edges["tramontane.cli"]  # imported inside a function


def test_relative_lazy_and_dynamic_imports_are_resolved():
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import layers\n"
        "from ..generation.text import generate\n"
        "if TYPE_CHECKING:\n"
        "    from tramontane import cli\n"
        "def f():\n"
        "    import tramontane.dp.engine\n"
        "    importlib.import_module('tramontane.training')\n"
    )
    found = {t for imp in imports_of(source, "tramontane.models.thing") for t in imp.targets}
    assert {"tramontane.models.layers", "tramontane.generation.text", "tramontane.cli",
            "tramontane.dp.engine", "tramontane.training"} <= found
    as_package = {t for imp in imports_of("from .network import X\n", "tramontane.models.vision", is_package=True)
                  for t in imp.targets}
    assert "tramontane.models.vision.network" in as_package


def test_a_forbidden_import_fails_with_module_file_and_line(tmp_path):
    (tmp_path / "tramontane" / "models").mkdir(parents=True)
    (tmp_path / "tramontane" / "__init__.py").write_text("")
    (tmp_path / "tramontane" / "models" / "__init__.py").write_text("")
    (tmp_path / "tramontane" / "models" / "bad.py").write_text(
        "import torch\n\n\ndef sample():\n    from ..generation import generate\n")
    found = violations(import_graph(tmp_path / "tramontane"), FORBIDDEN)
    assert found == [("tramontane.models.bad (tramontane/models/bad.py:5) `from ..generation import generate`: "
                      "tramontane.models must not import tramontane.generation")]
