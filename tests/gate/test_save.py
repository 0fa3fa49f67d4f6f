"""trainguard.save: the digests taken while writing are the digests of the file on disk, and sign it."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from trainguard.errors import TrainguardError, UsageError
from trainguard.gate._load import load
from trainguard.gate._save import save
from trainguard.provenance import PrivateKey, build_manifest, signature_path, verify_path

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "tg-home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey.generate("ed25519")


def _state(rows: int = 256) -> dict[str, object]:
    generator = torch.Generator().manual_seed(1)
    return {
        "big": torch.randn(rows, 1024, generator=generator),  # rows KiB * 4: large enough for threaded writes
        "small": torch.arange(10),
        "meta": {"epoch": 2, "name": "run"},
    }


def test_saved_file_is_what_torch_save_writes_and_verifies(tmp_path: Path, key: PrivateKey) -> None:
    path = tmp_path / "ckpt.pt"
    result = save(_state(), path, key=key)
    entry = result.manifest.files[0]
    data = path.read_bytes()
    assert entry.digest == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
    assert entry.mode == stat.S_IMODE(path.stat().st_mode)
    assert signature_path(path).exists()
    assert build_manifest(path) == result.manifest
    verified = verify_path(path, [key.public()])
    assert verified.ok
    assert verified.signer.key_id == key.public().key_id
    loaded = load(path, trusted=[key.public()])
    assert torch.equal(loaded["big"], _state()["big"])
    assert loaded["meta"] == {"epoch": 2, "name": "run"}
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("shard_size", [1, 4096, 1 << 20, (1 << 20) + 7, 3 << 20])
def test_shard_digests_match_those_of_signing_the_file(
    tmp_path: Path, key: PrivateKey, shard_size: int
) -> None:
    path = tmp_path / "ckpt.pt"
    state = _state(rows=1024) if shard_size != 1 else {"tiny": torch.arange(3)}
    result = save(state, path, key=key, shard_size=shard_size)
    assert build_manifest(path, shard_size=shard_size, workers=1) == result.manifest
    if path.stat().st_size > shard_size:
        assert len(result.manifest.files[0].shards) == -(-path.stat().st_size // shard_size)
    assert verify_path(path, [key.public()]).ok


def test_save_replaces_an_existing_checkpoint_and_its_signature(tmp_path: Path, key: PrivateKey) -> None:
    path = tmp_path / "ckpt.pt"
    save({"v": torch.zeros(3)}, path, key=key)
    save({"v": torch.ones(3)}, path, key=key)
    assert torch.equal(load(path, trusted=[key.public()])["v"], torch.ones(3))


def test_save_refuses_a_directory(tmp_path: Path, key: PrivateKey) -> None:
    with pytest.raises(UsageError):
        save({"v": 1}, tmp_path, key=key)


def test_the_key_may_be_a_path_or_the_default_signing_key(
    tmp_path: Path, key: PrivateKey, _home: Path
) -> None:
    pem = tmp_path / "signing.pem"
    key.save(pem)
    path = tmp_path / "ckpt.pt"
    assert save({"v": torch.ones(2)}, path, key=str(pem)).key_id == key.key_id
    assert save({"v": torch.ones(2)}, path, key=pem).key_id == key.key_id
    with pytest.raises(UsageError, match=r"no default signing key at .*signing\.pem: create it with"):
        save({"v": torch.ones(2)}, path)
    key.save(_home / "keys" / "signing.pem")
    assert save({"v": torch.ones(2)}, path).key_id == key.key_id


@pytest.mark.parametrize(
    ("bad_key", "message"),
    [
        ("public", "is a public key, but a private key is needed"),
        ("missing", "does not exist"),
        ("public object", "key is a PublicKey"),
        (42, "key must be a PrivateKey or the path of a private key file, not int"),
    ],
)
def test_a_bad_key_leaves_the_checkpoint_untouched(
    tmp_path: Path, key: PrivateKey, bad_key: object, message: str
) -> None:
    path = tmp_path / "ckpt.pt"
    save({"v": torch.zeros(3)}, path, key=key)
    before = path.read_bytes(), signature_path(path).read_bytes()
    key.public().save(tmp_path / "signing.pem.pub")
    given = {
        "public": str(tmp_path / "signing.pem.pub"),
        "missing": tmp_path / "nowhere.pem",
        "public object": key.public(),
    }.get(bad_key, bad_key)  # type: ignore[call-overload]
    with pytest.raises(TrainguardError, match=message):
        save({"v": torch.ones(3)}, path, key=given)  # type: ignore[arg-type]
    assert (path.read_bytes(), signature_path(path).read_bytes()) == before
    assert verify_path(path, [key.public()]).ok
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "tg-home")  # tg-home: the ledger's
    assert left == ["ckpt.pt", "ckpt.pt.trainguard.sig", "signing.pem.pub"]


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path, key: PrivateKey) -> None:
    path = tmp_path / "ckpt.pt"
    with pytest.raises(Exception, match="pickle"):
        save({"f": lambda: 0}, path, key=key)
    assert not list(tmp_path.glob("*ckpt*"))


def test_save_writes_its_signature_like_trainguard_sign(tmp_path: Path, key: PrivateKey) -> None:
    """Another key's signature over the very same bytes survives a re-save; over other bytes it does not."""
    from trainguard.provenance import read_signature_file, sign_path

    path = tmp_path / "ckpt.pt"
    other = PrivateKey.generate("ecdsa-p256")
    save({"v": torch.zeros(3)}, path, key=key)
    sign_path(path, other)
    save({"v": torch.zeros(3)}, path, key=key)
    signers = {s.key_id for s in read_signature_file(signature_path(path)).signatures}
    assert signers == {key.key_id, other.key_id}
    assert verify_path(path, [other.public()]).ok
    save({"v": torch.ones(3)}, path, key=key)
    assert [s.key_id for s in read_signature_file(signature_path(path)).signatures] == [key.key_id]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("shard_size", [1000, 4096, 1 << 16])
def test_followers_hash_every_written_byte_whatever_the_write_sizes(tmp_path: Path, shard_size: int) -> None:
    """Writes of 1 byte to 200 KB, across shard boundaries: the digests are those of the file."""
    import os
    import random

    from trainguard.gate._save import _HashingWriter

    path = tmp_path / "stream"
    rng = random.Random(shard_size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        writer = _HashingWriter(fd, shard_size)
        for _ in range(60):
            writer.write(rng.randbytes(rng.choice([1, 7, 4096, 65537, 200_000])))
        digest, shards = writer.finish()
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    expected = [hashlib.sha256(data[i : i + shard_size]).hexdigest() for i in range(0, len(data), shard_size)]
    assert list(shards) == (expected if len(data) > shard_size else [])


def test_a_saved_checkpoint_is_in_the_ledger_so_its_deletion_is_seen(
    tmp_path: Path, key: PrivateKey, _home: Path
) -> None:
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save({"v": torch.ones(2)}, folder / "a.pt", key=key)
    save({"v": torch.ones(2)}, folder / "b.pt", key=key)
    save({"v": torch.ones(2)}, folder / "c.pt", key=key, ledger=False)
    (folder / "b.pt").unlink()
    public = tmp_path / "signer.pub"
    key.public().save(public)
    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "ckpt",
            "audit",
            str(folder),
            "--trust",
            str(public),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TRAINGUARD_HOME": str(_home)},
        timeout=120,
        check=False,
    )
    assert audit.returncode == 1, audit.stdout + audit.stderr
    statuses = {Path(c["path"]).name: c["status"] for c in json.loads(audit.stdout)["checkpoints"]}
    assert statuses == {"a.pt": "ok", "b.pt": "missing", "c.pt": "unsigned"}
