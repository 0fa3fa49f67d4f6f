"""find_injections on real venvs: each injection point planted as an attacker would, then found; the
legitimate files (setuptools' distutils-precedence.pth, a path line inside the env) are not findings.
Where it matters the venv's own interpreter is run to show the planted file really executes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from trainguard.envcheck._dists import read_distributions
from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._injection import find_injections
from trainguard.envcheck._layout import Layout, resolve_layout
from trainguard.findings import Severity

from .test_dists import write_dist
from .test_layout import VER, make_venv

DISTUTILS_PTH = (
    "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') == 'local'; "
    "enabled and __import__('_distutils_hack').add_shim(); \n"
)


def scan(venv: Path, environ: Mapping[str, str] | None = None) -> list[EnvFinding]:
    env = dict(environ or {})
    layout = resolve_layout(prefix=str(venv), environ=env)
    dists = [d for site_dir in layout.site_dirs for d in read_distributions(site_dir)]
    findings = find_injections(layout, dists, env)
    for finding in findings:
        assert finding.message and finding.advice.endswith("."), finding
    assert findings == sorted(findings, key=EnvFinding.sort_key)
    return findings


def kinds(findings: list[EnvFinding]) -> list[tuple[str, str]]:
    return [(f.kind, Path(f.path).name) for f in findings]


def run_python(venv: Path, environ: Mapping[str, str] | None = None) -> None:
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", "pass"],
        check=True,
        env={"PATH": "/usr/bin:/bin", **(environ or {})},
    )


@pytest.fixture
def env(tmp_path: Path) -> Path:
    return make_venv(tmp_path / "env")


def sp(venv: Path) -> Path:
    return venv / "lib" / VER / "site-packages"


def test_clean_venv_has_no_findings(env: Path) -> None:
    assert scan(env) == []


def test_pth_import_line_runs_and_is_found(env: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (sp(env) / "zz-evil.pth").write_text(f"# looks harmless\nimport\tos; open({str(marker)!r}, 'w')\n")
    run_python(env)
    assert marker.exists()  # site.py really executed it
    [finding] = scan(env)
    assert (finding.kind, finding.severity, finding.path) == (
        "pth-import",
        Severity.HIGH,
        str(sp(env) / "zz-evil.pth"),
    )
    assert "open(" in finding.message and "every interpreter start" in finding.message


def test_import_without_space_is_a_path_line(env: Path) -> None:
    (sp(env) / "p.pth").write_text("importlib_thing\n")  # not executed: a (missing, inside) path
    assert scan(env) == []


def test_distutils_precedence_is_recognised_exactly(env: Path) -> None:
    (sp(env) / "distutils-precedence.pth").write_text(DISTUTILS_PTH)
    assert scan(env) == []
    (sp(env) / "distutils-precedence.pth").write_text(
        DISTUTILS_PTH.replace("add_shim()", "add_shim();import evil")
    )
    assert kinds(scan(env)) == [("pth-import", "distutils-precedence.pth")]
    (sp(env) / "distutils-precedence.pth").unlink()
    (sp(env) / "other.pth").write_text(DISTUTILS_PTH)  # the right content under another name
    assert kinds(scan(env)) == [("pth-import", "other.pth")]


def test_pth_path_outside_the_environment(env: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (sp(env) / "inside").mkdir()
    (outside / "link-target").mkdir()
    (sp(env) / "sneaky").symlink_to(outside / "link-target")
    (sp(env) / "ok.pth").write_text("inside\n")
    (sp(env) / "bad.pth").write_text(f"{outside}\nsneaky\n/not/there/yet\n")
    [finding] = scan(env)
    assert (finding.kind, finding.severity) == ("pth-path", Severity.MEDIUM)
    assert str(outside) in finding.message and "sneaky" in finding.message
    assert "/not/there/yet (does not exist yet)" in finding.message
    assert "3 director" in finding.message


def test_editable_pth_and_finder(env: Path, tmp_path: Path) -> None:
    finder = "__editable___proj_1_0_finder"
    (sp(env) / "__editable__.proj-1.0.pth").write_text(f"import {finder}; {finder}.install()\n")
    (sp(env) / f"{finder}.py").write_text("def install(): pass\n")
    assert kinds(scan(env)) == [("editable-install", "__editable__.proj-1.0.pth")]
    (sp(env) / "__editable__.proj-1.0.pth").write_text(f"import {finder}; {finder}.install(); import evil\n")
    assert kinds(scan(env)) == [
        ("pth-import", "__editable__.proj-1.0.pth"),
        ("editable-install", "__editable__.proj-1.0.pth"),
    ]
    (sp(env) / "__editable__.proj-1.0.pth").unlink()
    assert kinds(scan(env)) == [("editable-install", f"{finder}.py")]  # a finder nothing loads


def test_editable_distribution(env: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    url = f'{{"url": "file://{tmp_path}", "dir_info": {{"editable": true}}}}'
    write_dist(sp(env), "proj", "1.0", {"_proj.pth": f"{src}\n"}, direct_url=url)
    findings = scan(env)
    assert kinds(findings) == [("editable-install", "_proj.pth"), ("editable-install", "proj-1.0.dist-info")]
    assert all(f.distribution == "proj" for f in findings)
    assert str(tmp_path) in findings[1].message


@pytest.mark.parametrize(
    "form", ["sitecustomize.py", "sitecustomize/__init__.py", "sitecustomize.cpython-311-x86_64-linux-gnu.so"]
)
def test_sitecustomize(env: Path, form: str) -> None:
    target = sp(env) / form
    target.parent.mkdir(exist_ok=True)
    target.write_text("")
    [finding] = scan(env)
    module = sp(env) / form.split("/")[0]  # a package is reported by its directory
    assert (finding.kind, finding.severity, finding.path) == ("sitecustomize", Severity.HIGH, str(module))


def test_sitecustomize_namespace_dir_is_not_code(env: Path) -> None:
    (sp(env) / "sitecustomize").mkdir()  # imports as an empty namespace package: runs nothing
    assert scan(env) == []


def test_sitecustomize_on_pythonpath_runs_and_is_found(env: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w')\n")
    environ = {"PYTHONPATH": str(pp)}
    run_python(env, environ)
    assert marker.exists()
    assert kinds(scan(env, environ)) == [("env-var", "PYTHONPATH"), ("sitecustomize", "sitecustomize.py")]


def test_user_site_and_usercustomize(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "env", system_site=True)
    user_site = tmp_path / "ub" / "lib" / VER / "site-packages"
    user_site.mkdir(parents=True)
    (user_site / "usercustomize.py").write_text("")
    environ = {"HOME": str(tmp_path / "home"), "PYTHONUSERBASE": str(tmp_path / "ub")}

    def ours(findings: list[EnvFinding]) -> list[EnvFinding]:
        # the base install's site-packages is on the path too; what it holds is not this test's
        return [f for f in findings if f.kind == "env-var" or f.path.startswith(str(tmp_path))]

    assert kinds(ours(scan(venv, environ))) == [
        ("env-var", "PYTHONUSERBASE"),
        ("usercustomize", "usercustomize.py"),
        ("user-site", "site-packages"),
    ]
    assert ours(scan(venv, {**environ, "PYTHONUSERBASE": ""})) == []
    # the same user site is not loaded by a venv without system site packages: nothing to report
    plain = make_venv(tmp_path / "plain")
    assert kinds(scan(plain, environ)) == [("env-var", "PYTHONUSERBASE")]
    assert scan(plain, environ)[0].severity == Severity.MEDIUM


@pytest.mark.parametrize(
    ("name", "value", "severity"),
    [
        ("PYTHONPATH", "/x", Severity.HIGH),
        ("PYTHONHOME", "/x", Severity.HIGH),
        ("PYTHONSTARTUP", "/x/s.py", Severity.HIGH),
        ("PYTHONWARNINGS", "ignore", Severity.MEDIUM),
        ("PYTHONWARNINGS", "ignore::evilpkg.Warn", Severity.HIGH),
        ("PYTHONBREAKPOINT", "evil.bp", Severity.MEDIUM),
        ("PYTHONINSPECT", "1", Severity.MEDIUM),
        ("PYTHONEXECUTABLE", "/x", Severity.MEDIUM),
        ("PYTHONPLATLIBDIR", "lib99", Severity.HIGH),
        ("PYTHONPYCACHEPREFIX", "/tmp/c", Severity.MEDIUM),
        ("LD_PRELOAD", "/tmp/evil.so", Severity.HIGH),
        ("LD_AUDIT", "/tmp/a.so", Severity.HIGH),
        ("LD_LIBRARY_PATH", "/opt/cuda/lib64", Severity.MEDIUM),
    ],
)
def test_env_vars(env: Path, name: str, value: str, severity: Severity) -> None:
    [finding] = scan(env, {name: value, "HOME": "/nonexistent"})
    assert (finding.kind, finding.path, finding.severity) == ("env-var", name, severity)
    assert f"{name}={value!r}" in finding.message


def test_harmless_and_empty_env_vars(env: Path) -> None:
    environ = {
        "PYTHONSAFEPATH": "1",
        "TORCH_DEVICE_BACKEND_AUTOLOAD": "0",
        "PYTHONPATH": "",
        "LD_PRELOAD": "",
    }
    assert scan(env, environ) == []


def test_shadowed_module_from_pth_dir_and_pythonpath(env: Path, tmp_path: Path) -> None:
    (sp(env) / "torch").mkdir()
    (sp(env) / "torch" / "__init__.py").write_text("")
    evil = tmp_path / "evil"
    (evil / "torch").mkdir(parents=True)
    (evil / "torch" / "__init__.py").write_text("")
    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / "json.py").write_text("")  # ahead of the standard library
    (pp / "torch").mkdir()  # a namespace portion: a regular package later on wins, no shadowing
    (sp(env) / "evil.pth").write_text(f"{evil}\n")
    findings = scan(env, {"PYTHONPATH": str(pp)})
    shadows = {f.path: f for f in findings if f.kind == "shadowed-module"}
    assert set(shadows) == {str(pp / "json.py")}
    # the pth dir comes after site-packages: its torch is the one hidden, the pth-path finding says why
    assert kinds(findings) == [
        ("env-var", "PYTHONPATH"),
        ("shadowed-module", "json.py"),
        ("pth-path", "evil.pth"),
    ]
    # the user's torch on PYTHONPATH hides the installed one
    (pp / "torch" / "__init__.py").write_text("")
    findings = scan(env, {"PYTHONPATH": str(pp)})
    torch = next(f for f in findings if f.kind == "shadowed-module" and "torch" in f.path)
    assert torch.path == str(pp / "torch") and str(sp(env) / "torch") in torch.message


def test_autoload_entry_point(env: Path) -> None:
    write_dist(
        sp(env),
        "rogue-backend",
        "0.1",
        {"rogue/__init__.py": ""},
        entry_points="[torch.backends]\nrogue = rogue:autoload\n",
    )
    write_dist(
        sp(env), "plugin", "1", {}, entry_points="[pytest11]\np = plugin.mod\n[console_scripts]\nx = y:z\n"
    )
    findings = scan(env)
    assert [(f.kind, f.distribution, f.severity) for f in findings] == [
        ("autoload-entry-point", "plugin", Severity.HIGH),
        ("autoload-entry-point", "rogue-backend", Severity.HIGH),
    ]
    torch = findings[1]
    assert "'torch.backends'" in torch.message and "rogue:autoload" in torch.message
    assert "import torch" in torch.message and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in torch.advice


def test_unreadable_pth_is_reported(env: Path) -> None:
    os.mkfifo(sp(env) / "fifo.pth")
    assert kinds(scan(env)) == [("pth-unreadable", "fifo.pth")]


def test_project_venv_findings_are_real() -> None:
    """The project's venv: print what is found and check each is really there (pytest plug-ins and the
    editable trainguard install); nothing else may be reported."""
    layout: Layout = resolve_layout(environ={})
    dists = [d for site_dir in layout.site_dirs for d in read_distributions(site_dir)]
    findings = find_injections(layout, dists, {})
    for finding in findings:
        print(finding.severity.value, finding.kind, finding.path, "|", finding.message)
    by_key = {d.name: d for d in dists}
    for finding in findings:
        assert finding.kind in ("autoload-entry-point", "editable-install"), finding
        assert finding.distribution in by_key
        dist = by_key[finding.distribution]
        if finding.kind == "autoload-entry-point":
            assert any(e.group == "pytest11" and repr(e.value) in finding.message for e in dist.entry_points)
        else:
            assert dist.editable
    expected = {
        (d.name, e.name) for d in dists for e in d.entry_points if e.group in ("pytest11", "torch.backends")
    }
    found = {(f.distribution, f.message.split("'")[1]) for f in findings if f.kind == "autoload-entry-point"}
    assert found == expected


def test_rogue_entry_point_in_torchrun_handlers(env: Path) -> None:
    """The drill's `rogue-entry-point`, in the group torchrun loads by itself: every `torchrun.handlers`
    plug-in is imported and called when torchrun starts, whatever rendezvous the job asks for. Installed
    with a valid RECORD, only the injection check sees it (without a baseline)."""
    write_dist(
        sp(env),
        "torch-rdzv-fastpath",
        "0.3.1",
        {"torch_rdzv_fastpath.py": "def handler():\n    pass\n"},
        entry_points="[torchrun.handlers]\nfastpath = torch_rdzv_fastpath:handler\n",
    )
    [finding] = scan(env)
    assert (finding.kind, finding.distribution, finding.severity) == (
        "autoload-entry-point",
        "torch-rdzv-fastpath",
        Severity.HIGH,
    )
    assert "'torchrun.handlers'" in finding.message and "torchrun imports and calls it" in finding.message
    assert finding.advice.endswith("otherwise uninstall it.")
