"""The runtime's layers import only downwards: api ← plan ← master ← cluster ← shell.

``runtime/config.py`` (every layer reads its defaults), ``runtime/process.py`` (what every process
of the runtime sets up before its event loop: the shell's runner and a Ray TaskManager actor use it)
and ``runtime/testing.py`` (users' test utilities) sit outside the layers. A module that imports a layer above its own would tie the job
API to the job master or the CLI, which is what the sub-packages exist to prevent.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["api", "plan", "master", "cluster", "shell"]


def _imported_runtime_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if len(parts) >= 2 and parts[0] == "runtime" and parts[1] in LAYERS:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_no_layer_above_it(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    offending = {
        str(path.relative_to(ROOT)): sorted(_imported_runtime_layers(path) & above)
        for path in sorted((ROOT / "runtime" / layer).glob("*.py"))
    }
    assert {path: found for path, found in offending.items() if found} == {}


def test_every_runtime_module_is_in_a_layer_or_named_outside_them() -> None:
    top_level = {p.name for p in (ROOT / "runtime").glob("*.py")}
    assert top_level == {
        "__init__.py",
        "__main__.py",
        "config.py",
        "process.py",
        "testing.py",
        "version.py",
    }
    packages = {p.name for p in (ROOT / "runtime").iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(LAYERS)
