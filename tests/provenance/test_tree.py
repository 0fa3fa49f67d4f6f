"""The safe walk: what is hashed and what is refused, each refusal naming the path.

Attacks: path traversal through symlinks (CWE-59, CWE-22), symlink cycles, FIFOs that hang readers,
names that print as something else.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from trainguard.errors import UsageError
from trainguard.provenance import SIGNATURE_NAME, UnsafeTree, path_problem, signature_path, walk
from trainguard.provenance._tree import MAX_DEPTH


def _model(root: Path) -> Path:
    (root / "m").mkdir()
    (root / "m" / "weights.bin").write_bytes(b"w" * 100)
    (root / "m" / "sub").mkdir()
    (root / "m" / "sub" / "config.json").write_text("{}")
    return root / "m"


def test_walk_lists_files_sorted_and_skips_the_signature(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / SIGNATURE_NAME).write_text("sig")
    (model / "sub" / "empty").write_bytes(b"")
    (model / "emptydir").mkdir()
    tree = walk(model)
    assert tree.kind == "directory"
    assert tree.name == "m"
    assert [f.path for f in tree.files] == ["sub/config.json", "sub/empty", "weights.bin"]


def test_walk_of_a_single_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    tree = walk(path)
    assert tree.kind == "file"
    assert [f.path for f in tree.files] == ["model.pt"]
    assert signature_path(path) == tmp_path / "model.pt.trainguard.sig"
    assert signature_path(tmp_path) == tmp_path / SIGNATURE_NAME


def test_in_tree_symlink_is_recorded_not_followed(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "alias.bin").symlink_to("weights.bin")
    (model / "sub" / "up.bin").symlink_to("../weights.bin")
    tree = walk(model)
    assert [(link.path, link.target) for link in tree.links] == [
        ("alias.bin", "weights.bin"),
        ("sub/up.bin", "weights.bin"),
    ]
    assert [f.path for f in tree.files] == ["sub/config.json", "weights.bin"]


def test_symlink_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (tmp_path / "secret").write_text("outside")
    (model / "sub" / "leak").symlink_to("../../secret")
    with pytest.raises(UnsafeTree, match="leaves the tree") as info:
        walk(model)
    assert info.value.path.endswith("sub/leak")


def test_absolute_symlink_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeTree, match="passwd: symlink leaves the tree"):
        walk(model)


def test_symlink_directory_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (model / "dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafeTree, match="dir: symlink leaves the tree"):
        walk(model)


def test_symlink_cycle_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "a").symlink_to("b")
    (model / "b").symlink_to("a")
    with pytest.raises(UnsafeTree, match="symlink cycle"):
        walk(model)


def test_symlink_to_own_parent_is_a_cycle(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "sub" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(UnsafeTree, match=r"sub/loop: symlink cycle"):
        walk(model)
    (model / "sub" / "loop").unlink()
    (model / "sub" / "loop").symlink_to(".", target_is_directory=True)
    with pytest.raises(UnsafeTree, match=r"sub/loop: symlink cycle"):
        walk(model)


def test_dangling_symlink_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "gone").symlink_to("nowhere")
    with pytest.raises(UnsafeTree, match="gone: symlink to a missing target"):
        walk(model)


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    model = _model(tmp_path)
    os.mkfifo(model / "sub" / "pipe")
    with pytest.raises(UnsafeTree, match="sub/pipe: is a FIFO"):
        walk(model)  # opening the FIFO would block forever


def test_socket_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    sock = socket.socket(socket.AF_UNIX)
    cwd = Path.cwd()
    os.chdir(model)  # AF_UNIX paths are limited to ~100 bytes; tmp_path can be longer
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
    try:
        with pytest.raises(UnsafeTree, match="sock: is a socket"):
            walk(model)
    finally:
        sock.close()


def test_fifo_given_as_the_path_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UnsafeTree, match="is a FIFO"):
        walk(tmp_path / "pipe")


def test_device_is_refused() -> None:
    with pytest.raises(UnsafeTree, match="character device"):
        walk(Path("/dev/null"))


def test_empty_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "nested").mkdir()
    with pytest.raises(UnsafeTree, match="empty model"):
        walk(tmp_path / "empty")


def test_only_a_signature_is_an_empty_model(tmp_path: Path) -> None:
    (tmp_path / SIGNATURE_NAME).write_text("{}")
    with pytest.raises(UnsafeTree, match="empty model"):
        walk(tmp_path)


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        walk(tmp_path / "nope")


def test_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    Path(os.fsdecode(bytes(model) + b"/bad\xff")).write_bytes(b"x")
    with pytest.raises(UnsafeTree, match="not valid UTF-8"):
        walk(model)


def test_name_with_newline_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "two\nlines").write_bytes(b"x")
    with pytest.raises(UnsafeTree, match="control character"):
        walk(model)


def test_names_equal_in_nfc_are_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "caf\u00e9").write_bytes(b"1")
    (model / "cafe\u0301").write_bytes(b"2")
    with pytest.raises(UnsafeTree, match="NFC"):
        walk(model)


def test_names_are_recorded_in_nfc(tmp_path: Path) -> None:
    model = _model(tmp_path)
    (model / "cafe\u0301").write_bytes(b"2")
    assert "caf\u00e9" in [f.path for f in walk(model).files]


def test_too_deep_is_refused(tmp_path: Path) -> None:
    model = _model(tmp_path)
    deep = model
    for _ in range(MAX_DEPTH + 2):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    with pytest.raises(UnsafeTree, match="directory levels"):
        walk(model)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../etc/passwd", "not allowed"),
        ("a/../../b", "not allowed"),
        ("./a", "not allowed"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty name"),
        ("", "empty path"),
        ("a\nb", "control character"),
        ("a\\..\\b", "separator"),
        ("cafe\u0301", "NFC"),
        ("bad\udcff", "UTF-8"),
    ],
)
def test_unsafe_manifest_paths(path: str, problem: str) -> None:
    found = path_problem(path)
    assert found is not None and problem in found


def test_safe_manifest_paths() -> None:
    for path in ["a", "a/b.bin", "caf\u00e9/x", ".hidden", "a..b"]:
        assert path_problem(path) is None
