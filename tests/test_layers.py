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
    "scan": {"report", "cli", "ledger", "provenance", "gate"},
    "report": {"cli"},
    # The ledger stands on errors alone: every later room writes to it, it reads none of them.
    "ledger": {"findings", "_pickle", "scan", "report", "cli", "_cli_ledger", "provenance", "gate", "relay"},
    "_cli_ledger": {"_pickle", "scan", "report", "provenance"},
    # Signing and verifying stand on errors alone; the gate puts them together with scan and ledger.
    "provenance": {"_pickle", "scan", "report", "cli", "ledger", "gate"},
    "gate": {"cli", "report"},
    "_cli_provenance": {"_pickle", "scan", "report", "ledger", "provenance"},
    # The environment check reads files and keys; it never scans artifacts or loads checkpoints.
    "envcheck": {"_pickle", "scan", "report", "cli", "gate"},
    "_cli_env": {"_pickle", "scan", "report", "ledger", "provenance", "envcheck"},
    # `trainguard run` registers its handler by name: the supervisor room loads only when it runs.
    "_cli_run": {"_pickle", "scan", "report", "ledger", "provenance", "envcheck", "supervisor"},
    # The monitor stands on the ledger and the in-process code checks; it loads checkpoints only through
    # the gate (to roll back), never by itself.
    "monitor": {"_pickle", "scan", "report", "cli"},
    # The drill runs the job and the commands as processes; it reads the ledger and signs with keys.
    "drill": {"_pickle", "scan", "report", "cli", "monitor", "supervisor"},
    "_cli_drill": {"_pickle", "scan", "report", "ledger", "provenance", "envcheck", "drill"},
    # The job side of the server: a spool and its delivery, on the ledger's events and nothing later.
    "relay": {
        "findings",
        "_pickle",
        "scan",
        "report",
        "cli",
        "provenance",
        "gate",
        "envcheck",
        "supervisor",
    },
    # The server's access control stands on errors and the ledger's store (its tokens live beside it).
    "server": {
        "findings",
        "_pickle",
        "scan",
        "report",
        "cli",
        "provenance",
        "gate",
        "envcheck",
        "supervisor",
    },
    "_cli_server": {"_pickle", "scan", "report", "ledger", "provenance", "envcheck", "server"},
    "_cli_relay": {"_pickle", "scan", "report", "ledger", "provenance", "envcheck", "relay"},
}
# Nothing imports the monitor or the drill but the command line.
for _room, _forbidden in FORBIDDEN.items():
    if _room != "monitor":
        _forbidden.add("monitor")
    if _room != "drill":
        _forbidden.add("drill")
    # Nothing imports the server but the command line, by name, when a `server` command runs.
    if _room != "server":
        _forbidden.add("server")
FRAMEWORKS = {"torch", "numpy", "safetensors", "joblib", "transformers", "lightning", "pytorch_lightning"}


# Rooms that adapt trainguard to the frameworks: they may import one inside a function, never at the top.
ADAPTERS = {"gate"}
# Rooms built on torch: their modules import it at the top; their package __init__ must stay lazy.
TORCH_ROOMS = {"monitor"}
# The drill's training job: scripts run in their own processes, never imported by the package.
JOB_SCRIPTS = "drill/job/"
# Framework callbacks in a torch room: each may import its own framework at the top as well.
FRAMEWORK_MODULES = {
    "monitor/hf.py": {"transformers"},
    "monitor/lightning.py": {"lightning"},
    "monitor/pytorch_lightning.py": {"pytorch_lightning"},
}


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_command_line_imports_the_server() -> None:
    """Rooms without a FORBIDDEN entry too: the server room is reached only through `trainguard server`."""
    for path in SRC.rglob("*.py"):
        if _room(path) not in {"server", "cli", "_cli_server"}:
            server = [name for name in _imports(path) if name.split(".")[:2] == ["trainguard", "server"]]
            assert not server, f"{path.relative_to(SRC)} imports {server[0]}: only the CLI may"


def _room(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_respects_the_layers(path: Path) -> None:
    room = _room(path)
    framework_imports = _imports(path, top_level_only=room in ADAPTERS)
    if path.relative_to(SRC).as_posix().startswith(JOB_SCRIPTS):
        framework_imports = {name for name in framework_imports if name.split(".")[0] != "torch"}
    if room in TORCH_ROOMS and path.name != "__init__.py":
        own = {"torch", *FRAMEWORK_MODULES.get(path.relative_to(SRC).as_posix(), ())}
        framework_imports = {name for name in framework_imports if name.split(".")[0] not in own}
    for name in framework_imports:
        assert name.split(".")[0] not in FRAMEWORKS, f"{path.name} imports {name}: frameworks load lazily"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "trainguard" and len(parts) > 1:
            target = parts[1]
            assert target not in FORBIDDEN.get(room, set()), f"{room} must not import {name}"
