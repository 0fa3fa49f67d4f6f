"""The C2SP tlog-tiles read path (https://c2sp.org/tlog-tiles), in Python and against Go's x/mod tlog."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ledger.conftest import ORIGIN, event, make_ledger
from trainguard.cli import main
from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._merkle import leaf_hash
from trainguard.ledger._tiles import (
    EntryTooLongForBundle,
    decode_bundle,
    encode_bundle,
    encode_index,
    export_tiles,
    read_entry_bundle,
    read_tile,
    tile_paths,
)

# 600 leaves: level 0 has full tiles 0 and 1 and a partial tile 2 of width 88; level 1 a partial tile of
# width 2 (600 >> 8); entry bundles mirror level 0.
SIZE = 600
BATCHES = (300, 200, 100)
INTEROP = Path(__file__).parent / "tiles_interop"
GOPATH = "/usr/share/gocode"
XMOD_TLOG = Path(GOPATH) / "src/golang.org/x/mod/sumdb/tlog"


@pytest.fixture
def ledger(tmp_path: Path, key: SigningKey) -> Ledger:
    return make_ledger(str(tmp_path / "ledger.db"), key, BATCHES)


# Paths


@pytest.mark.parametrize(
    ("index", "encoded"),
    [(0, "000"), (7, "007"), (999, "999"), (1000, "x001/000"), (1234067, "x001/x234/067")],
)
def test_index_encoding_follows_the_spec(index: int, encoded: str) -> None:
    assert encode_index(index) == encoded


def test_paths_of_a_tree_with_full_and_partial_tiles() -> None:
    assert tile_paths(SIZE) == [
        "tile/0/000",
        "tile/0/001",
        "tile/0/002.p/88",
        "tile/1/000.p/2",
        "tile/entries/000",
        "tile/entries/001",
        "tile/entries/002.p/88",
        "checkpoint",
    ]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, ["tile/0/000.p/1", "tile/entries/000.p/1"]),
        (256, ["tile/0/000", "tile/1/000.p/1", "tile/entries/000"]),
        (257, ["tile/0/000", "tile/0/001.p/1", "tile/1/000.p/1", "tile/entries/000", "tile/entries/001.p/1"]),
    ],
)
def test_partial_tile_widths_at_the_edges(size: int, expected: list[str]) -> None:
    assert tile_paths(size) == [*expected, "checkpoint"]


def test_a_full_level_gets_its_parent_tile() -> None:
    paths = tile_paths(256 * 256)
    assert paths.count("tile/1/000") == 1
    assert "tile/2/000.p/1" in paths
    assert not any(".p/" in p for p in paths if p.startswith("tile/0/"))


# Reading


def test_tiles_hold_the_stored_node_hashes(ledger: Ledger) -> None:
    level0 = read_tile(ledger, 0, 2, 88)
    assert len(level0) == 88 * 32
    assert level0[:32] == leaf_hash(event(512).canonical())
    level1 = read_tile(ledger, 1, 0, 2)
    # A level-1 hash is the root of 256 leaves: the Merkle root of the first 256 entries.
    assert level1[:32] == ledger.root(256)


def test_a_partial_tile_is_a_prefix_of_the_full_one(ledger: Ledger) -> None:
    assert read_tile(ledger, 0, 1, 256).startswith(read_tile(ledger, 0, 1, 10))


def test_a_tile_beyond_the_tree_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UsageError, match="tree of size 600"):
        read_tile(ledger, 0, 2, 256)
    with pytest.raises(UsageError, match="no such tile"):
        read_tile(ledger, 0, 0, 0)


def test_entry_bundle_round_trip(ledger: Ledger) -> None:
    bundle = read_entry_bundle(ledger, 1, 256)
    entries = decode_bundle(bundle)
    assert entries == [event(n).canonical() for n in range(256, 512)]
    assert bundle[:2] == len(entries[0]).to_bytes(2, "big")
    assert encode_bundle(entries) == bundle


def test_an_entry_too_long_for_a_bundle_is_named() -> None:
    with pytest.raises(EntryTooLongForBundle, match="entry 12 is 65536 bytes") as caught:
        encode_bundle([b"{}", b"x" * 65536], first_index=11)
    assert caught.value.index == 12
    assert len(encode_bundle([b"x" * 65535])) == 65537


def test_a_truncated_bundle_is_refused() -> None:
    with pytest.raises(UsageError, match="ends inside entry 0"):
        decode_bundle(b"\x00\x05abc")


# Export


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_writes_every_resource_and_the_signed_note(ledger: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    done = export_tiles(ledger, out)
    assert (done.size, done.tiles_written, done.bundles_written, done.kept) == (SIZE, 4, 3, 0)
    files = _files(out)
    assert sorted(files) == sorted(tile_paths(SIZE))
    assert files["checkpoint"] == ledger.head()[1].encode("utf-8")
    assert files["tile/1/000.p/2"] == read_tile(ledger, 1, 0, 2)


def test_reexport_is_idempotent(ledger: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    export_tiles(ledger, out)
    before = _files(out)
    done = export_tiles(ledger, out)
    assert (done.tiles_written, done.bundles_written, done.kept) == (0, 0, 7)
    assert _files(out) == before


def test_export_after_appends_keeps_full_tiles_and_adds_new_ones(ledger: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    export_tiles(ledger, out)
    ledger.append_many([event(n) for n in range(SIZE, 800)])
    done = export_tiles(ledger, out)
    assert done.size == 800
    assert {"tile/0/002", "tile/0/003.p/32", "tile/1/000.p/3"} <= set(_files(out))
    assert (out / "checkpoint").read_bytes() == ledger.head()[1].encode("utf-8")


def test_a_changed_full_tile_is_refused_as_tampering(ledger: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    export_tiles(ledger, out)
    tile = out / "tile/0/001"
    tile.write_bytes(tile.read_bytes()[:-1] + b"\x00")
    checkpoint = (out / "checkpoint").read_bytes()
    with pytest.raises(VerificationFailed, match="tile/0/001 differs"):
        export_tiles(ledger, out)
    assert (out / "checkpoint").read_bytes() == checkpoint


def test_publishing_an_older_checkpoint_is_refused(key: SigningKey, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    older = make_ledger(str(tmp_path / "old.db"), key, (300,))
    newer = make_ledger(str(tmp_path / "new.db"), key, (300, 100))
    export_tiles(newer, out)
    with pytest.raises(VerificationFailed, match="roll the log back"):
        export_tiles(older, out)


def test_cli_writes_the_tree_and_refuses_tampering(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiles"
    store = ledger.location
    ledger.close()
    assert main(["ledger", "tiles", str(out), "--store", store]) == 0
    assert "wrote 4 tiles and 3 entry bundles" in capsys.readouterr().out
    assert main(["ledger", "tiles", str(out), "--store", store]) == 0
    assert "7 already there and unchanged); checkpoint size 600" in capsys.readouterr().out
    (out / "tile/entries/000").write_bytes(b"")
    assert main(["ledger", "tiles", str(out), "--store", store]) == 1
    assert main(["ledger", "tiles", str(out), "--store", str(tmp_path / "missing.db")]) == 3


# Interop with golang.org/x/mod/sumdb/tlog


def _go_missing() -> str | None:
    if shutil.which("go") is None:
        return "the go toolchain is not installed"
    if not XMOD_TLOG.is_dir():
        return f"golang.org/x/mod sources are not at {XMOD_TLOG}"
    return None


@pytest.fixture(scope="session")
def go_checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The x/mod tiles checker, built once per session, offline, in GOPATH mode against Debian's x/mod."""
    missing = _go_missing()
    if missing is not None:
        message = f"{missing}: apt-get install golang-go golang-golang-x-mod-dev"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    build = tmp_path_factory.mktemp("go")
    binary = build / "tiles_interop"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": GOPATH,
        "GOCACHE": str(build / "cache"),
        "GOFLAGS": "",
        "GOPROXY": "off",
    }
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=INTEROP, env=env, check=True, timeout=300)
    return binary


def _go_check(checker: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    args = [str(checker), str(folder)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.go
def test_go_tlog_audits_the_exported_tiles(ledger: Ledger, tmp_path: Path, go_checker: Path) -> None:
    out = tmp_path / "tiles"
    export_tiles(ledger, out)
    result = _go_check(go_checker, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok {ORIGIN} size {SIZE}" in result.stdout
    assert f"{SIZE} entries hash to their leaves, {SIZE} inclusion proofs hold" in result.stdout


@pytest.mark.go
@pytest.mark.parametrize("tampered", ["tile/0/001", "tile/1/000.p/2", "tile/entries/002.p/88"])
def test_go_tlog_rejects_a_tampered_tile(
    ledger: Ledger, tmp_path: Path, go_checker: Path, tampered: str
) -> None:
    out = tmp_path / "tiles"
    export_tiles(ledger, out)
    path = out / tampered
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte of the last hash, or of the last entry
    path.write_bytes(bytes(data))
    result = _go_check(go_checker, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAIL:")


@pytest.mark.go
def test_go_tlog_rejects_a_forged_entry_with_a_matching_leaf(
    ledger: Ledger, tmp_path: Path, go_checker: Path
) -> None:
    """The forger rewrites entry 511 and its leaf hash in tile/0/001 to match, leaving the level-1 tile.

    x/mod 0.7.0's TileHashReader does not check that full tile against its parent (it skips some loaded
    tiles), so only the inclusion proof of each entry against the signed root catches this.
    """
    out = tmp_path / "tiles"
    export_tiles(ledger, out)
    bundle = out / "tile/entries/001"
    entries = decode_bundle(bundle.read_bytes())
    entries[-1] = b'{"forged":true}'
    bundle.write_bytes(encode_bundle(entries))
    tile = out / "tile/0/001"
    tile.write_bytes(tile.read_bytes()[:-32] + leaf_hash(entries[-1]))
    result = _go_check(go_checker, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "invalid transparency proof" in result.stdout
