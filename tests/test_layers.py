"""The package's layers: every import (lazy ones inside functions included) goes down the stack, never up or
sideways into a cycle. Imports only needed for type checking (`if TYPE_CHECKING:`) are not dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lora_cli"

# Bottom to top; a unit may import units of lower layers only (units of one layer never import each other).
LAYERS: list[set[str]] = [
    {"__init__", "errors", "builtin"},
    {"io", "units", "sharded_tensors"},
    {"diffusion"},
    {"models"},
    {"adapters"},
    {"config"},  # the preset schema asks the registries (algorithm capabilities, quantization modes)
    {"toolbox", "sampling", "capabilities"},
    {"training"},
    {"planning"},
    {"toy"},
    {"cli"},
]


def unit_of(path: Path) -> str:
    """The package (or top-level module) a source file belongs to."""
    parts = path.relative_to(ROOT).parts
    return parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for node in ast.walk(guard)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if (
                parts[0] == "lora_cli"
                and len(parts) > 1
                and (ROOT / parts[1]).exists() | (ROOT / f"{parts[1]}.py").exists()
            ):
                found.add(parts[1])
    return found


def dependency_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        unit = unit_of(path)
        graph.setdefault(unit, set()).update(imported_units(path) - {unit})
    return graph


def test_every_unit_has_a_layer() -> None:
    placed = set().union(*LAYERS)
    assert set(dependency_graph()) <= placed, f"place these in LAYERS: {set(dependency_graph()) - placed}"


def test_imports_only_go_down() -> None:
    rank = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
    upward = sorted(
        f"{unit} imports {other}"
        for unit, imports in dependency_graph().items()
        for other in imports
        if rank[other] >= rank[unit]
    )
    assert not upward, "imports that go up or sideways: " + "; ".join(upward)


def test_the_checker_sees_lazy_imports_and_ignores_type_only_ones(tmp_path: Path) -> None:
    source = tmp_path / "lora_cli" / "models" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lora_cli.training.session import TrainingSession\n"
        "def f():\n    from lora_cli.adapters import registry\n    import lora_cli.io.atomic\n"
    )
    assert imported_units(source) == {"adapters", "io"}
