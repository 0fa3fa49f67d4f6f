"""`trainguard run` checks the environment the job runs in, found from the job's command, not its own.

Regression for the drill's group (c) attacks (`trainguard drill --attacks c`): a job started as
`trainguard run -- /other/venv/bin/python ...` (or a console script of that venv, such as torchrun) was
checked against the supervisor's own environment, so a `.pth` hook or an edited torch in the job's
environment launched unseen.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from trainguard.supervisor._preflight import job_interpreter


@pytest.fixture(scope="module")
def other_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv of the base interpreter, without pip: another environment than the one running the tests."""
    prefix = tmp_path_factory.mktemp("job") / "venv"
    venv.EnvBuilder(symlinks=True, with_pip=False).create(prefix)
    return prefix


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_the_interpreter_is_the_program_when_it_is_python(other_venv: Path) -> None:
    python = other_venv / "bin" / "python"
    assert job_interpreter([str(python), "-m", "torch.distributed.run"]) == str(python)


def test_a_console_script_runs_on_the_interpreter_its_shebang_names(other_venv: Path) -> None:
    python = other_venv / "bin" / "python"
    torchrun = _script(other_venv / "bin" / "torchrun", f"#!{python}\nimport sys\n")
    assert job_interpreter([str(torchrun), "--nproc-per-node=2", "train.py"]) == str(python)


def test_pips_trampoline_for_long_paths_names_the_interpreter(other_venv: Path, tmp_path: Path) -> None:
    python = other_venv / "bin" / "python"
    script = _script(tmp_path / "long", f"#!/bin/sh\n'''exec' {python} \"$0\" \"$@\"\n' '''\n")
    assert job_interpreter([str(script)]) == str(python)


def test_env_in_the_shebang_is_looked_up_on_the_path(
    other_venv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{other_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    script = _script(tmp_path / "job", "#!/usr/bin/env -S PYTHONHASHSEED=0 python3\n")
    assert job_interpreter([str(script)]) == str(other_venv / "bin" / "python3")


def test_a_shell_script_or_an_unknown_program_has_no_interpreter(tmp_path: Path) -> None:
    assert job_interpreter([str(_script(tmp_path / "run.sh", "#!/bin/sh\nexec true\n"))]) is None
    assert job_interpreter([str(tmp_path / "not-there")]) is None
    assert job_interpreter([]) is None


def test_pth_hook_in_the_job_interpreters_environment_refuses_the_launch(
    other_venv: Path, tmp_path: Path
) -> None:
    """The drill's `pth-hook`: the job runs on another venv than trainguard's, with no --python."""
    [site] = (other_venv / "lib").glob("python*/site-packages")
    hook = site / "zz_optim_speedups.pth"
    hook.write_text("import os\n")
    marker = tmp_path / "launched"
    job = [str(other_venv / "bin" / "python"), "-c", f"open({str(marker)!r}, 'w')"]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trainguard", "run", "--", *job],
            capture_output=True,
            text=True,
            env={**_outside_env(), "TRAINGUARD_HOME": str(tmp_path / "home")},
            timeout=300,
            check=False,
        )
    finally:
        hook.unlink()
    assert done.returncode == 1, done.stderr
    assert not marker.exists()
    assert f"the environment {other_venv} fails its check" in done.stderr
    assert f"pth-import {hook}" in done.stderr


def _outside_env() -> dict[str, str]:
    """This environment without the caller's trainguard settings (a baseline, a ledger)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")}
