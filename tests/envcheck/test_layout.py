"""resolve_layout and search_path against real venvs made by `python -m venv`, and search_path against the
sys.path their interpreters really build (running a venv we made ourselves is fine in a test)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.envcheck._layout import resolve_layout, search_path
from trainguard.errors import UsageError

VER = f"python{sys.version_info.major}.{sys.version_info.minor}"


def make_venv(path: Path, *, system_site: bool = False) -> Path:
    args = [sys.executable, "-m", "venv", "--without-pip", str(path)]
    if system_site:
        args.insert(-1, "--system-site-packages")
    subprocess.run(args, check=True, env={"PATH": "/usr/bin:/bin"})
    return path


def real_sys_path(venv: Path, environ: dict[str, str], cwd: Path) -> list[str]:
    """The sys.path the venv's interpreter builds, without the script directory ('' for -c)."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import json, sys; print(json.dumps(sys.path))"],
        check=True,
        capture_output=True,
        text=True,
        env=environ,
        cwd=cwd,
    ).stdout
    paths: list[str] = json.loads(out)
    assert paths[0] == ""
    return paths[1:]


def test_venv_by_prefix(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env")
    layout = resolve_layout(prefix=str(venv), environ={"HOME": str(tmp_path)})
    assert layout.prefix == str(venv)
    assert layout.is_venv
    assert not layout.system_site
    assert layout.version == sys.version_info[:2]
    assert os.path.realpath(layout.base_prefix) == os.path.realpath(sys.base_prefix)
    assert layout.stdlib == str(Path(layout.base_prefix, "lib", VER))
    assert layout.dynload == str(Path(layout.stdlib, "lib-dynload"))
    assert layout.site_dirs == (str(venv / "lib" / VER / "site-packages"),)
    assert layout.user_site is None  # a venv without system site packages disables it
    assert layout.executable == str(venv / "bin" / "python")
    assert layout.bin_dir == str(venv / "bin")


def test_venv_by_interpreter_is_the_same_environment(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env")
    by_prefix = resolve_layout(prefix=str(venv), environ={})
    named = str(venv / "bin" / f"python{sys.version_info.major}")
    by_python = resolve_layout(python=named, environ={})
    assert by_python.executable == named  # as the user named it, not resolved
    assert by_python == resolve_layout(prefix=str(venv), environ={}).__class__(
        **{**by_prefix.__dict__, "executable": named}
    )


def test_system_site_venv_adds_base_site_and_user_site(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env", system_site=True)
    layout = resolve_layout(prefix=str(venv), environ={"PYTHONUSERBASE": str(tmp_path / "ub")})
    assert layout.system_site
    assert layout.site_dirs[0] == str(venv / "lib" / VER / "site-packages")
    base_site = str(Path(layout.base_prefix, "lib", VER, "site-packages"))
    assert layout.site_dirs[1:] == ((base_site,) if Path(base_site).is_dir() else ())
    assert layout.user_site == str(tmp_path / "ub" / "lib" / VER / "site-packages")
    home = resolve_layout(prefix=str(venv), environ={"HOME": str(tmp_path / "h")})
    assert home.user_site == str(tmp_path / "h" / ".local" / "lib" / VER / "site-packages")
    off = resolve_layout(prefix=str(venv), environ={"PYTHONNOUSERSITE": "1"})
    assert off.user_site is None


def test_running_interpreter() -> None:
    layout = resolve_layout(environ={})
    assert layout.prefix == os.path.abspath(sys.prefix)  # noqa: PTH100 - lexical, as sys.prefix
    assert layout.base_prefix == os.path.abspath(sys.base_prefix)  # noqa: PTH100
    assert layout.is_venv == (sys.prefix != sys.base_prefix)
    assert layout.version == sys.version_info[:2]
    assert list(layout.site_dirs) == [d for d in site.getsitepackages() if Path(d).is_dir()]
    dynload = [p for p in sys.path if p.endswith("lib-dynload")]
    assert [layout.dynload] == dynload


def test_base_interpreter_is_an_install_prefix() -> None:
    real = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    layout = resolve_layout(python=real, environ={"HOME": "/nonexistent"})
    assert not layout.is_venv
    assert layout.system_site
    assert os.path.realpath(layout.prefix) == os.path.realpath(sys.base_prefix)
    assert layout.base_prefix == layout.prefix
    assert layout.version == sys.version_info[:2]
    assert layout.user_site == f"/nonexistent/.local/lib/{VER}/site-packages"
    by_prefix = resolve_layout(prefix=layout.prefix, environ={"HOME": "/nonexistent"})
    assert by_prefix.site_dirs == layout.site_dirs
    assert by_prefix.stdlib == layout.stdlib


def test_version_info_key_and_lib_dir(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env")
    cfg = venv / "pyvenv.cfg"
    lines = [line for line in cfg.read_text().splitlines() if not line.startswith("version")]
    cfg.write_text("\n".join([*lines, f"version_info = {sys.version_info.major}.{sys.version_info.minor}.0"]))
    assert resolve_layout(prefix=str(venv), environ={}).version == sys.version_info[:2]
    cfg.write_text("\n".join(lines))  # no version at all: the single lib/pythonX.Y directory decides
    assert resolve_layout(prefix=str(venv), environ={}).version == sys.version_info[:2]


def test_system_site_reads_pyvenv_cfg_as_site_does(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env")
    cfg = venv / "pyvenv.cfg"
    lines = [line for line in cfg.read_text().splitlines() if "system-site" not in line]
    for extra, expected in [
        ([], True),
        (["include-system-site-packages = TRUE"], True),
        (["include-system-site-packages = 1"], False),
    ]:
        cfg.write_text("\n".join([*lines, *extra]) + "\n")
        assert resolve_layout(prefix=str(venv), environ={}).system_site is expected


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("empty", "is not a Python environment"),
        ("nohome", "has no 'home' line"),
    ],
)
def test_bad_prefix_is_a_usage_error(tmp_path: Path, setup: str, needle: str) -> None:
    target = tmp_path / "target"
    if setup == "file":
        target.write_text("x")
    elif setup == "empty":
        target.mkdir()
    elif setup == "nohome":
        target.mkdir()
        (target / "pyvenv.cfg").write_text("version = 3.11.7\n")
    with pytest.raises(UsageError) as info:
        resolve_layout(prefix=str(target))
    assert needle in info.value.message
    assert str(target) in info.value.message


def test_bad_interpreter_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        resolve_layout(python=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="is a directory"):
        resolve_layout(python=str(tmp_path))
    loose = tmp_path / "python3"
    loose.write_text("")
    with pytest.raises(UsageError, match="not in a bin/ directory"):
        resolve_layout(python=str(loose))
    with pytest.raises(UsageError, match="not both"):
        resolve_layout(python=str(loose), prefix=str(tmp_path))


def test_search_path_matches_the_real_interpreter(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env")
    sp = venv / "lib" / VER / "site-packages"
    outside = tmp_path / "outside"
    outside.mkdir()
    (sp / "inside").mkdir()
    (sp / "b.pth").write_text(f"# comment\n\n{outside}\ninside\nimport sys\n/does/not/exist\n")
    (sp / "a.pth").write_text("inside\r\nimportnotreally\n")  # a duplicate, and a path line named import...
    (sp / "importnotreally").mkdir()
    extra = tmp_path / "pp"
    extra.mkdir()
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{extra}{os.pathsep}{outside}"}
    layout = resolve_layout(prefix=str(venv), environ=environ)
    entries = search_path(layout, environ)
    assert [e.path for e in entries] == real_sys_path(venv, environ, tmp_path)
    origins = {e.path: e.origin for e in entries}
    assert origins[str(extra)] == "PYTHONPATH"
    assert origins[str(sp)] == "site-packages"
    assert origins[str(sp / "inside")] == f"pth:{sp / 'a.pth'}"
    assert origins[str(sp / "importnotreally")] == f"pth:{sp / 'a.pth'}"
    assert origins[layout.stdlib] == "stdlib"


def test_search_path_with_user_site_matches_the_real_interpreter(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env", system_site=True)
    user_base = tmp_path / "ub"
    user_site = user_base / "lib" / VER / "site-packages"
    user_site.mkdir(parents=True)
    added = tmp_path / "from-user-pth"
    added.mkdir()
    (user_site / "u.pth").write_text(f"{added}\n")
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUSERBASE": str(user_base)}
    layout = resolve_layout(prefix=str(venv), environ=environ)
    entries = search_path(layout, environ)
    assert [e.path for e in entries] == real_sys_path(venv, environ, tmp_path)
    origins = {e.path: e.origin for e in entries}
    assert origins[str(user_site)] == "user-site"
    assert origins[str(added)] == f"pth:{user_site / 'u.pth'}"


def test_search_path_of_project_venv_matches_sys_path() -> None:
    """This very process: its sys.path (less the entries pytest and the script directory add)."""
    layout = resolve_layout(environ={})
    entries = [e.path for e in search_path(layout, {})]
    if not os.environ.get("PYTHONPATH"):
        assert [p for p in sys.path if p in entries] == entries
