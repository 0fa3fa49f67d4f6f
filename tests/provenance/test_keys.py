"""PEM keys: Ed25519 and ECDSA P-256, key ids, key files on disk and trust policies."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trainguard.errors import KeyFileError, PolicyError, UsageError
from trainguard.provenance import PrivateKey, PublicKey, load_trust_policy

ALGS = ["ed25519", "ecdsa-p256"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("alg", ALGS)
def test_generate_save_load_round_trip(tmp_path: Path, alg: str) -> None:
    key = PrivateKey.generate(alg)
    key.save(tmp_path / "k.pem")
    key.public().save(tmp_path / "k.pub")
    assert _mode(tmp_path / "k.pem") == 0o600
    assert _mode(tmp_path / "k.pub") == 0o644
    loaded = PrivateKey.load(tmp_path / "k.pem")
    public = PublicKey.load(tmp_path / "k.pub")
    assert loaded.alg == public.alg == alg
    assert public == key.public()
    assert public.key_id == key.public().key_id
    assert public.key_id.startswith("sha256:") and len(public.key_id) == 7 + 32
    assert public.name == public.key_id
    assert public.verify(b"message", loaded.sign(b"message"))
    assert not public.verify(b"other", loaded.sign(b"message"))
    assert not public.verify(b"message", b"\x00" * 64)


def test_key_id_is_sha256_of_spki(tmp_path: Path) -> None:
    import hashlib

    key = PrivateKey.generate("ed25519").public()
    assert key.key_id == "sha256:" + hashlib.sha256(key.der()).hexdigest()[:32]


def test_world_readable_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    PrivateKey.generate("ed25519").save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        PrivateKey.load(path)
    assert "chmod 600" in info.value.diagnostics()
    assert "0644" in info.value.message


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    PrivateKey.generate("ed25519").save(path)
    with pytest.raises(KeyFileError, match="already exists"):
        PrivateKey.generate("ed25519").save(path)


def test_missing_and_malformed_keys(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        PrivateKey.load(tmp_path / "nope.pem")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="malformed"):
        PrivateKey.load(bad)
    with pytest.raises(KeyFileError, match="malformed public key"):
        PublicKey.from_pem(b"hello")


def test_private_key_given_as_public_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    PrivateKey.generate("ed25519").save(path)
    with pytest.raises(KeyFileError, match="private key"):
        PublicKey.load(path)


def test_other_curves_and_algorithms_are_refused(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.pem"
    path.write_bytes(
        p384.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="secp384r1"):
        PrivateKey.load(path)
    rsa_pub = rsa.generate_private_key(65537, 2048).public_key()
    pem = rsa_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyFileError, match="unsupported key type"):
        PublicKey.from_pem(pem)
    with pytest.raises(UsageError, match="unknown key algorithm"):
        PrivateKey.generate("rsa")


def test_encrypted_private_key_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "enc.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="encrypted"):
        PrivateKey.load(path)


def test_fifo_key_file_does_not_hang(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "k.pem"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        PrivateKey.load(fifo)


@pytest.mark.parametrize("private", [True, False])
def test_directory_given_as_key_file_is_refused(tmp_path: Path, private: bool) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        (PrivateKey if private else PublicKey).load(tmp_path)


def test_trust_policy_paths_and_inline_pem(tmp_path: Path) -> None:
    alice = PrivateKey.generate("ed25519").public()
    bob = PrivateKey.generate("ecdsa-p256").public()
    (tmp_path / "keys").mkdir()
    alice.save(tmp_path / "keys" / "alice.pub")
    policy = tmp_path / "trust.toml"
    policy.write_text(
        '[[trust.key]]\nname = "alice"\npath = "keys/alice.pub"\n\n'
        f'[[trust.key]]\nname = "bob"\npem = """\n{bob.pem().decode()}"""\n'
    )
    keys = load_trust_policy(policy)
    assert [(k.name, k.key_id) for k in keys] == [("alice", alice.key_id), ("bob", bob.key_id)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[trust]\n",
        '[[trust.key]]\nname = "a"\n',
        '[[trust.key]]\npath = "x.pub"\n',
        '[[trust.key]]\nname = "a"\npath = "missing.pub"\n',
        '[[trust.key]]\nname = "a"\npath = "x"\npem = "y"\n',
        '[[trust.key]]\nname = "a"\nurl = "x"\n',
        "not toml [",
    ],
)
def test_bad_trust_policies(tmp_path: Path, text: str) -> None:
    policy = tmp_path / "trust.toml"
    policy.write_text(text)
    with pytest.raises(PolicyError):
        load_trust_policy(policy)
