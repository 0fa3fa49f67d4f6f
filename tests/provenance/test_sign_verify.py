"""Sign, then verify; every tampering is refused with the changed file named."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from trainguard.errors import UsageError, VerificationFailed
from trainguard.provenance import (
    SIGNATURE_NAME,
    SIGNED_PREFIX,
    FileEntry,
    PrivateKey,
    SignatureFile,
    TreeChanged,
    UnsafeTree,
    build_manifest,
    sign_path,
    signature_path,
    verify_path,
)
from trainguard.provenance._signature import (
    choose_signer,
    read_signature_file,
    sign_manifest,
    verify_tree,
)

MIB = 1 << 20
ALGS = ["ed25519", "ecdsa-p256"]


@pytest.fixture(params=ALGS)
def key(request: pytest.FixtureRequest) -> PrivateKey:
    return PrivateKey.generate(request.param)


def _model(root: Path) -> Path:
    model = root / "ckpt"
    (model / "tokenizer" / "extra").mkdir(parents=True)
    (model / "model.bin").write_bytes(os.urandom(3 * MIB + 7))  # 4 shards of 1 MiB
    (model / "config.json").write_text('{"layers": 2}')
    (model / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (model / "tokenizer" / "extra" / "empty").write_bytes(b"")
    return model


def _signed(tmp_path: Path, key: PrivateKey) -> Path:
    model = _model(tmp_path)
    sign_path(model, key, shard_size=MIB, workers=2)
    return model


def _changed(model: Path, key: PrivateKey) -> TreeChanged:
    with pytest.raises(TreeChanged) as info:
        verify_path(model, [key.public()])
    return info.value


def test_sign_and_verify_a_directory(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    signed = sign_path(model, key, shard_size=MIB, workers=2)
    assert signed.signature_path == model / SIGNATURE_NAME
    assert stat.S_IMODE(signed.signature_path.stat().st_mode) == 0o644
    assert signed.key_id == key.public().key_id
    assert [len(f.shards) for f in signed.manifest.files if f.path == "model.bin"] == [4]
    result = verify_path(model, [key.public()])
    assert result.ok and result.signer == key.public() and result.root == signed.root
    assert verify_path(model, [key.public()], workers=1).ok
    # No temporary files left next to the signature.
    assert sorted(p.name for p in model.iterdir()) == [
        SIGNATURE_NAME,
        "config.json",
        "model.bin",
        "tokenizer",
    ]


def test_sign_and_verify_a_file(tmp_path: Path, key: PrivateKey) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(os.urandom(2 * MIB + 1))
    signed = sign_path(path, key, shard_size=MIB)
    assert signed.signature_path == tmp_path / "model.pt.trainguard.sig"
    assert signed.manifest.kind == "file"
    assert verify_path(path, [key.public()]).ok
    data = bytearray(path.read_bytes())
    data[MIB + 5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TreeChanged, match=r"modified: model.pt \(shard 1 of 3 differs\)"):
        verify_path(path, [key.public()])


def test_signature_message_is_prefixed_canonical_manifest(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    document = SignatureFile.from_bytes((model / SIGNATURE_NAME).read_bytes(), "sig")
    (signature,) = document.signatures
    assert key.public().verify(SIGNED_PREFIX + document.manifest.canonical(), signature.sig)
    assert signature.alg == key.alg


def test_flipped_byte_in_one_shard_is_named(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    with (model / "model.bin").open("r+b") as handle:
        handle.seek(2 * MIB + 10)
        byte = handle.read(1)
        handle.seek(2 * MIB + 10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    error = _changed(model, key)
    assert error.diff.modified == ("model.bin",)
    assert "modified: model.bin (shard 2 of 4 differs)" in error.message
    assert error.exit_code == 1


def test_renamed_file_is_named(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (model / "config.json").rename(model / "config2.json")
    error = _changed(model, key)
    assert error.diff.renamed == (("config.json", "config2.json"),)
    assert "renamed: config.json -> config2.json" in error.message


def test_added_file_is_named(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (model / "tokenizer" / "evil.py").write_text("import os")
    error = _changed(model, key)
    assert error.diff.added == ("tokenizer/evil.py",)
    assert "added: tokenizer/evil.py" in error.message


def test_removed_file_is_named(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (model / "tokenizer" / "extra" / "empty").unlink()
    error = _changed(model, key)
    assert error.diff.removed == ("tokenizer/extra/empty",)
    assert "removed: tokenizer/extra/empty" in error.message


def test_mode_change_is_named(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (model / "config.json").chmod(0o755)
    error = _changed(model, key)
    assert error.diff.mode_changed == ("config.json",)
    assert "mode changed: config.json" in error.message


def test_symlink_out_of_the_tree_at_sign_time(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    (model / "leak").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeTree, match="leak: symlink leaves the tree"):
        sign_path(model, key)
    assert not (model / SIGNATURE_NAME).exists()


def test_symlink_out_of_the_tree_at_verify_time(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (tmp_path / "other.json").write_text('{"layers": 2}')
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(tmp_path / "other.json")
    with pytest.raises(UnsafeTree, match=r"config.json: symlink leaves the tree"):
        verify_path(model, [key.public()])


def test_in_tree_symlink_change_is_named(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    (model / "weights").symlink_to("model.bin")
    sign_path(model, key, shard_size=MIB)
    assert verify_path(model, [key.public()]).ok
    (model / "weights").unlink()
    (model / "weights").symlink_to("config.json")
    error = _changed(model, key)
    assert error.diff.links_changed == ("weights",)


def test_symlink_cycle_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (model / "tokenizer" / "loop").symlink_to("../tokenizer", target_is_directory=True)
    with pytest.raises(UnsafeTree, match="tokenizer/loop: symlink cycle"):
        verify_path(model, [key.public()])


def test_fifo_is_refused_at_verify_time(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    os.mkfifo(model / "tokenizer" / "fifo")
    with pytest.raises(UnsafeTree, match="tokenizer/fifo: is a FIFO"):
        verify_path(model, [key.public()])


def test_path_with_dotdot_in_the_signature_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    sig = model / SIGNATURE_NAME
    doc = json.loads(sig.read_bytes())
    doc["manifest"]["files"][0]["path"] = "../outside"
    sig.write_text(json.dumps(doc))
    with pytest.raises(VerificationFailed, match=r"'../outside'.*not allowed"):
        verify_path(model, [key.public()])


def test_empty_directory_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsafeTree, match="empty model"):
        sign_path(tmp_path / "empty", key)


def test_untrusted_signer_names_both_key_ids(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    other = PrivateKey.generate("ed25519").public()
    with pytest.raises(VerificationFailed, match="by no trusted key") as info:
        verify_path(model, [other])
    assert key.public().key_id in info.value.message
    assert other.key_id in info.value.message


def test_no_trusted_keys_is_a_usage_error(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    with pytest.raises(UsageError, match="--trust KEY"):
        verify_path(model, [])


def test_unsigned_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    with pytest.raises(VerificationFailed, match="not signed"):
        verify_path(model, [key.public()])


def test_forged_signature_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    sig = model / SIGNATURE_NAME
    doc = json.loads(sig.read_bytes())
    raw = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    raw[-5] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(doc))
    with pytest.raises(VerificationFailed, match="invalid signature"):
        verify_path(model, [key.public()])


def test_manifest_edited_to_match_tampering_is_refused(tmp_path: Path, key: PrivateKey) -> None:
    model = _signed(tmp_path, key)
    (model / "config.json").write_text('{"layers": 3}')
    sig = model / SIGNATURE_NAME
    doc = json.loads(sig.read_bytes())
    for entry in doc["manifest"]["files"]:
        if entry["path"] == "config.json":
            import hashlib

            entry["digest"] = hashlib.sha256(b'{"layers": 3}').hexdigest()
    sig.write_text(json.dumps(doc))
    with pytest.raises(VerificationFailed, match="invalid signature"):
        verify_path(model, [key.public()])


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-40],
        lambda b: b"",
        lambda b: b"\xff" + b,
        lambda b: b.replace(b'"version":1', b'"version":1,"version":1', 1),
        lambda b: b.replace(b'"trainguard-signature"', b'"other"'),
        lambda b: b.replace(b'"signatures":[', b'"signatures":[1,'),
        lambda b: b.replace(b'"sig":"', b'"sig":"!'),
    ],
)
def test_corrupted_signature_file_is_refused(tmp_path: Path, key: PrivateKey, damage: object) -> None:
    model = _signed(tmp_path, key)
    sig = model / SIGNATURE_NAME
    sig.write_bytes(damage(sig.read_bytes()))  # type: ignore[operator]
    with pytest.raises(VerificationFailed, match="not a valid signature file"):
        verify_path(model, [key.public()])


def test_two_keys_can_sign_and_either_verifies(tmp_path: Path) -> None:
    model = _model(tmp_path)
    ed, p256 = PrivateKey.generate("ed25519"), PrivateKey.generate("ecdsa-p256")
    sign_path(model, ed, shard_size=MIB)
    sign_path(model, p256, shard_size=MIB)
    document = SignatureFile.from_bytes((model / SIGNATURE_NAME).read_bytes(), "sig")
    assert {s.key_id for s in document.signatures} == {ed.key_id, p256.key_id}
    assert verify_path(model, [ed.public()]).signer == ed.public()
    assert verify_path(model, [p256.public()]).signer == p256.public()


def test_signature_out_of_tree_with_explicit_path(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    out = tmp_path / "ckpt.sig"
    sign_path(model, key, out=out, shard_size=MIB)
    assert not signature_path(model).exists()
    assert verify_path(model, [key.public()], signature=out).ok


def test_cache_is_used_only_when_not_full(tmp_path: Path, key: PrivateKey) -> None:
    class Cache:
        def __init__(self) -> None:
            self.rows: dict[str, FileEntry] = {}
            self.gets = 0

        def get(self, path: Path, st: os.stat_result) -> FileEntry | None:
            self.gets += 1
            return self.rows.get(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")

        def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None:
            self.rows[f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"] = entry

    model = _signed(tmp_path, key)
    cache = Cache()
    assert verify_path(model, [key.public()], full=True, digest_cache=cache).ok
    assert cache.gets == 0 and len(cache.rows) == 4
    assert verify_path(model, [key.public()], full=False, digest_cache=cache).ok
    assert cache.gets == 4
    (model / "config.json").write_text('{"layers": 9}')
    with pytest.raises(TreeChanged, match=r"modified: config\.json"):
        verify_path(model, [key.public()], full=False, digest_cache=cache)


def test_file_signature_does_not_verify_a_directory(tmp_path: Path, key: PrivateKey) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"x")
    sign_path(path, key)
    model = _model(tmp_path)
    with pytest.raises(VerificationFailed, match="signature is for a file"):
        verify_path(model, [key.public()], signature=tmp_path / "m.pt.trainguard.sig")


# --- sign_manifest: the signing half of sign_path ---


def test_sign_manifest_writes_what_sign_path_writes(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    manifest = build_manifest(model, shard_size=MIB)
    result = sign_manifest(model, manifest, key)
    assert result.signature_path == model / SIGNATURE_NAME
    assert result.root == manifest.root and result.key_id == key.key_id
    assert verify_path(model, [key.public()]).ok
    written = (model / SIGNATURE_NAME).read_bytes()
    sign_path(model, key, shard_size=MIB)
    again = SignatureFile.from_bytes((model / SIGNATURE_NAME).read_bytes(), "sig")
    assert again.manifest == SignatureFile.from_bytes(written, "sig").manifest
    assert not [p for p in model.iterdir() if p.name.endswith(".tmp")]
    assert stat.S_IMODE((model / SIGNATURE_NAME).stat().st_mode) == 0o644


def test_sign_manifest_keeps_other_keys_only_over_the_same_manifest(tmp_path: Path) -> None:
    model = _model(tmp_path)
    ed, p256 = PrivateKey.generate("ed25519"), PrivateKey.generate("ecdsa-p256")
    manifest = build_manifest(model, shard_size=MIB)
    sign_manifest(model, manifest, ed)
    sign_manifest(model, manifest, p256)
    sign_manifest(model, manifest, ed)  # re-signing replaces the key's own signature, once
    ids = [s.key_id for s in read_signature_file(model / SIGNATURE_NAME).signatures]
    assert sorted(ids) == sorted([ed.key_id, p256.key_id])
    (model / "config.json").write_text('{"layers": 3}')
    sign_manifest(model, build_manifest(model, shard_size=MIB), p256)
    ids = [s.key_id for s in read_signature_file(model / SIGNATURE_NAME).signatures]
    assert ids == [p256.key_id]  # ed signed another manifest: its signature is gone
    with pytest.raises(VerificationFailed, match="no trusted key"):
        verify_path(model, [ed.public()])


def test_sign_manifest_to_an_explicit_out(tmp_path: Path, key: PrivateKey) -> None:
    model = _model(tmp_path)
    out = tmp_path / "elsewhere.sig"
    result = sign_manifest(model, build_manifest(model, shard_size=MIB), key, out=out)
    assert result.signature_path == out and not signature_path(model).exists()
    assert verify_path(model, [key.public()], signature=out).ok


# --- verify_tree with deferred files: their content is the caller's to check ---


def test_deferred_file_is_not_read_but_its_size_and_mode_are_compared(
    tmp_path: Path, key: PrivateKey
) -> None:
    class Counting:
        def __init__(self) -> None:
            self.looked_up: list[str] = []

        def get(self, path: Path, st: os.stat_result) -> FileEntry | None:
            self.looked_up.append(Path(path).name)
            return None

        def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None:
            pass

    model = _signed(tmp_path, key)
    sig = signature_path(model)
    document = read_signature_file(sig)
    signer = choose_signer(document, [key.public()], str(sig))
    cache = Counting()
    blob = model / "model.bin"
    data = bytearray(blob.read_bytes())
    data[5] ^= 1
    blob.write_bytes(bytes(data))  # same size: only a reader of the bytes can tell
    result = verify_tree(
        model, document.manifest, signer, signature=sig, full=False, digest_cache=cache, defer={"model.bin"}
    )
    assert result.ok and "model.bin" not in cache.looked_up and len(cache.looked_up) == 3
    blob.chmod(0o600)
    with pytest.raises(TreeChanged, match=r"mode changed: model\.bin"):
        verify_tree(model, document.manifest, signer, signature=sig, defer={"model.bin"})
    blob.write_bytes(bytes(data[:-1]))
    with pytest.raises(TreeChanged, match=r"modified: model\.bin \(size"):
        verify_tree(model, document.manifest, signer, signature=sig, defer={"model.bin"})
    (model / "config.json").write_text('{"layers": 7}')
    with pytest.raises(TreeChanged, match=r"modified: config\.json"):
        verify_tree(model, document.manifest, signer, signature=sig, defer={"model.bin"})
