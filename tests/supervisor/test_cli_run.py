"""The `trainguard run` command line: --help without torch, usage errors, what the attestation derives
from the command, and the layering of the supervisor room."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.supervisor._attest import world_size

SRC = Path(__file__).resolve().parents[2] / "src" / "trainguard"


def _trainguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from trainguard.cli import main\n"
        "try:\n"
        "    main(['run', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "import trainguard.supervisor._run\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
    assert "-- CMD" in done.stdout and "--heartbeat-timeout" in done.stdout


@pytest.mark.parametrize("args", [["run", "--no-env-check", "--"], ["run"], ["run", "--grace", "5"]])
def test_no_command_is_a_usage_error(args: list[str]) -> None:
    done = _trainguard(*args)
    assert done.returncode == 2
    assert "no command to run: give it after --" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--grace", "0", "--", "true"],
        ["run", "--heartbeat-timeout", "soon", "--", "true"],
        ["run", "--no-env-check", "--baseline", "b.json", "--", "true"],
    ],
)
def test_bad_options_are_usage_errors(args: list[str]) -> None:
    assert _trainguard(*args).returncode == 2


@pytest.mark.parametrize(
    ("command", "environ", "expected"),
    [
        (["torchrun", "--nproc-per-node", "4", "--nnodes", "2", "train.py"], {}, 8),
        (["torchrun", "--nproc_per_node=8", "train.py", "--nnodes", "5"], {}, 8),
        (["torchrun", "--standalone", "--nproc-per-node=2", "train.py"], {}, 2),
        (["torchrun", "--nnodes=1:4", "--nproc-per-node=2", "train.py"], {}, None),
        (["torchrun", "--nproc-per-node", "gpu", "train.py"], {}, None),
        (["python3", "-m", "torch.distributed.run", "--nproc-per-node", "3", "train.py"], {}, 3),
        (["python", "train.py"], {}, None),
        (["python", "train.py"], {"WORLD_SIZE": "16"}, 16),
    ],
)
def test_world_size(command: list[str], environ: dict[str, str], expected: int | None) -> None:
    assert world_size(command, environ) == expected


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# relay: the spool and delivery of `run --server`, standard library only.
ALLOWED = {"errors", "ledger", "envcheck", "provenance", "_cli_common", "supervisor", "relay"}
ALLOWED_MONITOR = {"trainguard.monitor._heartbeat", "trainguard.monitor._signals"}


def test_the_supervisor_imports_only_what_it_may() -> None:
    for path in sorted((SRC / "supervisor").rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            assert parts[0] not in ("torch", "numpy"), f"{path.name} imports {name}"
            if parts[0] == "trainguard" and len(parts) > 1:
                assert parts[1] in ALLOWED or name in ALLOWED_MONITOR, f"{path.name} imports {name}"


def test_the_job_side_is_standard_library_only() -> None:
    for name in ("_heartbeat.py", "_signals.py"):
        imported = _imports(SRC / "monitor" / name)
        assert not {n for n in imported if n.split(".")[0] == "trainguard"}, name
        assert all(n.split(".")[0] in sys.stdlib_module_names or n == "__future__" for n in imported), name


def test_only_the_command_line_imports_the_supervisor() -> None:
    for path in sorted(SRC.rglob("*.py")):
        if path.is_relative_to(SRC / "supervisor"):
            continue
        assert not any(n.split(".")[:2] == ["trainguard", "supervisor"] for n in _imports(path)), path
