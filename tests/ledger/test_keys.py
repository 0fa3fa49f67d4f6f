"""Note keys: text forms (golang.org/x/mod/sumdb/note vectors), key ids, and key files on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trainguard.errors import KeyFileError
from trainguard.ledger._keys import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    SigningKey,
    VerifierKey,
    b64decode_strict,
    compute_key_id,
    is_valid_key_name,
)

# golang.org/x/mod/sumdb/note note_test.go
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_go_vectors_parse_and_round_trip() -> None:
    verifier = VerifierKey.from_text(PETER_VKEY)
    assert verifier.name == "PeterNeumann"
    assert verifier.key_id == bytes.fromhex("c74f20a3")
    assert verifier.alg == ALG_ED25519
    assert verifier.text() == PETER_VKEY
    signer = SigningKey.from_text(PETER_SKEY)
    assert signer.text() == PETER_SKEY
    assert signer.verifier() == verifier
    assert VerifierKey.from_text(ENOCH_VKEY).text() == ENOCH_VKEY


def test_key_id_is_sha256_of_name_alg_and_key() -> None:
    verifier = VerifierKey.from_text(PETER_VKEY)
    assert compute_key_id("PeterNeumann", 1, verifier.public) == bytes.fromhex("c74f20a3")
    # The same key as a witness key has another id: the alg byte separates the domains.
    witness = VerifierKey("PeterNeumann", ALG_COSIGNATURE_V1, verifier.public)
    assert witness.key_id != verifier.key_id
    assert VerifierKey.from_text(witness.text()) == witness


def test_every_mangling_of_the_verifier_key_is_rejected() -> None:
    # As golang.org/x/mod/sumdb/note TestNewVerifier: every proper substring and every one-byte change.
    for i in range(len(PETER_VKEY) + 1):
        for j in range(i + 1, len(PETER_VKEY) + 1):
            if (i, j) != (0, len(PETER_VKEY)):
                with pytest.raises(KeyFileError):
                    VerifierKey.from_text(PETER_VKEY[i:j])
    for i in range(len(PETER_VKEY)):
        changed = PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1 :]
        with pytest.raises(KeyFileError):
            VerifierKey.from_text(changed)
    # Wrong key length and unknown algorithm, each with a matching key id.
    with pytest.raises(KeyFileError):
        VerifierKey.from_text("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(KeyFileError):
        VerifierKey.from_text("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_every_one_byte_change_of_the_private_key_is_rejected() -> None:
    for i in range(len(PETER_SKEY)):
        changed = PETER_SKEY[:i] + chr(ord(PETER_SKEY[i]) + 1) + PETER_SKEY[i + 1 :]
        with pytest.raises(KeyFileError) as info:
            SigningKey.from_text(changed)
        assert "AYEKFALVFGyNhPJEMzD1QIDr" not in info.value.message  # the secret is never echoed


def test_generate_sign_verify() -> None:
    key = SigningKey.generate("example.com/log")
    signature = key.sign(b"hello\n")
    assert key.verifier().verify(b"hello\n", signature)
    assert not key.verifier().verify(b"hello!\n", signature)
    assert not key.verifier().verify(b"hello\n", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not key.verifier().verify(b"hello\n", signature[:10])
    assert SigningKey.from_text(key.text()).verifier() == key.verifier()
    assert key.text().split("+")[4] not in repr(key)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\there", "nl\n", "nbsp\u00a0x"])
def test_bad_key_names(name: str) -> None:
    assert not is_valid_key_name(name)
    with pytest.raises(ValueError, match="invalid key name"):
        SigningKey.generate(name)


def test_non_canonical_base64_is_rejected() -> None:
    assert b64decode_strict("AQ==") == b"\x01"
    for bad in ("AR==", "AQ", "AQ=", "A Q==", "AQ==\n", "\u00e9"):
        with pytest.raises(ValueError):
            b64decode_strict(bad)


def test_wrong_kind_of_key_text() -> None:
    with pytest.raises(KeyFileError, match="private signing key"):
        VerifierKey.from_text(PETER_SKEY)
    with pytest.raises(KeyFileError, match="PRIVATE"):
        SigningKey.from_text(PETER_VKEY)
    witness = SigningKey.generate("witness.example", ALG_COSIGNATURE_V1)
    with pytest.raises(KeyFileError, match="cosignature/v1 witness key"):
        SigningKey.from_text(witness.text(), alg=ALG_ED25519)
    with pytest.raises(KeyFileError, match="wrong kind"):
        VerifierKey.from_text(witness.verifier().text(), alg=ALG_ED25519)
    assert SigningKey.from_text(witness.text(), alg=ALG_COSIGNATURE_V1).alg == ALG_COSIGNATURE_V1


def test_save_creates_0600_and_load_round_trips(tmp_path: Path) -> None:
    key = SigningKey.generate("example.com/log")
    path = tmp_path / "keys" / "nested" / "ledger.key"
    key.save(path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert SigningKey.load(path).text() == key.text()
    assert path.read_text() == key.text() + "\n"


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "ledger.key"
    path.write_text("precious\n")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        SigningKey.generate("x").save(path)
    assert path.read_text() == "precious\n"
    # A dangling symlink is not followed either.
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError, match="already exists"):
        SigningKey.generate("x").save(link)
    assert not (tmp_path / "elsewhere.key").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o601])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ledger.key"
    SigningKey.generate("example.com/log").save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        SigningKey.load(path)
    assert str(path) in info.value.message
    assert f"{mode:04o}" in info.value.message
    assert info.value.hint == f"chmod 600 {path}"
    path.chmod(0o400)
    assert SigningKey.load(path).name == "example.com/log"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match="does not exist"):
        SigningKey.load(missing)
    with pytest.raises(KeyFileError, match="does not exist"):
        VerifierKey.load(missing)
    with pytest.raises(KeyFileError, match="not a regular file"):
        VerifierKey.load(tmp_path)

    garbage = tmp_path / "garbage.key"
    fd = os.open(garbage, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"PRIVATE+KEY+name+zzzz+AAAA\n")
    os.close(fd)
    with pytest.raises(KeyFileError) as info:
        SigningKey.load(garbage)
    assert str(garbage) in info.value.message and "malformed" in info.value.message

    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="not a text key file"):
        VerifierKey.load(binary)

    huge = tmp_path / "huge.key"
    huge.write_bytes(b"A" * 10000)
    with pytest.raises(KeyFileError, match="too large"):
        VerifierKey.load(huge)


def test_wrong_kind_of_key_file(tmp_path: Path) -> None:
    key = SigningKey.generate("example.com/log")
    private, public = tmp_path / "ledger.key", tmp_path / "ledger.pub"
    key.save(private)
    key.verifier().save(public)
    assert _mode(public) == 0o644
    assert VerifierKey.load(public) == key.verifier()
    with pytest.raises(KeyFileError) as info:
        VerifierKey.load(private)
    assert str(private) in info.value.message and "private signing key" in info.value.message
    public.chmod(0o600)
    with pytest.raises(KeyFileError) as info:
        SigningKey.load(public)
    assert f"{public} is a public key, but a private key is needed" in info.value.message
    with pytest.raises(KeyFileError, match="wrong kind"):
        SigningKey.load(private, alg=ALG_COSIGNATURE_V1)


def test_every_verifier_key_is_told_apart_from_a_private_one() -> None:
    # Base64 may hold "+": a verifier key is recognised by its form, whatever its random bytes.
    from trainguard._keyfile import _is_public_key

    for _ in range(200):
        key = SigningKey.generate("example.com/log")
        assert _is_public_key(key.verifier().text().encode() + b"\n")
        assert not _is_public_key(key.text().encode() + b"\n")
