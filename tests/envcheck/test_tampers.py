"""Each tamper of a shared Python environment, done for real to a real venv, and found.

The 2024 saboteur edited the shared PyTorch install a little every day; these are the ways to do that
which a RECORD-only check (pip, distlib) misses or cannot see, named after the tamper.
"""

from __future__ import annotations

import base64
import hashlib
import os
import py_compile
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainguard.envcheck import snapshot_environment, verify_environment
from trainguard.envcheck._verify import EnvReport

from .conftest import build_wheel, clean_environ, pip_install, site_packages, venv_python

PYC = f"optim.{sys.implementation.cache_tag}.pyc"


def _kinds(report: EnvReport) -> set[tuple[str, str]]:
    return {(f.kind, Path(f.path).name) for f in report.findings}


def _snapshot(venv: Path):  # type: ignore[no-untyped-def]
    baseline, report = snapshot_environment(prefix=str(venv), environ=clean_environ())
    assert report.findings == [] and report.undecided == [], report.findings + report.undecided
    return baseline


def _check(venv: Path, baseline=None, *, full: bool = True, environ=None) -> EnvReport:  # type: ignore[no-untyped-def]
    return verify_environment(
        prefix=str(venv), baseline=baseline, environ=environ or clean_environ(), full=full
    )


def _record_row(path: Path, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(data)}"


# The clean environment: no findings, whatever Python did to it meanwhile.


def test_clean_venv_has_no_findings_in_either_mode(venv: Path) -> None:
    baseline = _snapshot(venv)
    for report in (_check(venv), _check(venv, baseline)):
        assert report.findings == [] and report.undecided == [], report.findings
        assert report.ok
    assert _check(venv, baseline).digest == baseline.digest


def test_imports_and_python_dash_o_are_not_findings(venv: Path) -> None:
    baseline = _snapshot(venv)
    env = {**clean_environ()}
    for flags in ([], ["-O"], ["-OO"]):
        subprocess.run(
            [str(venv_python(venv)), *flags, "-c", "import goodpkg, json, email.parser"], check=True, env=env
        )
    assert list((site_packages(venv) / "goodpkg" / "__pycache__").glob("*.opt-1.pyc"))
    for report in (_check(venv), _check(venv, baseline)):
        assert report.findings == [] and report.undecided == [], report.findings


# (1) A file edited, RECORD untouched.


def test_edited_file_with_record_untouched(venv: Path) -> None:
    baseline = _snapshot(venv)
    optim = site_packages(venv) / "goodpkg" / "optim.py"
    optim.write_text("def step(weight, grad, lr=0.1):\n    return weight + lr * grad\n")  # flips the update
    for report in (_check(venv), _check(venv, baseline)):
        assert ("modified", "optim.py") in _kinds(report)
        [finding] = [f for f in report.findings if f.kind == "modified"]
        assert finding.distribution == "goodpkg" and "owner" in finding.message


# (2) A file edited and its RECORD row rewritten to match: invisible to a RECORD check, not to a baseline.


def test_edited_file_with_record_row_rewritten(venv: Path) -> None:
    baseline = _snapshot(venv)
    site = site_packages(venv)
    optim = site / "goodpkg" / "optim.py"
    old = optim.read_bytes()
    new = old.replace(b"weight - lr", b"weight + lr")
    optim.write_bytes(new)
    record = site / "goodpkg-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text().replace(_record_row(optim, old), _record_row(optim, new)))
    without = _check(venv)
    assert ("modified", "optim.py") not in _kinds(without)
    assert any("RECORD row" in limit for limit in without.limitations)
    with_baseline = _check(venv, baseline)
    [finding] = [f for f in with_baseline.findings if f.path.endswith("optim.py")]
    assert finding.kind == "modified" and "rewritten to match" in finding.message
    assert ("modified", "RECORD") in _kinds(with_baseline)


# (3) A rogue distribution whose entry point `import torch` loads by itself.


def test_rogue_distribution_with_a_torch_backends_entry_point(venv: Path, tmp_path: Path) -> None:
    baseline = _snapshot(venv)
    rogue = build_wheel(
        tmp_path,
        "torch-perf-utils",
        "0.1",
        {"torch_perf_utils/__init__.py": "def _autoload():\n    print('MARKER')\n"},
        "[torch.backends]\nperf = torch_perf_utils:_autoload\n",
    )
    pip_install(venv, rogue)
    without = _check(venv)
    assert any(
        f.kind == "autoload-entry-point" and f.severity.value in ("high", "critical")
        for f in without.findings
    )
    with_baseline = _check(venv, baseline)
    kinds = {f.kind for f in with_baseline.findings}
    assert {"distribution-added", "autoload-entry-point", "unexpected"} <= kinds


# (4) A .pth file with an import line: runs at every interpreter start.


def test_pth_file_with_an_import_line(venv: Path) -> None:
    baseline = _snapshot(venv)
    (site_packages(venv) / "zz-speedups.pth").write_text("import os; os.system('echo MARKER')\n")
    for report in (_check(venv), _check(venv, baseline)):
        assert ("pth-import", "zz-speedups.pth") in _kinds(report)


# (5) A cached .pyc replaced while its header still matches the untouched .py.


def test_replaced_pyc_with_a_matching_header(venv: Path, tmp_path: Path) -> None:
    baseline = _snapshot(venv)
    source = site_packages(venv) / "goodpkg" / "optim.py"
    pyc = source.parent / "__pycache__" / PYC
    genuine = pyc.read_bytes()
    evil_source = tmp_path / "optim.py"
    evil_source.write_text("def step(weight, grad, lr=0.1):\n    return weight + lr * grad\n")
    evil = Path(py_compile.compile(str(evil_source), cfile=str(tmp_path / "evil.pyc"), dfile=str(source)))
    pyc.write_bytes(genuine[:16] + evil.read_bytes()[16:])  # header of the genuine one: Python uses it
    for report in (_check(venv), _check(venv, baseline)):
        assert ("pyc-mismatch", PYC) in _kinds(report), report.findings


# And the rest: sitecustomize, variables, shadowing, deleted files.


def test_sitecustomize_in_site_packages(venv: Path) -> None:
    baseline = _snapshot(venv)
    (site_packages(venv) / "sitecustomize.py").write_text("print('MARKER')\n")
    for report in (_check(venv), _check(venv, baseline)):
        assert ("sitecustomize", "sitecustomize.py") in _kinds(report)


@pytest.mark.parametrize("variable", ["PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "LD_PRELOAD"])
def test_risky_variables(venv: Path, tmp_path: Path, variable: str) -> None:
    baseline = _snapshot(venv)
    environ = {**clean_environ(), variable: str(tmp_path / "evil")}
    report = _check(venv, baseline, environ=environ)
    assert any(f.kind == "env-var" and variable in f.path + f.message for f in report.findings)


def test_module_shadowed_earlier_on_the_path(venv: Path, tmp_path: Path) -> None:
    baseline = _snapshot(venv)
    shadow = tmp_path / "shadow"
    (shadow / "goodpkg").mkdir(parents=True)
    (shadow / "goodpkg" / "__init__.py").write_text("print('MARKER')\n")
    report = _check(venv, baseline, environ={**clean_environ(), "PYTHONPATH": str(shadow)})
    assert any(f.kind == "shadowed-module" and "goodpkg" in f.path + f.message for f in report.findings)


def test_deleted_file(venv: Path) -> None:
    baseline = _snapshot(venv)
    (site_packages(venv) / "goodpkg" / "data.txt").unlink()
    for report in (_check(venv), _check(venv, baseline)):
        assert ("missing", "data.txt") in _kinds(report)


def test_standard_library_edit_is_seen_only_with_a_baseline(venv: Path) -> None:
    """The base interpreter's stdlib lies outside the venv and in no RECORD; the baseline covers it. The
    real stdlib is shared and must not be edited here, so the baseline is made to remember another
    digest for one stdlib file: that is what an edit after the snapshot looks like to the verifier."""
    import dataclasses

    baseline = _snapshot(venv)
    assert "stdlib" in baseline.roots and "python" in baseline.roots
    path = next(p for p in baseline.files if p.endswith("/json/decoder.py"))
    files = {**baseline.files, path: (baseline.files[path][0], "0" * 64)}
    edited = dataclasses.replace(baseline, files=files, digest="")
    report = _check(venv, edited)
    [finding] = report.findings
    assert (finding.kind, finding.path) == (
        "modified",
        str(Path(baseline.roots["stdlib"]) / "json" / "decoder.py"),
    )
    assert not any(f.path.endswith("json/decoder.py") for f in _check(venv).findings)


def test_unrecorded_scripts_in_bin_named_like_venv_files(venv: Path) -> None:
    for name in ("pip-upgrade", "python-gdb", "activate-all"):
        (venv / "bin" / name).write_text("#!/bin/sh\necho MARKER\n")
    kinds = _kinds(_check(venv))
    assert {
        ("unexpected", "pip-upgrade"),
        ("unexpected", "python-gdb"),
        ("unexpected", "activate-all"),
    } <= kinds


# Quick mode.


def test_quick_mode_hashes_nothing_unchanged_and_still_sees_an_edit_with_times_restored(venv: Path) -> None:
    baseline = _snapshot(venv)
    time.sleep(2.1)  # files changed within two seconds of a check are never cached (racy ctime)
    first = _check(venv, baseline, full=False)
    assert first.ok and first.hashed > 0
    second = _check(venv, baseline, full=False)
    assert second.ok and second.hashed == 0 and second.cached == second.files
    optim = site_packages(venv) / "goodpkg" / "optim.py"
    before = optim.stat()
    data = optim.read_bytes()
    optim.write_bytes(data.replace(b"weight - lr", b"weight + lr"))
    os.utime(optim, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    third = _check(venv, baseline, full=False)
    assert ("modified", "optim.py") in _kinds(third)
    assert third.hashed >= 1


def test_file_added_with_a_hashless_record_row(venv: Path) -> None:
    """A RECORD row without a hash vouches for nothing: the planted file is still unexpected."""
    site = site_packages(venv)
    (site / "goodpkg" / "evil.py").write_text("print('MARKER')\n")
    record = site / "goodpkg-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text() + "goodpkg/evil.py,,\n")
    assert ("unexpected", "evil.py") in _kinds(_check(venv))


def test_bytecode_of_another_python_version_is_reported_unchecked(venv: Path) -> None:
    import dataclasses

    from trainguard.envcheck._layout import resolve_layout
    from trainguard.envcheck._verify import survey, verify_against_records

    layout = dataclasses.replace(resolve_layout(prefix=str(venv)), version=(3, 99))
    report, _ = verify_against_records(survey(layout, clean_environ()), mode="full")
    assert [f.kind for f in report.undecided] == ["bytecode-unchecked"]
    report, _ = verify_against_records(survey(layout, clean_environ()), mode="full", check_bytecode=False)
    assert report.undecided == []
