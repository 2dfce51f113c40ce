"""The shape of the package: what may import what, and where modules are swapped."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moepress"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved against the package), anywhere in it."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:len(parts) - node.level])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_model_view_never_imports_the_runtime():
    """model/ describes checkpoints; runtime/ computes with packed weights and imports model/, not back."""
    for path in (PACKAGE / "model").glob("*.py"):
        offending = sorted(n for n in _imports(path) if n.startswith("moepress.runtime"))
        assert not offending, f"{path.name} imports {offending}"


def test_one_routine_swaps_modules():
    """Compression and loading install packed modules through moepress/runtime/install.py only."""
    callers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("install.py", "view.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "set_submodule":
                callers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not callers, f"modules swapped outside runtime/install.py: {callers}"


def test_one_layer_loop():
    """Calibration, the cost table and compression all run through pipeline/runner.LayerLoop."""
    for name in ("calibrate.py", "costs.py", "compress.py"):
        text = (PACKAGE / name).read_text()
        assert "LayerLoop(" in text, name
        assert "for layer in tqdm(range(view.num_layers)" not in text, name
