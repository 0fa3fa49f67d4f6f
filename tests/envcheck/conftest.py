"""Real environments for envcheck tests: a venv made by `python -m venv`, with wheels built here (a
wheel is a zip of files plus METADATA, WHEEL and RECORD) and installed by the venv's own pip, which
compiles bytecode and writes RECORD as it does for any package."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from trainguard.provenance import PrivateKey

GOOD_FILES = {
    "goodpkg/__init__.py": "from goodpkg.optim import step\n",
    "goodpkg/optim.py": "def step(weight, grad, lr=0.1):\n    return weight - lr * grad\n",
    "goodpkg/data.txt": "not code\n",
}


def build_wheel(
    directory: Path, name: str, version: str, files: Mapping[str, str], entry_points: str = ""
) -> Path:
    stem = f"{name.replace('-', '_')}-{version}"
    dist_info = f"{stem}.dist-info"
    members = dict(files)
    members[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if entry_points:
        members[f"{dist_info}/entry_points.txt"] = entry_points
    rows = []
    for path, text in members.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    rows.append(f"{dist_info}/RECORD,,")
    members[f"{dist_info}/RECORD"] = "\n".join(rows) + "\n"
    wheel = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in members.items():
            archive.writestr(path, text)
    return wheel


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def clean_environ() -> dict[str, str]:
    """The variables a verification is told about: none of the risky ones."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}


def pip_install(venv: Path, *wheels: Path) -> None:
    """Install with this interpreter's pip into `venv` (which has no pip of its own: fewer files)."""
    command = [sys.executable, "-m", "pip", "--python", str(venv_python(venv)), "install", "-q"]
    subprocess.run(
        [*command, "--no-index", "--no-deps", *map(str, wheels)],
        check=True,
        env={**clean_environ(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


@pytest.fixture(scope="session")
def template_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with goodpkg 1.0 installed by pip (made once; tests work on copies)."""
    root = tmp_path_factory.mktemp("template")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=clean_environ()
    )
    wheel = build_wheel(root, "goodpkg", "1.0", GOOD_FILES, "[console_scripts]\ngoodpkg = goodpkg:step\n")
    pip_install(venv, wheel)
    return venv


@pytest.fixture
def venv(template_venv: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template at a path of its own (pip's scripts and the pycs name the path,
    so each copy is checked against its own baseline)."""
    copy = tmp_path / "venv"
    shutil.copytree(template_venv, copy, symlinks=True)
    return copy


@pytest.fixture
def key() -> PrivateKey:
    return PrivateKey.generate("ed25519")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "tg-home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    monkeypatch.setenv("TRAINGUARD_LEDGER", str(home / "ledger.db"))
    return home
