"""Cached pyc check: genuine pycs (py_compile, compileall in every invalidation mode, an import under
`python -O`/`-OO`) are ok; a pyc swapped for other code behind a matching header is a mismatch; a stale
one is stale; anything unreadable is undecided and never an exception."""

from __future__ import annotations

import compileall
import importlib.util
import marshal
import os
import py_compile
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.envcheck._marshal import MarshalLimits
from trainguard.envcheck._pyc import PycVerdict, check_pyc, pyc_source

TAG = sys.implementation.cache_tag
MAGIC = importlib.util.MAGIC_NUMBER
GOOD = 'import os\n\ndef seed(n=0):\n    """Seed everything."""\n    return {"x", "y", n}, os.sep\n'
EVIL = 'import os\n\ndef seed(n=0):\n    """Seed everything."""\n    return {"x", "y", n + 1}, os.sep\n'


def write_module(directory: Path, text: str = GOOD, name: str = "mod") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{name}.py"
    source.write_text(text)
    return source


def cache_path(source: Path, optimize: int = 0) -> Path:
    return Path(importlib.util.cache_from_source(str(source), optimization=optimize or ""))


def compile_pyc(
    source: Path, mode: py_compile.PycInvalidationMode = py_compile.PycInvalidationMode.TIMESTAMP
) -> Path:
    written = py_compile.compile(str(source), doraise=True, invalidation_mode=mode)
    assert written is not None
    return Path(written)


def check(pyc: Path, source: Path, optimize: int = 0) -> PycVerdict:
    return check_pyc(str(pyc), str(source), optimize)


# -- pyc_source


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (f"mod.{TAG}.pyc", ("mod.py", 0)),
        (f"mod.{TAG}.opt-1.pyc", ("mod.py", 1)),
        (f"mod.{TAG}.opt-2.pyc", ("mod.py", 2)),
        (f"__init__.{TAG}.pyc", ("__init__.py", 0)),
        ("mod.cpython-27.pyc", None),
        ("mod.pypy39.pyc", None),
        (f"mod.{TAG}.opt-3.pyc", None),
        (f"mod.{TAG}.opt-.pyc", None),
        (f"mod.{TAG}.py", None),
        (f"a.b.{TAG}.pyc", None),
        (f".{TAG}.pyc", None),
        ("mod.pyc", None),
    ],
)
def test_pyc_source_names(name: str, expected: tuple[str, int] | None) -> None:
    got = pyc_source(f"/env/site/pkg/__pycache__/{name}")
    assert got == (None if expected is None else (f"/env/site/pkg/{expected[0]}", expected[1]))


def test_pyc_source_needs_a_pycache_directory() -> None:
    assert pyc_source(f"/env/site/pkg/mod.{TAG}.pyc") is None
    assert pyc_source(f"/env/site/pkg/cache/mod.{TAG}.pyc") is None


def test_pyc_source_agrees_with_importlib(tmp_path: Path) -> None:
    source = str(tmp_path / "pkg" / "mod.py")
    for optimize in (0, 1, 2):
        cached = importlib.util.cache_from_source(source, optimization=optimize or "")
        assert pyc_source(cached) == (source, optimize)


# -- genuine pycs


@pytest.mark.parametrize("mode", list(py_compile.PycInvalidationMode))
def test_py_compile_pycs_are_ok(tmp_path: Path, mode: py_compile.PycInvalidationMode) -> None:
    source = write_module(tmp_path / "pkg")
    verdict = check(compile_pyc(source, mode), source)
    assert verdict.status == "ok", verdict


def test_compileall_pycs_at_every_level_are_ok(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    write_module(pkg, "", "__init__")
    write_module(pkg)
    for level in (0, 1, 2):
        assert compileall.compile_dir(str(pkg), quiet=1, optimize=level)
    for source in pkg.glob("*.py"):
        for optimize in (0, 1, 2):
            pyc = cache_path(source, optimize)
            assert pyc_source(str(pyc)) == (str(source), optimize)
            verdict = check(pyc, source, optimize)
            assert verdict.status == "ok", (pyc, verdict)


@pytest.mark.parametrize("flags", [[], ["-O"], ["-OO"]])
def test_pycs_written_by_the_import_system_are_ok(tmp_path: Path, flags: list[str]) -> None:
    pkg = tmp_path / "pkg"
    write_module(pkg, '"""Package doc."""\nassert True, "kept without -O"\n', "__init__")
    write_module(pkg)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    env["PYTHONPATH"] = str(tmp_path)
    subprocess.run([sys.executable, *flags, "-c", "import pkg.mod"], env=env, check=True, timeout=60)
    optimize = len(flags[0]) - 1 if flags else 0
    pycs = sorted((pkg / "__pycache__").glob("*.pyc"))
    assert len(pycs) == 2
    for pyc in pycs:
        found = pyc_source(str(pyc))
        assert found is not None and found[1] == optimize
        verdict = check_pyc(str(pyc), *found)
        assert verdict.status == "ok", (pyc, verdict)


def test_flag_ref_variance_is_not_a_mismatch(tmp_path: Path) -> None:
    # marshal versions 2 and 3 write the same code with other ref flags and string forms.
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    code = compile(source.read_bytes(), str(source), "exec", dont_inherit=True)
    for version in (2, 3):
        pyc.write_bytes(pyc.read_bytes()[:16] + marshal.dumps(code, version))
        verdict = check(pyc, source)
        assert verdict.status == "ok", verdict
        assert "same code" in verdict.detail


def test_relocated_environment_is_ok_with_a_note(tmp_path: Path) -> None:
    source = write_module(tmp_path / "now")
    written = py_compile.compile(str(source), dfile="/build/then/mod.py", doraise=True)
    assert written is not None
    pyc = Path(written)
    verdict = check(pyc, source)
    assert verdict.status == "ok", verdict
    assert "/build/then/mod.py" in verdict.detail


def test_trailing_bytes_are_ok_with_a_note(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    pyc.write_bytes(pyc.read_bytes() + b"ignored by marshal")
    verdict = check(pyc, source)
    assert verdict.status == "ok", verdict
    assert "18 trailing bytes" in verdict.detail


def test_source_with_an_encoding_declaration(tmp_path: Path) -> None:
    source = tmp_path / "pkg" / "latin.py"
    source.parent.mkdir()
    source.write_bytes(b"# -*- coding: latin-1 -*-\nNAME = '\xe9t\xe9'\n")
    assert check(compile_pyc(source), source).status == "ok"


# -- tampers


def swap_body(pyc: Path, other: Path) -> None:
    """Keep `pyc`'s header (so it still matches its source) and put `other`'s code behind it."""
    pyc.write_bytes(pyc.read_bytes()[:16] + other.read_bytes()[16:])


@pytest.mark.parametrize(
    "mode", [py_compile.PycInvalidationMode.TIMESTAMP, py_compile.PycInvalidationMode.CHECKED_HASH]
)
def test_pyc_replaced_behind_a_matching_header_is_a_mismatch(
    tmp_path: Path, mode: py_compile.PycInvalidationMode
) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source, mode)
    evil = compile_pyc(write_module(tmp_path / "evil", EVIL), mode)
    swap_body(pyc, evil)
    verdict = check(pyc, source)
    assert verdict.status == "mismatch", verdict


def test_pyc_compiled_from_other_source_under_the_real_path_is_a_mismatch(tmp_path: Path) -> None:
    # The attacker compiles the evil source with the victim's path, so co_filename matches too.
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    header = pyc.read_bytes()[:16]
    evil = compile(EVIL, str(source), "exec", dont_inherit=True)
    pyc.write_bytes(header + marshal.dumps(evil))
    assert check(pyc, source).status == "mismatch"
    pyc.write_bytes(header + marshal.dumps(evil, 2))  # other ref flags change nothing
    assert check(pyc, source).status == "mismatch"


def test_unchecked_hash_pyc_with_other_code_is_a_mismatch(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source, py_compile.PycInvalidationMode.UNCHECKED_HASH)
    evil = compile_pyc(write_module(tmp_path / "evil", EVIL), py_compile.PycInvalidationMode.UNCHECKED_HASH)
    pyc.write_bytes(evil.read_bytes())  # its hash is the evil source's: Python never looks
    verdict = check(pyc, source)
    assert verdict.status == "mismatch", verdict
    assert "unchecked" in verdict.detail


def test_unchecked_hash_pyc_left_behind_by_an_edit_is_a_mismatch(tmp_path: Path) -> None:
    # Python keeps running the old code after the source changed: what runs is not what was verified.
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source, py_compile.PycInvalidationMode.UNCHECKED_HASH)
    source.write_text(EVIL)
    assert check(pyc, source).status == "mismatch"


# -- stale, foreign, undecided


def test_timestamp_pyc_of_an_edited_source_is_stale(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    source.write_text(GOOD + "# edited\n")
    assert check(pyc, source).status == "stale"
    os.utime(source, (0, 12345))
    assert check(pyc, source).status == "stale"


def test_checked_hash_pyc_of_an_edited_source_is_stale(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source, py_compile.PycInvalidationMode.CHECKED_HASH)
    source.write_text(EVIL)
    assert check(pyc, source).status == "stale"


def test_invalid_header_flags_are_stale(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    data = pyc.read_bytes()
    pyc.write_bytes(data[:4] + (4).to_bytes(4, "little") + data[8:])
    assert check(pyc, source).status == "stale"


def test_other_python_versions_pyc_is_foreign(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    data = pyc.read_bytes()
    pyc.write_bytes((3439).to_bytes(2, "little") + b"\r\n" + data[4:])
    assert check(pyc, source).status == "foreign"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda data: data[:-1],  # truncated code
        lambda data: data[:17],
        lambda data: data[:16],  # header only
        lambda data: data[:10],  # truncated header
        lambda data: data[:3],
        lambda data: b"",
        lambda data: data[:16] + b"\xff" * 64,  # garbage code
        lambda data: data[:16] + b"(" + (2**31 - 1).to_bytes(4, "little"),
        lambda data: data[:16] + b")\x01" * 50_000 + b"N",
        lambda data: b"\x7fELF" + data[4:],  # not a pyc at all
    ],
)
def test_unreadable_pycs_are_undecided(tmp_path: Path, mangle: Callable[[bytes], bytes]) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    pyc.write_bytes(mangle(pyc.read_bytes()))
    verdict = check(pyc, source)
    assert verdict.status == "undecided", verdict


def test_missing_or_odd_files_are_undecided(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    assert check(tmp_path / "nope.pyc", source).status == "undecided"
    assert check(pyc, tmp_path / "nope.py").status == "undecided"
    assert check(tmp_path, source).status == "undecided"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert check(fifo, source).status == "undecided"  # must not block on open or read
    assert check(pyc, fifo).status == "undecided"


def test_source_that_does_not_compile_is_undecided(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    data = source.read_bytes()
    broken = b"def (:\n".ljust(len(data), b"#")
    source.write_bytes(broken)
    os.utime(source, ns=(0, int.from_bytes(pyc.read_bytes()[8:12], "little") * 10**9))
    verdict = check(pyc, source)
    assert verdict.status == "undecided", verdict
    assert "SyntaxError" in verdict.detail
    source.write_bytes(b"x = 1\0".ljust(len(data), b"#"))
    os.utime(source, ns=(0, int.from_bytes(pyc.read_bytes()[8:12], "little") * 10**9))
    assert check(pyc, source).status == "undecided"


def test_limits_make_big_pycs_undecided(tmp_path: Path) -> None:
    source = write_module(tmp_path / "pkg")
    pyc = compile_pyc(source)
    verdict = check_pyc(str(pyc), str(source), 0, limits=MarshalLimits(max_bytes=10))
    assert verdict.status == "undecided", verdict
    pyc.write_bytes(pyc.read_bytes()[:16] + marshal.dumps(compile(GOOD, str(source), "exec"), 2))
    verdict = check_pyc(str(pyc), str(source), 0, limits=MarshalLimits(max_objects=5))
    assert verdict.status == "undecided", verdict


def test_bad_optimize_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimize"):
        check_pyc(str(tmp_path / "x.pyc"), str(tmp_path / "x.py"), 3)
    with pytest.raises(ValueError, match="unknown pyc status"):
        PycVerdict("fine", "")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_body_behind_a_matching_header_gets_a_verdict(
    tmp_path_factory: pytest.TempPathFactory, body: bytes
) -> None:
    directory = tmp_path_factory.mktemp("fuzz")
    source = write_module(directory / "pkg")
    pyc = compile_pyc(source)
    pyc.write_bytes(pyc.read_bytes()[:16] + body)
    assert check(pyc, source).status in ("mismatch", "undecided")
