"""OMS bundles against the real model_signing 1.1.1: each side verifies what the other signed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import model_signing as _model_signing
import pytest

from trainguard.errors import UnsupportedFormat, UsageError, VerificationFailed
from trainguard.provenance import (
    PrivateKey,
    PublicKey,
    TreeChanged,
    build_manifest,
    sign_path,
)
from trainguard.provenance._oms import (
    PAYLOAD_TYPE,
    _pae,
    is_oms_bundle,
    oms_key_hint,
    to_oms_bundle,
    verify_oms_bundle,
)

# model_signing ships no type hints for its Config classes.
model_signing: Any = _model_signing


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "config.json").write_text('{"hidden": 4}')
    (root / "weights.bin").write_bytes(os.urandom(4096))
    (root / "sub" / "deep" / "part-1.bin").write_bytes(b"one" * 100)
    (root / "sub-file").write_bytes(b"sorts after sub/ by components, before it as a string")
    (root / "empty").write_bytes(b"")
    (root / ".gitignore").write_text("*.tmp\n")
    return root


@pytest.fixture
def key(tmp_path: Path) -> PrivateKey:
    return PrivateKey.generate("ecdsa-p256")


def _key_files(tmp_path: Path, key: PrivateKey, stem: str = "k") -> tuple[Path, Path]:
    private, public = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.pub"
    if not private.exists():
        key.save(private)
        key.public().save(public)
    return private, public


def _ms_sign(tmp_path: Path, key: PrivateKey, target: Path, sig: Path) -> bytes:
    private, _ = _key_files(tmp_path, key)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).sign(target, sig)
    return sig.read_bytes()


def _ms_verify(tmp_path: Path, key: PrivateKey, target: Path, sig: Path) -> None:
    _, public = _key_files(tmp_path, key)
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).verify(target, sig)


def _statement(bundle: bytes) -> dict[str, Any]:
    doc = json.loads(bundle)
    payload: dict[str, Any] = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    return payload


def _resign(bundle: bytes, key: PrivateKey, change: Any) -> bytes:
    """A bundle whose statement `change` rewrote, validly signed again by `key`."""
    doc = json.loads(bundle)
    statement = _statement(bundle)
    change(statement)
    payload = json.dumps(statement, indent=2).encode()
    doc["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    sig = key.sign(_pae(PAYLOAD_TYPE, payload))
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    return json.dumps(doc).encode()


# model_signing signs, trainguard verifies


def test_model_signing_directory_verified(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    bundle = _ms_sign(tmp_path, key, model, tmp_path / "model.sig")
    assert is_oms_bundle(bundle)
    result = verify_oms_bundle(model, bundle, [key.public()])
    assert result.ok
    assert result.signer == key.public()
    assert result.root == "sha256:" + _statement(bundle)["subject"][0]["digest"]["sha256"]
    # .gitignore is in model_signing's default ignore_paths, so it is not covered.
    assert [f.path for f in result.manifest.files] == [
        "config.json",
        "empty",
        "sub-file",
        "sub/deep/part-1.bin",
        "weights.bin",
    ]


def test_model_signing_signature_inside_the_directory(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    private, _ = _key_files(tmp_path, key)
    sig = model / "model.sig"
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"])
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).set_hashing_config(
        hashing
    ).sign(model, sig)
    assert verify_oms_bundle(model, sig.read_bytes(), [key.public()], signature=sig).ok


def test_model_signing_single_file_verified(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    target = model / "weights.bin"
    bundle = _ms_sign(tmp_path, key, target, tmp_path / "w.sig")
    result = verify_oms_bundle(target, bundle, [key.public()])
    assert result.ok
    assert result.manifest.kind == "file"
    (tmp_path / "w2.bin").write_bytes(target.read_bytes())
    with pytest.raises(VerificationFailed, match="is a directory, but the OMS bundle is for a file"):
        verify_oms_bundle(model, bundle, [key.public()])


# trainguard signs, model_signing verifies


def test_trainguard_bundle_verified_by_model_signing(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    out = model / "model.sig"
    bundle = to_oms_bundle(model, build_manifest(model, exclude=(out,)), key, out=out)
    out.write_bytes(bundle)
    _ms_verify(tmp_path, key, model, out)
    assert verify_oms_bundle(model, bundle, [key.public()], signature=out).ok


def test_trainguard_bundle_next_to_a_trainguard_signature(
    tmp_path: Path, model: Path, key: PrivateKey
) -> None:
    sign_path(model, key)  # model/.trainguard.sig: never in our manifest, so listed in ignore_paths
    out = tmp_path / "model.sig"
    out.write_bytes(to_oms_bundle(model, build_manifest(model), key, out=out))
    _ms_verify(tmp_path, key, model, out)


def test_trainguard_single_file_bundle_verified_by_model_signing(
    tmp_path: Path, model: Path, key: PrivateKey
) -> None:
    target = model / "weights.bin"
    out = tmp_path / "w.sig"
    out.write_bytes(to_oms_bundle(target, build_manifest(target), key))
    _ms_verify(tmp_path, key, target, out)


def test_same_statement_as_model_signing(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    """Same subject, root, serialization and resources in the same order; only key order may differ."""
    theirs = json.loads(_ms_sign(tmp_path, key, model, tmp_path / "model.sig"))
    ours = json.loads(to_oms_bundle(model, build_manifest(model), key))
    assert ours["mediaType"] == theirs["mediaType"]
    assert ours["verificationMaterial"] == theirs["verificationMaterial"]
    assert ours["verificationMaterial"]["publicKey"]["hint"] == oms_key_hint(key.public())
    assert ours["dsseEnvelope"]["payloadType"] == theirs["dsseEnvelope"]["payloadType"]
    a, b = _statement(json.dumps(ours).encode()), _statement(json.dumps(theirs).encode())
    a["predicate"]["serialization"]["ignore_paths"].remove(".trainguard.sig")
    for statement in (a, b):
        statement["predicate"]["serialization"]["ignore_paths"].sort()
    assert a == b
    names = [r["name"] for r in a["predicate"]["resources"]]
    assert names.index("sub/deep/part-1.bin") < names.index("sub-file")


# tampering after model_signing signed


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda m: (m / "weights.bin").write_bytes(b"poisoned"), "modified: weights.bin"),
        (lambda m: (m / "config.json").rename(m / "config2.json"), "renamed: config.json -> config2.json"),
        (lambda m: (m / "sub" / "extra.py").write_text("import os"), "added: sub/extra.py"),
        (lambda m: (m / "sub" / "deep" / "part-1.bin").unlink(), "removed: sub/deep/part-1.bin"),
        (lambda m: (m / "link").symlink_to("config.json"), "symlink changed: link"),
    ],
    ids=["modified", "renamed", "added", "removed", "symlink"],
)
def test_tampering_after_model_signing_signed(
    tmp_path: Path, model: Path, key: PrivateKey, tamper: Any, expected: str
) -> None:
    bundle = _ms_sign(tmp_path, key, model, tmp_path / "model.sig")
    tamper(model)
    with pytest.raises(TreeChanged) as info:
        verify_oms_bundle(model, bundle, [key.public()])
    assert expected in info.value.message
    assert info.value.result.signer == key.public()


def test_tampered_single_file_named(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    target = model / "weights.bin"
    bundle = _ms_sign(tmp_path, key, target, tmp_path / "w.sig")
    target.write_bytes(b"poisoned")
    with pytest.raises(TreeChanged, match=r"modified: weights\.bin"):
        verify_oms_bundle(target, bundle, [key.public()])


# keys


def test_untrusted_key_refused_naming_keys(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    bundle = _ms_sign(tmp_path, key, model, tmp_path / "model.sig")
    other = PrivateKey.generate("ecdsa-p256").public()
    other.name = "release-key"
    with pytest.raises(VerificationFailed) as info:
        verify_oms_bundle(model, bundle, [other])
    assert other.key_id in info.value.message
    assert "release-key" in info.value.message
    assert oms_key_hint(key.public()) in info.value.message


def test_only_ed25519_trusted(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    bundle = _ms_sign(tmp_path, key, model, tmp_path / "model.sig")
    ed = PrivateKey.generate("ed25519").public()
    with pytest.raises(VerificationFailed, match="none is an ECDSA P-256 key"):
        verify_oms_bundle(model, bundle, [ed])


def test_no_trusted_keys(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    bundle = _ms_sign(tmp_path, key, model, tmp_path / "model.sig")
    with pytest.raises(UsageError, match="no trusted keys"):
        verify_oms_bundle(model, bundle, [])


def test_ed25519_refused_for_oms(model: Path) -> None:
    ed = PrivateKey.generate("ed25519")
    with pytest.raises(UsageError) as info:
        to_oms_bundle(model, build_manifest(model), ed)
    assert info.value.message == (
        "OMS key signing in model_signing 1.1.1 supports only elliptic-curve keys: use --alg ecdsa-p256"
    )


def test_bundle_without_hint_tries_trusted_keys(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    doc = json.loads(_ms_sign(tmp_path, key, model, tmp_path / "model.sig"))
    del doc["verificationMaterial"]["publicKey"]["hint"]
    other = PrivateKey.generate("ecdsa-p256").public()
    result = verify_oms_bundle(model, json.dumps(doc).encode(), [other, key.public()])
    assert result.signer == key.public()


def test_key_hint_is_sha256_of_pem(key: PrivateKey) -> None:
    assert oms_key_hint(key.public()) == hashlib.sha256(key.public().pem()).hexdigest()
    assert PublicKey.from_pem(key.public().pem()) == key.public()


# altered or hostile bundles


def test_altered_payload_invalid_signature(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    doc = json.loads(_ms_sign(tmp_path, key, model, tmp_path / "model.sig"))
    statement = _statement(json.dumps(doc).encode())
    statement["predicate"]["resources"].pop()
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(VerificationFailed, match="invalid OMS signature"):
        verify_oms_bundle(model, json.dumps(doc).encode(), [key.public()])


def _drop_last(s: dict[str, Any]) -> None:
    s["predicate"]["resources"].pop()


def _traversal(s: dict[str, Any]) -> None:
    s["predicate"]["resources"][0]["name"] = "../../etc/passwd"


def _duplicate(s: dict[str, Any]) -> None:
    s["predicate"]["resources"].append(dict(s["predicate"]["resources"][0]))


def _ignore_traversal(s: dict[str, Any]) -> None:
    s["predicate"]["serialization"]["ignore_paths"].append("../other")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # The root must be the digest of the resources, as model_signing checks too.
        (_drop_last, "subject digest is not the digest of the resources"),
        # model_signing joins unchecked resource names to the model path.
        (_traversal, "not allowed"),
        # model_signing keeps the last of two same-named resources while its root hashes both.
        (_duplicate, "appears twice"),
        (_ignore_traversal, "ignore_paths"),
    ],
    ids=["root-mismatch", "name-traversal", "duplicate-name", "ignore-traversal"],
)
def test_signed_but_malformed_statement(
    tmp_path: Path, model: Path, key: PrivateKey, change: Any, expected: str
) -> None:
    bundle = _resign(_ms_sign(tmp_path, key, model, tmp_path / "model.sig"), key, change)
    with pytest.raises(VerificationFailed, match=expected):
        verify_oms_bundle(model, bundle, [key.public()])


def test_v01_predicate_unsupported(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    def v01(s: dict[str, Any]) -> None:
        s["predicateType"] = "https://model_signing/Digests/v0.1"

    bundle = _resign(_ms_sign(tmp_path, key, model, tmp_path / "model.sig"), key, v01)
    with pytest.raises(UnsupportedFormat):
        verify_oms_bundle(model, bundle, [key.public()])


def test_sharded_serialization_unsupported(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    private, _ = _key_files(tmp_path, key)
    sig = tmp_path / "model.sig"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private).set_hashing_config(
        model_signing.hashing.Config().use_shard_serialization()
    ).sign(model, sig)
    with pytest.raises(UnsupportedFormat, match="'shards'"):
        verify_oms_bundle(model, sig.read_bytes(), [key.public()])


def test_is_oms_bundle(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    native = sign_path(model, key).signature_path.read_bytes()
    assert not is_oms_bundle(native)
    assert not is_oms_bundle(b"\x80\x04junk")
    assert not is_oms_bundle(b"[]")
    assert is_oms_bundle(to_oms_bundle(model, build_manifest(model), key))


def test_symlinks_refused_by_default(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    (model / "alias.json").symlink_to("config.json")
    with pytest.raises(UsageError, match=r"alias\.json"):
        to_oms_bundle(model, build_manifest(model), key)


def test_symlinks_followed_when_allowed(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    (model / "alias.json").symlink_to("config.json")
    out = tmp_path / "model.sig"
    bundle = to_oms_bundle(model, build_manifest(model), key, allow_symlinks=True)
    out.write_bytes(bundle)
    _, public = _key_files(tmp_path, key)
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).set_hashing_config(
        model_signing.hashing.Config().set_allow_symlinks(True)
    ).verify(model, out)
    assert verify_oms_bundle(model, bundle, [key.public()]).ok


def test_directory_symlinks_refused(tmp_path: Path, model: Path, key: PrivateKey) -> None:
    (model / "alias-dir").symlink_to("sub")
    with pytest.raises(UsageError, match="points at a directory"):
        to_oms_bundle(model, build_manifest(model), key, allow_symlinks=True)
