"""Imports run one way: errors/findings <- _pickle <- scan <- report <- cli, and errors <- ledger."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "trainguard"

# For each room, the trainguard rooms it must never import.
FORBIDDEN = {
    "errors": {"findings", "_pickle", "scan", "report", "cli"},
    "findings": {"_pickle", "scan", "report", "cli"},
    "_pickle": {"scan", "report", "cli", "errors", "findings"},
    "scan": {"report", "cli"},
    "report": {"cli"},
    # The ledger stands on errors alone: every later room writes to it, it reads none of them.
    "ledger": {"findings", "_pickle", "scan", "report", "cli", "_cli_ledger"},
    "_cli_ledger": {"_pickle", "scan", "report"},
}
FRAMEWORKS = {"torch", "numpy", "safetensors", "joblib", "transformers", "lightning", "pytorch_lightning"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _room(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_respects_the_layers(path: Path) -> None:
    room = _room(path)
    for name in _imports(path):
        parts = name.split(".")
        assert parts[0] not in FRAMEWORKS, f"{path.name} imports {name}: core modules stay framework-free"
        if parts[0] == "trainguard" and len(parts) > 1:
            target = parts[1]
            assert target not in FORBIDDEN.get(room, set()), f"{room} must not import {name}"
