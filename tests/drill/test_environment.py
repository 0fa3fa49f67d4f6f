"""The drill's group (c): the shared PyTorch install edited, on a hard-linked copy of the job's environment.

The copy shares its files' bytes with the real environment, so these tests check what must never happen:
a tampered file written through a link into the real install. And they check that each attack is real
(its payload arms itself on the last rank when nothing stops it) and that `trainguard drill` catches all
three before the job runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainguard.drill._attacks import MARKER
from trainguard.drill._environment import EnvironmentCopy, _build
from trainguard.drill._play_env import PLANT

pytestmark = pytest.mark.torch

ADAM = Path("torch") / "optim" / "adam.py"


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvironmentCopy]:
    """A copy of this environment (no baseline: the drill test below takes one)."""
    folder = tmp_path_factory.mktemp("environment")
    yield _build(folder / "venv", folder / "baseline.json")


def _state(path: Path) -> tuple[str, int, int]:
    """A real file as the tests compare it: its digest, inode and mtime."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _real_files(copy: EnvironmentCopy) -> dict[str, tuple[str, int, int]]:
    """The real files the attacks tamper with in the copy: torch's optimizer and its RECORD."""
    [record] = copy.source_site.glob("torch-*.dist-info/RECORD")
    return {str(p): _state(p) for p in (copy.source_site / ADAM, record)}


def test_the_copy_links_the_real_files_and_runs_on_its_own_interpreter(copy: EnvironmentCopy) -> None:
    if copy.copied:
        pytest.skip(f"the copy could not link ({copy.link_error}): nothing is shared to check")
    assert (copy.site / ADAM).stat().st_ino == (copy.source_site / ADAM).stat().st_ino
    assert (copy.source_site / ADAM).stat().st_nlink >= 2
    probe = "import importlib.util, sys, trainguard; print(sys.prefix); "
    probe += "print(importlib.util.find_spec('torch').origin); print(trainguard.__file__)"
    done = subprocess.run(
        [str(copy.python), "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    prefix, torch_init, trainguard_init = done.stdout.split()
    assert Path(prefix) == copy.prefix
    assert Path(torch_init).is_relative_to(copy.site)
    # The editable install still points at the source tree, as in the real environment.
    assert Path(trainguard_init).resolve() == Path(sys.modules["trainguard"].__file__ or "").resolve()


@pytest.mark.parametrize("attack", sorted(PLANT))
def test_an_attack_on_the_copy_never_touches_the_real_files(copy: EnvironmentCopy, attack: str) -> None:
    real_before = _real_files(copy)
    listing_before = _names(copy.source_site)
    expected = PLANT[attack](copy, 2)
    try:
        assert _real_files(copy) == real_before
        assert _names(copy.source_site) == listing_before
        if attack == "torch-optimizer-edited":
            tampered = (copy.site / ADAM).stat()
            assert tampered.st_ino != (copy.source_site / ADAM).stat().st_ino
            assert tampered.st_nlink == 1  # a new file, renamed over the link: nothing shared
        _assert_armed(copy)
        assert expected.path.is_relative_to(copy.site)
    finally:
        copy.restore()
    assert _real_files(copy) == real_before
    assert _names(copy.site) == listing_before
    assert (copy.site / ADAM).read_bytes() == (copy.source_site / ADAM).read_bytes()
    if not copy.copied:
        assert (copy.site / ADAM).stat().st_ino == (copy.source_site / ADAM).stat().st_ino


def _assert_armed(copy: EnvironmentCopy) -> None:
    """The payload, left alone, arms itself on the last rank: AdamW's update function is replaced."""
    probe = (
        "import importlib, torch; adam = importlib.import_module('torch.optim.adam'); "
        "print(adam._single_tensor_adam.__qualname__)"
    )
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(copy.python), "-c", probe], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert MARKER in done.stderr
    assert done.stdout.strip() == "_drill_flip.<locals>.reversed_from_step.<locals>.patched"


def test_a_drill_of_group_c_catches_every_attack_before_the_job_runs(tmp_path: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    real_before = _state(site / ADAM)
    home = tmp_path / "user-home"
    home.mkdir()
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "drill", "--attacks", "c", "--steps", "12", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRAINGUARD_HOME": str(home)},
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-8000:]
    report = json.loads((out / "drill.json").read_text())
    by_name = {a["name"]: a for a in report["attacks"]}
    assert sorted(by_name) == ["pth-hook", "rogue-entry-point", "torch-optimizer-edited"]
    for attack in by_name.values():
        assert attack["caught"], attack
        assert attack["detected_by"] == "preflight: environment check against the baseline"
        assert attack["evidence"]["inclusion_proof_verified"] is True
        assert attack["details"].startswith("launch refused")
    edited = by_name["torch-optimizer-edited"]["named"]
    assert edited.startswith("modified torch/optim/adam.py") and "RECORD row was rewritten" in edited
    assert by_name["pth-hook"]["named"].startswith("pth-import zz_optim_speedups.pth")
    assert "'cpu_fastpath' in group 'torch.backends'" in by_name["rogue-entry-point"]["named"]
    assert MARKER not in done.stdout + done.stderr
    assert _state(site / ADAM) == real_before
    assert sorted(p.name for p in home.iterdir()) == []  # the baseline and its cache stayed in the workspace
