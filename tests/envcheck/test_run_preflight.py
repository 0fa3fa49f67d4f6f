"""`trainguard run`'s environment check without a baseline, on a real venv: what refuses the launch and
what is only shown. A pytest plug-in does not reach a job that is not a pytest run; a torch device-backend
autoload reaches every job that imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import build_wheel, pip_install, venv_python


def _run(home: Path, venv: Path, *job: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home.parent / "user-home"),
        "TRAINGUARD_HOME": str(home),
    }
    return subprocess.run(
        [sys.executable, "-m", "trainguard", "run", "--python", str(venv_python(venv)), "--", *job],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _install_plugin(venv: Path, tmp_path: Path, group: str, name: str = "tg") -> None:
    files = {"tgplugin/__init__.py": "def setup():\n    pass\n"}
    wheel = build_wheel(tmp_path, "tgplugin", "1.0", files, entry_points=f"[{group}]\n{name} = tgplugin\n")
    pip_install(venv, wheel)


@pytest.mark.parametrize(
    ("group", "job_is_pytest", "launched"),
    [("pytest11", False, True), ("pytest11", True, False), ("torch.backends", False, False)],
)
def test_a_first_run_without_a_baseline(
    venv: Path, tmp_path: Path, group: str, job_is_pytest: bool, launched: bool
) -> None:
    _install_plugin(venv, tmp_path, group)
    marker = tmp_path / "launched"
    script = tmp_path / ("pytest_job.py" if job_is_pytest else "train.py")
    script.write_text(f"open({str(marker)!r}, 'w')\n")
    done = _run(tmp_path / "home", venv, str(venv_python(venv)), str(script))
    assert marker.exists() == launched, done.stderr
    if launched:
        assert done.returncode == 0, done.stderr
        assert "note: 1 finding(s) describe how the environment was installed" in done.stderr
        assert f"group {group!r}" in done.stderr
    else:
        assert done.returncode == 1, done.stderr
        assert "not launching" in done.stderr and f"group {group!r}" in done.stderr
    assert (tmp_path / "home").is_dir()


def test_a_torch_autoload_named_like_a_pytest_plugin_still_refuses_the_launch(
    venv: Path, tmp_path: Path
) -> None:
    # The finding's message quotes the entry point's name: a name spelling 'pytest11' must not make a
    # torch.backends autoload pass for a pytest plug-in (the rule reads the group, not the message).
    _install_plugin(venv, tmp_path, "torch.backends", name="'pytest11'")
    marker = tmp_path / "launched"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w')\n")
    done = _run(tmp_path / "home", venv, str(venv_python(venv)), str(script))
    assert not marker.exists(), done.stderr
    assert done.returncode == 1, done.stderr
    assert "not launching" in done.stderr and "group 'torch.backends'" in done.stderr
