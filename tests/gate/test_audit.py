"""`ckpt audit` and the ledger events of sign and verify, through the command handlers (in process)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from trainguard.gate._audit import audit
from trainguard.gate._commands import (
    cmd_ckpt_audit,
    cmd_keygen_pem,
    cmd_sign,
    cmd_verify,
    default_signing_key,
)
from trainguard.gate._events import EVENT_SIGN, EVENT_VERIFY
from trainguard.ledger import Ledger
from trainguard.provenance import PrivateKey, PublicKey, sign_path


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    for name in (
        "TRAINGUARD_LEDGER",
        "TRAINGUARD_LEDGER_KEY",
        "TRAINGUARD_SIGNING_KEY",
        "TRAINGUARD_TRUST_POLICY",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def public(home: Path) -> Path:
    assert cmd_keygen_pem(argparse.Namespace(out=default_signing_key(), alg="ed25519")) == 0
    return Path(str(default_signing_key()) + ".pub")


def _sign(path: Path, **kw: object) -> int:
    args: dict[str, object] = {
        "path": path,
        "key": None,
        "format": "trainguard",
        "out": None,
        "shard_size": None,
        "jobs": None,
    }
    args.update({"no_ledger": False, **kw})
    return cmd_sign(argparse.Namespace(**args))


def _verify(path: Path, public: Path, **kw: object) -> int:
    args: dict[str, object] = {
        "path": path,
        "trust": [str(public)],
        "trust_policy": None,
        "signature": None,
        "full": False,
    }
    args.update({"format": "json", "no_ledger": False, **kw})
    return cmd_verify(argparse.Namespace(**args))


def _checkpoint(parent: Path, name: str) -> Path:
    ckpt = parent / name
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    (ckpt / "config.json").write_text('{"step": 1}')
    return ckpt


def _events(kind: str) -> list[dict[str, object]]:
    with Ledger.open() as ledger:
        return [dict(event.payload) for _, event in ledger.entries() if event.type == kind]


def test_sign_and_verify_are_ledger_events(
    tmp_path: Path, public: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path / "runs", "step-1")
    assert _sign(ckpt) == 0
    assert _verify(ckpt, public) == 0
    (ckpt / "config.json").write_text('{"step": 2}')
    assert _verify(ckpt, public) == 1
    out = capsys.readouterr().out
    assert "modified: config.json" in out

    key_id = PublicKey.load(public).key_id
    [signing] = _events(EVENT_SIGN)
    assert signing["path"] == os.path.realpath(ckpt) and signing["ok"] is True
    assert signing["key_id"] == key_id and signing["files"] == 2 and signing["kind"] == "directory"
    assert signing["bytes"] == 4096 + len('{"step": 1}')
    assert str(signing["root"]).startswith("sha256:")
    good, bad = _events(EVENT_VERIFY)
    assert good["ok"] is True and good["root"] == signing["root"] and good["problems"] == []
    assert bad["ok"] is False and bad["key_id"] == key_id
    assert any("modified: config.json" in p for p in bad["problems"])  # type: ignore[attr-defined]


def test_no_ledger_records_nothing(tmp_path: Path, public: Path) -> None:
    ckpt = _checkpoint(tmp_path, "c")
    assert _sign(ckpt, no_ledger=True) == 0
    assert not (Path(os.environ["TRAINGUARD_HOME"]) / "ledger.db").exists()


def test_a_broken_ledger_warns_but_never_blocks_signing(
    tmp_path: Path, public: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAINGUARD_LEDGER", str(tmp_path / "no-such-dir" / "ledger.db"))
    ckpt = _checkpoint(tmp_path, "c")
    assert _sign(ckpt) == 0
    assert "not recorded in the ledger" in capsys.readouterr().err


def test_audit_reports_altered_missing_unsigned_and_ok(
    tmp_path: Path, public: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    good = _checkpoint(runs, "good")
    altered = _checkpoint(runs, "altered")
    deleted = _checkpoint(runs, "deleted")
    single = runs / "loose" / "epoch3.pt"
    single.parent.mkdir()
    single.write_bytes(b"weights")
    for ckpt in (good, altered, deleted, single):
        assert _sign(ckpt) == 0
    _checkpoint(runs, "never-signed")
    stray = runs / "loose" / "epoch4.pt"
    stray.write_bytes(b"other weights")
    (altered / "model.safetensors").write_bytes(os.urandom(4096))
    for child in deleted.iterdir():
        child.unlink()
    deleted.rmdir()
    capsys.readouterr()

    args = argparse.Namespace(paths=[runs], trust=[str(public)], trust_policy=None, format="json")
    assert cmd_ckpt_audit(args) == 1
    report = json.loads(capsys.readouterr().out)
    status = {Path(item["path"]).name: item["status"] for item in report["checkpoints"]}
    assert status == {
        "good": "ok",
        "altered": "altered",
        "deleted": "missing",
        "epoch3.pt": "ok",
        "never-signed": "unsigned",
        "epoch4.pt": "unsigned",
    }
    details = {Path(item["path"]).name: item["details"] for item in report["checkpoints"]}
    assert details["altered"] == ["modified: model.safetensors (content differs)"]
    assert report["counts"] == {"altered": 1, "missing": 1, "unsigned": 2, "undecided": 0, "ok": 2}

    args.format = "text"
    assert cmd_ckpt_audit(args) == 1
    text = capsys.readouterr().out
    assert f"MISSING (DELETED): {os.path.realpath(deleted)}" in text
    assert "ALTERED" in text and "UNSIGNED" in text


def test_audit_without_trusted_keys_uses_the_ledger_roots(tmp_path: Path, public: Path) -> None:
    runs = tmp_path / "runs"
    good = _checkpoint(runs, "good")
    resigned = _checkpoint(runs, "resigned")
    assert _sign(good) == 0 and _sign(resigned) == 0
    # Changed and re-signed with some other key, without the ledger: the ledger's root no longer matches.
    (resigned / "config.json").write_text('{"step": 666}')
    sign_path(resigned, PrivateKey.generate("ed25519"))
    with Ledger.open() as ledger:
        report = audit([runs], ledger, [])
    status = {Path(item.path).name: item for item in report.items}
    assert status["good"].status == "ok"
    assert status["resigned"].status == "altered"
    assert "ledger recorded" in status["resigned"].details[0]
    assert report.exit_code == 1


def test_audit_of_signature_by_an_untrusted_key_is_altered(tmp_path: Path, public: Path) -> None:
    runs = tmp_path / "runs"
    ckpt = _checkpoint(runs, "c")
    assert _sign(ckpt) == 0
    stranger = PrivateKey.generate("ecdsa-p256").public()
    with Ledger.open() as ledger:
        report = audit([runs], ledger, [stranger])
    [item] = report.items
    assert item.status == "altered" and "no trusted key" in item.details[0]


def test_a_signature_file_unknown_to_the_ledger_is_unsigned(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    ckpt = _checkpoint(runs, "c")
    sign_path(ckpt, PrivateKey.generate("ed25519"))
    report = audit([runs], None, [])
    [item] = report.items
    assert item.status == "unsigned" and "no signing" in item.details[0]


def test_audit_of_an_empty_folder_is_clean(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    args = argparse.Namespace(paths=[tmp_path / "empty"], trust=[], trust_policy=None, format="text")
    assert cmd_ckpt_audit(args) == 0
    assert not (tmp_path / "home" / "ledger.db").exists()  # reading did not create a ledger
