"""`trainguard keygen --pem`, `sign`, `verify` and `ckpt audit`, run as real processes."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trainguard.gate._cache import CACHE_NAME
from trainguard.provenance import UnreadableTree


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRAINGUARD_HOME": str(home)}
    for name in (
        "TRAINGUARD_LEDGER",
        "TRAINGUARD_LEDGER_KEY",
        "TRAINGUARD_SIGNING_KEY",
        "TRAINGUARD_TRUST_POLICY",
    ):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        errors="replace",  # file names that are not UTF-8 are printed as their bytes
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    done = _run(home, "keygen", "--pem", str(home / "keys" / "signing.pem"))
    assert done.returncode == 0, done.stderr
    return home


def _public(home: Path) -> str:
    return str(home / "keys" / "signing.pem.pub")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    ckpt = tmp_path / "runs" / "step-100"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (ckpt / "config.json").write_text('{"layers": 2}')
    # The cache keeps only files whose last change is older than its racy window (2 s).
    time.sleep(2.1)
    return ckpt


def _verify_json(home: Path, ckpt: Path, *extra: str) -> tuple[int, dict[str, object]]:
    done = _run(home, "verify", str(ckpt), "--trust", _public(home), "--format", "json", *extra)
    return done.returncode, json.loads(done.stdout)


def test_sign_then_reverify_from_the_cache_then_detect_a_stealthy_rewrite(home: Path, ckpt: Path) -> None:
    signed = _run(home, "sign", str(ckpt))
    assert signed.returncode == 0, signed.stderr
    assert (ckpt / ".trainguard.sig").is_file()

    code, report = _verify_json(home, ckpt)
    assert code == 0 and report["ok"] is True
    assert report["cache"] == {"hits": 2, "misses": 0, "rejected": 0, "stale": 0, "skipped": 0, "errors": 0}
    assert report["signer"]["key_id"] in signed.stdout  # type: ignore[index]

    code, report = _verify_json(home, ckpt, "--full")
    assert code == 0 and report["cache"] is None

    # Same size, mtime put back: only the ctime betrays the change, and it is part of the cache key.
    target = ckpt / "model.safetensors"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[12345] ^= 1
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    done = _run(home, "verify", str(ckpt), "--trust", _public(home))
    assert done.returncode == 1
    assert "modified: model.safetensors" in done.stdout
    assert "signed by sha256:" in done.stdout


def test_a_tampered_cache_row_is_ignored(home: Path, ckpt: Path) -> None:
    assert _run(home, "sign", str(ckpt)).returncode == 0
    target = ckpt / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[0] ^= 1
    target.write_bytes(bytes(data))
    st = target.stat()
    with sqlite3.connect(home / CACHE_NAME) as db:
        db.execute(
            "UPDATE digests SET stat = ? WHERE path = ?",
            (
                f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}",
                os.fsencode(os.path.realpath(target)),
            ),
        )
    db.close()
    code, report = _verify_json(home, ckpt)
    assert code == 1
    assert report["cache"]["rejected"] == 1  # type: ignore[index]
    assert any("model.safetensors" in p for p in report["problems"])  # type: ignore[attr-defined]


def test_exit_codes_for_usage_and_trust_errors(home: Path, ckpt: Path, tmp_path: Path) -> None:
    missing_key = _run(tmp_path / "other-home", "sign", str(ckpt))
    assert missing_key.returncode == 2
    assert "keygen --pem" in missing_key.stderr

    assert _run(home, "sign", str(ckpt)).returncode == 0
    no_trust = _run(home, "verify", str(ckpt))
    assert no_trust.returncode == 2 and "--trust" in no_trust.stderr

    stranger = tmp_path / "stranger.pem"
    assert _run(home, "keygen", "--pem", "--alg", "ecdsa-p256", str(stranger)).returncode == 0
    untrusted = _run(home, "verify", str(ckpt), "--trust", f"{stranger}.pub")
    assert untrusted.returncode == 1
    assert "no trusted key" in untrusted.stdout

    unsigned = tmp_path / "unsigned"
    unsigned.mkdir()
    (unsigned / "a.pt").write_bytes(b"x")
    not_signed = _run(home, "verify", str(unsigned), "--trust", _public(home))
    assert not_signed.returncode == 1 and "not signed" in not_signed.stdout


def test_keygen_without_a_file_makes_the_default_signing_key(tmp_path: Path, ckpt: Path) -> None:
    home = tmp_path / "fresh-home"
    made = _run(home, "keygen")
    assert made.returncode == 0, made.stderr
    assert (home / "keys" / "signing.pem").stat().st_mode & 0o777 == 0o600
    assert f"trust it with: trainguard verify --trust {_public(home)}" in made.stderr
    assert _run(home, "sign", str(ckpt)).returncode == 0  # no --key: the default one
    assert _run(home, "verify", str(ckpt), "--trust", _public(home)).returncode == 0
    again = _run(home, "keygen")
    assert again.returncode != 0 and "never overwritten" in again.stderr
    assert _run(home, "keygen", "--witness").returncode == 2


def test_a_public_key_given_to_sign_is_named_as_one(home: Path, ckpt: Path) -> None:
    done = _run(home, "sign", str(ckpt), "--key", _public(home))
    assert done.returncode != 0
    assert f"{_public(home)} is a public key, but a private key is needed to sign" in done.stderr
    assert "chmod" not in done.stderr
    assert str(home / "keys" / "signing.pem") in done.stderr  # the private key it came from


def test_trust_policy_names_the_signer(home: Path, ckpt: Path, tmp_path: Path) -> None:
    assert _run(home, "sign", str(ckpt)).returncode == 0
    policy = tmp_path / "trust.toml"
    policy.write_text(f'[[trust.key]]\nname = "release-bot"\npath = "{_public(home)}"\n')
    done = _run(home, "verify", str(ckpt), "--trust-policy", str(policy))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "signed by release-bot (sha256:" in done.stdout


def test_oms_bundle_round_trip(home: Path, ckpt: Path, tmp_path: Path) -> None:
    key = tmp_path / "oms.pem"
    assert _run(home, "keygen", "--pem", "--alg", "ecdsa-p256", str(key)).returncode == 0
    bundle = tmp_path / "model.sig"
    signed = _run(home, "sign", str(ckpt), "--format", "oms", "--key", str(key), "--out", str(bundle))
    assert signed.returncode == 0, signed.stderr
    assert json.loads(bundle.read_text())["mediaType"].startswith("application/vnd.dev.sigstore.bundle")
    code, report = _verify_json(home, ckpt, "--signature", str(bundle), "--trust", f"{key}.pub")
    assert code == 0 and report["format"] == "oms", report
    (ckpt / "extra.bin").write_bytes(b"added")
    code, report = _verify_json(home, ckpt, "--signature", str(bundle), "--trust", f"{key}.pub")
    assert code == 1 and any("added: extra.bin" in p for p in report["problems"])  # type: ignore[attr-defined]


def test_a_directory_swapped_for_an_older_signed_one_fails_verification(home: Path, ckpt: Path) -> None:
    newer = ckpt.parent / "step-200"
    shutil.copytree(ckpt, newer)
    (newer / "model.safetensors").write_bytes(os.urandom(1 << 20))
    for folder in (ckpt, newer):
        assert _run(home, "sign", str(folder)).returncode == 0
    assert _run(home, "verify", str(newer), "--trust", _public(home)).returncode == 0
    shutil.rmtree(newer)
    shutil.copytree(ckpt, newer)
    done = _run(home, "verify", str(newer), "--trust", _public(home))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "signed as 'step-100', checked as 'step-200'" in done.stdout
    audit = _run(home, "ckpt", "audit", str(ckpt.parent), "--trust", _public(home), "--format", "json")
    statuses = {Path(c["path"]).name: c["status"] for c in json.loads(audit.stdout)["checkpoints"]}
    assert statuses == {"step-100": "ok", "step-200": "altered"}


def test_an_oms_signed_directory_is_bound_to_its_name(home: Path, ckpt: Path, tmp_path: Path) -> None:
    key = tmp_path / "oms.pem"
    assert _run(home, "keygen", "--pem", "--alg", "ecdsa-p256", str(key)).returncode == 0
    bundle = tmp_path / "model.sig"
    signed = _run(home, "sign", str(ckpt), "--format", "oms", "--key", str(key), "--out", str(bundle))
    assert signed.returncode == 0, signed.stderr
    elsewhere = ckpt.parent / "step-200"
    shutil.copytree(ckpt, elsewhere)
    code, report = _verify_json(home, elsewhere, "--signature", str(bundle), "--trust", f"{key}.pub")
    assert code == 1, report
    assert any("signed as 'step-100'" in p for p in report["problems"])  # type: ignore[attr-defined]


def test_ckpt_audit_and_the_ledger(home: Path, ckpt: Path) -> None:
    assert _run(home, "sign", str(ckpt)).returncode == 0
    runs = ckpt.parent
    clean = _run(home, "ckpt", "audit", str(runs), "--trust", _public(home))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "1 ok" in clean.stdout
    (runs / "rogue.pt").write_bytes(b"never signed")
    found = _run(home, "ckpt", "audit", str(runs), "--format", "json")
    assert found.returncode == 1
    statuses = {Path(c["path"]).name: c["status"] for c in json.loads(found.stdout)["checkpoints"]}
    assert statuses == {"step-100": "ok", "rogue.pt": "unsigned"}
    shown = _run(home, "ledger", "show", "--type", "provenance.sign")
    [event] = [json.loads(line) for line in shown.stdout.splitlines()]
    assert event["payload"]["path"] == os.path.realpath(ckpt)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_undecided(home: Path, ckpt: Path) -> None:
    assert _run(home, "sign", str(ckpt)).returncode == 0
    target = ckpt / "model.safetensors"
    target.chmod(0)
    try:
        done = _run(home, "verify", str(ckpt), "--trust", _public(home), "--full")
    finally:
        target.chmod(0o644)
    assert done.returncode == 3, done.stdout + done.stderr


def _verify_events(home: Path) -> list[dict[str, Any]]:
    shown = _run(home, "ledger", "show", "--type", "provenance.verify")
    assert shown.returncode == 0, shown.stderr
    return [json.loads(line)["payload"] for line in shown.stdout.splitlines()]


def test_every_verification_outcome_is_recorded_whatever_the_file_names(
    home: Path, ckpt: Path, tmp_path: Path
) -> None:
    assert _run(home, "sign", str(ckpt)).returncode == 0
    # A file whose name is not UTF-8 put in the checkpoint: the failure names it, and is recorded.
    (ckpt / os.fsdecode(b"\xff.bin")).write_bytes(b"planted")
    done = _run(home, "verify", str(ckpt), "--trust", _public(home))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not recorded" not in done.stderr, done.stderr
    # A directory whose own name is not UTF-8.
    odd = tmp_path / os.fsdecode(b"ck\xfe")
    odd.mkdir()
    assert _run(home, "verify", str(odd), "--trust", _public(home)).returncode == 1
    events = _verify_events(home)
    assert [event["ok"] for event in events] == [False, False]
    assert "\\xff.bin" in events[0]["problems"][0]
    assert events[1]["path"].endswith("ck\\xfe")


def test_an_undecided_verification_is_recorded(
    home: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process, so that it runs as root too: the file read fails as an unreadable file's would.
    from trainguard import cli
    from trainguard.provenance import _signature

    assert _run(home, "sign", str(ckpt)).returncode == 0

    def unreadable(path: Path, **_: object) -> None:
        raise UnreadableTree(path / "model.safetensors", "cannot be read: Permission denied")

    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    monkeypatch.setattr(_signature, "build_manifest", unreadable)
    assert cli.main(["verify", str(ckpt), "--trust", _public(home), "--full"]) == 3
    assert "Permission denied" in capsys.readouterr().err
    [event] = _verify_events(home)
    assert event["ok"] is False and event["problems"][0].startswith("undecided: ")


def test_a_fifo_in_place_of_the_signature_fails_at_once(home: Path, ckpt: Path) -> None:
    # A plain open() of a FIFO blocks until a writer comes: verify must refuse it, not hang.
    assert _run(home, "sign", str(ckpt)).returncode == 0
    signature = ckpt / ".trainguard.sig"
    signature.unlink()
    os.mkfifo(signature)
    done = _run(home, "verify", str(ckpt), "--trust", _public(home))  # _run's timeout fails a hang
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not a regular file" in done.stdout
