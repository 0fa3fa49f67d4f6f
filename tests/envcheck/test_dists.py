"""read_distributions on hand-written dist-info directories with real RECORDs, on a venv pip installed
into, and on the project's own venv; hostile metadata becomes problems, never exceptions."""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from trainguard.envcheck._dists import METADATA_CAP, RECORD_CAP, read_distributions
from trainguard.envcheck._layout import resolve_layout
from trainguard.errors import UsageError

from .conftest import site_packages


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_dist(
    site: Path,
    name: str,
    version: str,
    files: Mapping[str, str],
    *,
    entry_points: str | None = None,
    direct_url: str | None = None,
    installer: str | None = "pip",
) -> Path:
    """A dist-info as pip leaves it: the files, METADATA, and a RECORD with their real hashes."""
    meta = site / f"{name.replace('-', '_')}-{version}.dist-info"
    meta.mkdir(parents=True)
    members = dict(files)
    members[f"{meta.name}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nBody\n"
    if entry_points is not None:
        members[f"{meta.name}/entry_points.txt"] = entry_points
    if direct_url is not None:
        members[f"{meta.name}/direct_url.json"] = direct_url
    if installer is not None:
        members[f"{meta.name}/INSTALLER"] = installer + "\n"
    rows = []
    for rel, text in members.items():
        target = site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        rows.append([rel, f"sha256={b64(text.encode())}", str(len(text.encode()))])
    rows.append([f"{meta.name}/RECORD", "", ""])
    with (meta / "RECORD").open("w", newline="") as record:
        csv.writer(record, lineterminator="\n").writerows(rows)
    return meta


def test_parses_a_distribution(tmp_path: Path) -> None:
    files = {"Foo_Bar/__init__.py": "x = 1\n", "Foo_Bar/a b,c.py": "y = 2\n"}
    meta = write_dist(tmp_path, "Foo_Bar.baz", "1.2", files, entry_points="[console_scripts]\nfb = foo:m\n")
    with (meta / "RECORD").open("a") as record:
        record.write("Foo_Bar/__pycache__/__init__.cpython-311.pyc,,\n")
    [dist] = read_distributions(str(tmp_path))
    assert (dist.name, dist.key, dist.version) == ("Foo_Bar.baz", "foo-bar-baz", "1.2")
    assert dist.meta_dir == str(meta) and dist.site_dir == str(tmp_path)
    assert dist.has_record and dist.installer == "pip" and not dist.editable
    assert dist.problems == ()
    rows = {row.path: row for row in dist.records}
    init = rows["Foo_Bar/__init__.py"]
    assert init.location == str(tmp_path / "Foo_Bar" / "__init__.py")
    assert init.algorithm == "sha256"
    assert init.digest == hashlib.sha256(b"x = 1\n").digest()
    assert init.size == 6
    assert rows["Foo_Bar/a b,c.py"].digest == hashlib.sha256(b"y = 2\n").digest()  # csv quoting
    pyc = rows["Foo_Bar/__pycache__/__init__.cpython-311.pyc"]
    assert (pyc.algorithm, pyc.digest, pyc.size) == (None, None, None)
    assert rows[f"{meta.name}/RECORD"].algorithm is None


def test_record_rows_outside_site_dir_are_normalised(tmp_path: Path) -> None:
    site = tmp_path / "lib" / "site-packages"
    write_dist(site, "tool", "1", {"../../bin/tool": "#!/bin/sh\n"})
    [dist] = read_distributions(str(site))
    row = next(r for r in dist.records if r.path == "../../bin/tool")
    assert row.location == str(tmp_path / "bin" / "tool")


def test_entry_points_as_importlib_metadata_reads_them(tmp_path: Path) -> None:
    text = (
        "# comment\n[torch.backends]\n  Dev = evil.mod:Load [extra]\n\n[Group.Name]\nKey=a=b\n"
        "x = %(interp)s\nno equals sign here\nx = duplicate\n"
    )
    write_dist(tmp_path, "eps", "1", {}, entry_points=text)
    [dist] = read_distributions(str(tmp_path))
    assert [(e.group, e.name, e.value) for e in dist.entry_points] == [
        ("torch.backends", "Dev", "evil.mod:Load [extra]"),
        ("Group.Name", "Key", "a=b"),
        ("Group.Name", "x", "%(interp)s"),
        ("Group.Name", "x", "duplicate"),
    ]
    assert len(dist.problems) == 1 and "entry_points.txt: line 8" in dist.problems[0]


def test_editable_direct_url(tmp_path: Path) -> None:
    url = '{"url": "file:///src/my%20proj", "dir_info": {"editable": true}}'
    write_dist(tmp_path, "proj", "0.1", {}, direct_url=url)
    write_dist(tmp_path, "wheel-dist", "0.1", {}, direct_url='{"url": "https://x/y.whl", "archive_info": {}}')
    proj, other = read_distributions(str(tmp_path))
    assert proj.editable and proj.editable_location == "/src/my proj"
    assert not other.editable and other.editable_location is None


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("a.py,sha256=abc", "2 fields, expected 3"),
        ("a.py,sha256=abc,1,extra", "4 fields"),
        ("a.py,sha256=!!!,1", "not urlsafe base64"),
        ("a.py,sha256=AAAA,1", "digest of 3 bytes, expected 32"),
        ("a.py,md99=AAAA,1", "unknown hash algorithm"),
        ("a.py,nohash,1", "not algorithm=digest"),
        ("a.py,,big", "is not a number"),
        (",sha256=AAAA,1", "no usable file path"),
        ('"a.py,,', "1 fields, expected 3"),  # csv reads an unclosed quote to the end of the line
        ("a\x00b.py,,", "no usable file path"),
    ],
)
def test_garbage_record_lines_are_problems(tmp_path: Path, line: str, needle: str) -> None:
    meta = write_dist(tmp_path, "bad", "1", {"ok.py": "ok\n"})
    with (meta / "RECORD").open("a") as record:
        record.write(line + "\n")
    [dist] = read_distributions(str(tmp_path))
    assert len(dist.problems) == 1, dist.problems
    assert dist.problems[0].startswith(str(meta / "RECORD") + ": line ")
    assert needle in dist.problems[0]
    assert any(row.path == "ok.py" and row.digest for row in dist.records)


def test_hex_digest_as_debian_writes_it(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "deb", "1", {})
    with (meta / "RECORD").open("a") as record:
        record.write(f"x.py,sha256={hashlib.sha256(b'x').hexdigest()},1\n")
    [dist] = read_distributions(str(tmp_path))
    assert dist.problems == ()
    assert next(r for r in dist.records if r.path == "x.py").digest == hashlib.sha256(b"x").digest()


def test_conflicting_duplicate_row(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "dup", "1", {"m.py": "m\n"})
    with (meta / "RECORD").open("a") as record:
        record.write(f"./m.py,sha256={b64(b'other')},5\n")
    [dist] = read_distributions(str(tmp_path))
    assert "listed again with a different hash" in dist.problems[0]
    assert [r.digest for r in dist.records if r.path == "m.py"] == [hashlib.sha256(b"m\n").digest()]


def test_oversize_files_are_problems_not_reads(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "huge", "1", {}, entry_points="[x]\na = b\n")
    with (meta / "RECORD").open("r+b") as record:
        record.truncate(RECORD_CAP + 1)  # sparse: nothing is written
    with (meta / "entry_points.txt").open("r+b") as eps:
        eps.truncate(METADATA_CAP + 1)
    [dist] = read_distributions(str(tmp_path))
    assert not dist.has_record and dist.records == () and dist.entry_points == ()
    assert any(p.startswith(str(meta / "RECORD")) and "limit" in p for p in dist.problems)
    assert any(p.startswith(str(meta / "entry_points.txt")) and "limit" in p for p in dist.problems)


def test_long_description_is_fine_long_headers_are_not(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "longdesc", "1", {})
    (meta / "METADATA").write_text("Name: longdesc\nVersion: 1\n\n" + "x" * (2 * METADATA_CAP))
    meta2 = write_dist(tmp_path, "longhead", "2", {})
    (meta2 / "METADATA").write_text("Name: longhead\nVersion: 2\nSummary: " + "y" * (2 * METADATA_CAP))
    first, second = read_distributions(str(tmp_path))
    assert first.problems == () and first.version == "1"
    assert second.name == "longhead" and second.version == "2"  # from the directory name
    assert any("headers longer than" in p for p in second.problems)


def test_non_utf8_and_missing_metadata(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "latin", "1", {})
    (meta / "METADATA").write_bytes(b"Name: latin\nVersion: 1\nSummary: caf\xe9\n")
    record = (meta / "RECORD").read_bytes()
    (meta / "RECORD").write_bytes(record + b"caf\xe9.py,,\n")
    meta2 = write_dist(tmp_path, "nometa", "3.0", {})
    (meta2 / "METADATA").unlink()
    latin, nometa = read_distributions(str(tmp_path))
    assert latin.name == "latin"
    assert any(p.startswith(str(meta / "METADATA")) and "UTF-8" in p for p in latin.problems)
    assert any(p.startswith(str(meta / "RECORD")) and "UTF-8" in p for p in latin.problems)
    # the row names the file the file system would: undecodable bytes survive as surrogates
    row = next(r for r in latin.records if r.path.startswith("caf"))
    assert os.fsencode(row.location) == os.fsencode(str(tmp_path)) + b"/caf\xe9.py"
    assert (nometa.name, nometa.version) == ("nometa", "3.0")
    assert any(p == f"{meta2 / 'METADATA'}: missing" for p in nometa.problems)


def test_unreadable_files_are_problems(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "odd", "1", {})
    (meta / "RECORD").unlink()
    os.mkfifo(meta / "RECORD")  # would block a plain open()
    (meta / "entry_points.txt").mkdir()
    (meta / "direct_url.json").write_text("{not json")
    [dist] = read_distributions(str(tmp_path))
    assert not dist.has_record
    assert f"{meta / 'RECORD'}: not a regular file" in dist.problems
    assert f"{meta / 'entry_points.txt'}: not a regular file" in dist.problems
    assert any(p.startswith(f"{meta / 'direct_url.json'}: not valid JSON") for p in dist.problems)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_a_problem(tmp_path: Path) -> None:
    meta = write_dist(tmp_path, "locked", "1", {})
    (meta / "RECORD").chmod(0)
    [dist] = read_distributions(str(tmp_path))
    assert any(p.startswith(str(meta / "RECORD")) and "cannot be opened" in p for p in dist.problems)


def test_random_garbage_never_raises(tmp_path: Path) -> None:
    rng = random.Random(1234)
    alphabet = b'abc,="\n\r\x00\xff\xfe=[]#:;/.-_ \tsha256'
    for i in range(30):
        meta = write_dist(tmp_path, f"fuzz{i}", "1", {})
        for name in ("RECORD", "METADATA", "entry_points.txt", "direct_url.json", "INSTALLER"):
            (meta / name).write_bytes(bytes(rng.choice(alphabet) for _ in range(rng.randrange(300))))
    dists = read_distributions(str(tmp_path))
    assert len(dists) == 30
    assert all(p.startswith(str(tmp_path)) for d in dists for p in d.problems)


def test_egg_info_directory_and_file(tmp_path: Path) -> None:
    egg = tmp_path / "Old_Pkg-0.9-py3.11.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: Old-Pkg\nVersion: 0.9\n")
    (egg / "installed-files.txt").write_text("../oldpkg/__init__.py\nPKG-INFO\n")
    (egg / "entry_points.txt").write_text("[pytest11]\nold = oldpkg.plugin\n")
    (tmp_path / "distutils_thing-1.0-py3.11.egg-info").write_text("Name: distutils-thing\nVersion: 1.0\n")
    thing, old = read_distributions(str(tmp_path))
    assert (old.key, old.version, old.has_record) == ("old-pkg", "0.9", False)
    assert [r.location for r in old.records] == [
        str(tmp_path / "oldpkg" / "__init__.py"),
        str(egg / "PKG-INFO"),
    ]
    assert old.entry_points[0].group == "pytest11"
    assert (thing.key, thing.version, thing.records, thing.problems) == ("distutils-thing", "1.0", (), ())


def test_sorted_by_key_and_missing_site_dir(tmp_path: Path) -> None:
    for name in ("zeta", "Alpha", "mid_dle"):
        write_dist(tmp_path, name, "1", {})
    assert [d.key for d in read_distributions(str(tmp_path))] == ["alpha", "mid-dle", "zeta"]
    with pytest.raises(UsageError, match="cannot list site directory"):
        read_distributions(str(tmp_path / "missing"))


def test_pip_installed_distribution(venv: Path) -> None:
    """What pip really writes: hashes of every file, bytecode rows without a hash, the console script."""
    dists = {d.key: d for d in read_distributions(str(site_packages(venv)))}
    good = dists["goodpkg"]
    assert good.problems == () and good.installer == "pip"
    for row in good.records:
        if row.algorithm is not None:
            assert row.digest == hashlib.sha256(Path(row.location).read_bytes()).digest(), row.path
            assert row.size == Path(row.location).stat().st_size
        else:
            assert row.path.endswith((".pyc", "RECORD")), row.path
    assert str(venv / "bin" / "goodpkg") in {r.location for r in good.records}
    assert all(d.problems == () for d in dists.values())


def test_project_venv_parses_cleanly() -> None:
    """Every distribution installed in the project's venv parses without a single problem."""
    layout = resolve_layout(environ={})
    for site_dir in layout.site_dirs:
        start = time.perf_counter()
        dists = read_distributions(site_dir)
        elapsed = time.perf_counter() - start
        rows = sum(len(d.records) for d in dists)
        print(f"{site_dir}: {len(dists)} distributions, {rows} RECORD rows in {elapsed * 1000:.0f} ms")
        assert dists
        assert [d.problems for d in dists if d.problems] == []
        assert all(d.has_record for d in dists)
        assert len({d.key for d in dists}) == len(dists)
        for dist in dists:  # each METADATA file is listed with its real hash
            meta_row = next(r for r in dist.records if r.location == f"{dist.meta_dir}/METADATA")
            assert meta_row.digest == hashlib.sha256(Path(meta_row.location).read_bytes()).digest()
    if sys.prefix != sys.base_prefix:
        assert any(d.key == "trainguard" and d.editable for d in read_distributions(layout.site_dirs[0]))
