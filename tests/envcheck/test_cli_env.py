"""`trainguard env snapshot` and `trainguard env verify`, run as real processes on a copy of a real venv.

Every run gets an environment built here (no PYTHONPATH, LD_PRELOAD or TRAINGUARD_* from outside), so the
risky-variable checks see only what a test puts there.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trainguard.provenance import PublicKey

from .conftest import GOOD_FILES, build_wheel, pip_install, site_packages, venv_python

PYC = f"optim.{sys.implementation.cache_tag}.pyc"
SUMMARY = re.compile(
    r"(?P<verdict>verified|\d+ finding\(s\), \d+ undecided): (?P<files>\d+) files "
    r"\((?P<cached>\d+) unchanged since the last clean check, (?P<hashed>\d+) hashed"
)
ROOT_READS_ALL = pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")


def _environ(home: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home.parent / "user-home"),  # no user site to find, none of the caller's config
        "TRAINGUARD_HOME": str(home),
        "TRAINGUARD_LEDGER": str(home / "ledger.db"),
        **extra,
    }


def _tg(home: Path, *args: str | Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *map(str, args)],
        capture_output=True,
        text=True,
        env=_environ(home, **extra),
        cwd=home.parent,
        timeout=120,
        check=False,
    )


def _out(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


def _summary(stdout: str) -> dict[str, str]:
    match = SUMMARY.search(stdout)
    assert match, stdout
    return match.groupdict()


def _payload(baseline: Path) -> dict[str, Any]:
    envelope = json.loads(baseline.read_text())
    doc: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return doc


@pytest.fixture
def pub(_home: Path) -> Path:
    """A PEM signing key at the default place ($TRAINGUARD_HOME/keys/signing.pem); its public half."""
    done = _tg(_home, "keygen", "--pem", _home / "keys" / "signing.pem")
    assert done.returncode == 0, _out(done)
    return _home / "keys" / "signing.pem.pub"


@pytest.fixture
def ledger(_home: Path) -> Path:
    """The default ledger, created by a first append. A ledger named by TRAINGUARD_LEDGER is never made
    on the fly (no key to make it with), so this one append runs without the variable."""
    env = {k: v for k, v in _environ(_home).items() if k != "TRAINGUARD_LEDGER"}
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "append", "--type", "test.init"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, _out(done)
    return _home / "ledger.db"


@pytest.fixture
def baseline(_home: Path, venv: Path, pub: Path) -> Path:
    """A baseline of the venv, signed with the default key."""
    out = _home.parent / "baseline.json"
    done = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out)
    assert done.returncode == 0, _out(done)
    assert f"baseline written to {out}, signed by sha256:" in done.stdout
    return out


def _events(home: Path, event_type: str | None = None) -> list[dict[str, Any]]:
    args = ["ledger", "show"] + (["--type", event_type] if event_type else [])
    done = _tg(home, *args)
    assert done.returncode == 0, _out(done)
    return [json.loads(line) for line in done.stdout.splitlines()]


def _optim(venv: Path) -> Path:
    return site_packages(venv) / "goodpkg" / "optim.py"


def _flip_update(venv: Path) -> Path:
    """The saboteur's edit: the optimizer step now climbs the loss."""
    optim = _optim(venv)
    optim.write_bytes(optim.read_bytes().replace(b"weight - lr", b"weight + lr"))
    return optim


# A clean environment.


def test_snapshot_then_verify_clean_in_text_and_json(
    _home: Path, venv: Path, baseline: Path, pub: Path
) -> None:
    digest = _payload(baseline)["digest"]
    assert digest.startswith("sha256:")

    text = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub)
    assert text.returncode == 0, _out(text)
    assert f"against baseline {baseline} (signed by sha256:" in text.stdout
    assert _summary(text.stdout)["verdict"] == "verified"
    assert f"environment digest {digest}" in text.stdout

    done = _tg(
        _home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub, "--format", "json"
    )
    assert done.returncode == 0, _out(done)
    report = json.loads(done.stdout)
    assert report["schema_version"] == "1"
    assert report["ok"] is True
    assert report["digest"] == digest and report["baseline_digest"] == digest
    assert report["findings"] == [] and report["undecided"] == []
    assert report["reference"] == "baseline"
    assert report["signer"] == PublicKey.load(pub).key_id
    assert report["prefix"] == os.path.realpath(venv)
    assert report["files"] > 0

    # Without a baseline: the RECORDs are the reference, and the report says what they cannot see.
    records = _tg(_home, "env", "verify", "--prefix", venv)
    assert records.returncode == 0, _out(records)
    assert "its distributions' RECORDs (no baseline)" in records.stdout
    assert "cannot see: without a baseline" in records.stdout


def test_python_form_and_an_explicit_key(_home: Path, venv: Path, tmp_path: Path) -> None:
    key = tmp_path / "ops.pem"
    assert _tg(_home, "keygen", "--pem", key).returncode == 0
    out = tmp_path / "by-python.json"
    python = venv_python(venv)
    snap = _tg(_home, "env", "snapshot", "--python", python, "--key", key, "--out", out, "--format", "json")
    assert snap.returncode == 0, _out(snap)
    written = json.loads(snap.stdout)
    assert written["written"] is True and written["prefix"] == os.path.realpath(venv)
    assert written["digest"] == _payload(out)["digest"]

    targets: list[list[str | Path]] = [["--python", python], ["--prefix", venv]]
    for target in targets:
        done = _tg(
            _home, "env", "verify", *target, "--baseline", out, "--trust", f"{key}.pub", "--format", "json"
        )
        assert done.returncode == 0, _out(done)
        report = json.loads(done.stdout)
        assert report["ok"] is True and report["digest"] == written["digest"]


# Tampers and baselines that do not check out.


def test_edited_file_is_named_with_what_to_do(_home: Path, venv: Path, baseline: Path, pub: Path) -> None:
    optim = os.path.realpath(_flip_update(venv))
    done = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub)
    assert done.returncode == 1, _out(done)
    lines = done.stdout.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith("CRITICAL modified: ")]
    assert lines[at] == f"CRITICAL modified: {optim} [goodpkg]"
    assert "differs from the baseline" in lines[at + 1]
    assert lines[at + 2].strip() == (
        "fix: reinstall it from a trusted index (pip install --force-reinstall --no-deps 'goodpkg==1.0')"
    )
    assert _summary(done.stdout)["verdict"].startswith("1 finding(s)")

    as_json = _tg(
        _home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub, "--format", "json"
    )
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["digest"] != report["baseline_digest"]
    [finding] = report["findings"]
    assert finding["kind"] == "modified" and finding["path"] == optim
    assert finding["severity"] == "critical" and finding["distribution"] == "goodpkg"
    assert finding["message"] and finding["advice"]

    records = _tg(_home, "env", "verify", "--prefix", venv)  # RECORD untouched: seen without a baseline too
    assert records.returncode == 1 and f"modified: {optim}" in records.stdout


def test_baseline_signed_by_an_untrusted_key(_home: Path, venv: Path, baseline: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.pem"
    assert _tg(_home, "keygen", "--pem", stranger).returncode == 0
    done = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", f"{stranger}.pub")
    assert done.returncode == 1, _out(done)
    assert "not signed by a trusted key" in done.stderr
    assert done.stdout == ""


def test_baseline_with_one_payload_byte_changed(_home: Path, venv: Path, baseline: Path, pub: Path) -> None:
    envelope = json.loads(baseline.read_text())
    payload = base64.b64decode(envelope["payload"])
    at = payload.index(b'"created":"') + len(b'"created":"')
    changed = payload[:at] + bytes([payload[at] ^ 1]) + payload[at + 1 :]  # '2' -> '3': still valid JSON
    assert json.loads(changed)["created"] != json.loads(payload)["created"]
    envelope["payload"] = base64.b64encode(changed).decode()
    forged = baseline.with_name("forged.json")
    forged.write_text(json.dumps(envelope))
    done = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", forged, "--trust", pub)
    assert done.returncode == 1, _out(done)
    assert f"baseline {forged} is not signed by a trusted key" in done.stderr


# Usage errors: exit 2, and the message says what is wrong.

USAGE = {
    "trust-without-baseline": (["--prefix", "{venv}", "--trust", "{pub}"], "--trust needs --baseline"),
    "missing-prefix": (["--prefix", "{tmp}/no-such-env"], "no-such-env does not exist"),
    "missing-python": (["--python", "{tmp}/no-such-env/bin/python"], "no-such-env"),
    "python-and-prefix": (["--python", "{venv}/bin/python", "--prefix", "{venv}"], "not allowed with"),
    "missing-baseline": (
        ["--prefix", "{venv}", "--baseline", "{tmp}/no-such.json", "--trust", "{pub}"],
        "cannot read baseline",
    ),
    "baseline-is-a-directory": (
        ["--prefix", "{venv}", "--baseline", "{tmp}", "--trust", "{pub}"],
        "cannot read baseline",
    ),
    "baseline-without-trust": (["--prefix", "{venv}", "--baseline", "{tmp}/b.json"], "no trusted keys"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_verify_usage_errors(_home: Path, venv: Path, pub: Path, tmp_path: Path, case: str) -> None:
    args, message = USAGE[case]
    names = {"venv": str(venv), "pub": str(pub), "tmp": str(tmp_path)}
    done = _tg(_home, "env", "verify", *(arg.format(**names) for arg in args))
    assert done.returncode == 2, _out(done)
    assert message in done.stderr
    assert done.stdout == ""


def test_snapshot_usage_errors(_home: Path, venv: Path, tmp_path: Path) -> None:
    no_key = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", tmp_path / "b.json")
    assert no_key.returncode == 2, _out(no_key)
    assert "keygen --pem" in no_key.stderr
    assert not (tmp_path / "b.json").exists()

    assert _tg(_home, "keygen", "--pem", _home / "keys" / "signing.pem").returncode == 0
    nowhere = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", tmp_path / "no-such-dir" / "b.json")
    assert nowhere.returncode == 2, _out(nowhere)
    assert "cannot write" in nowhere.stderr


@ROOT_READS_ALL
def test_unreadable_baseline_is_a_usage_error(_home: Path, venv: Path, baseline: Path, pub: Path) -> None:
    baseline.chmod(0)
    try:
        done = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub)
    finally:
        baseline.chmod(0o644)
    assert done.returncode == 2, _out(done)
    assert f"cannot read baseline {baseline}" in done.stderr


# Could not decide: exit 3.


@ROOT_READS_ALL
def test_unreadable_file_in_the_environment(_home: Path, venv: Path, baseline: Path, pub: Path) -> None:
    data = site_packages(venv) / "goodpkg" / "data.txt"
    data.chmod(0)
    try:
        done = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub, "--full")
    finally:
        data.chmod(0o644)
    assert done.returncode == 3, _out(done)
    assert f"unreadable: {os.path.realpath(data)}" in done.stdout


def test_bytecode_that_cannot_be_compared(_home: Path, venv: Path, baseline: Path, pub: Path) -> None:
    """Runs as root too: a .pyc whose header matches its source but whose code cannot be decoded."""
    pyc = site_packages(venv) / "goodpkg" / "__pycache__" / PYC
    pyc.write_bytes(pyc.read_bytes()[:16] + b"\xff" * 20)
    verify: list[str | Path] = ["env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub]
    done = _tg(_home, *verify)
    assert done.returncode == 3, _out(done)
    assert f"pyc-undecided: {os.path.realpath(pyc)}" in done.stdout
    assert _summary(done.stdout)["verdict"] == "0 finding(s), 1 undecided"

    skipped = _tg(_home, *verify, "--no-bytecode")
    assert skipped.returncode == 0, _out(skipped)
    assert "cannot see: cached bytecode was not compared with its sources (--no-bytecode)" in skipped.stdout


# Snapshot of an environment that already fails its RECORD check.


def test_snapshot_refuses_a_failing_environment_unless_forced(
    _home: Path, venv: Path, pub: Path, tmp_path: Path
) -> None:
    optim = os.path.realpath(_flip_update(venv))
    out = tmp_path / "b.json"
    refused = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out)
    assert refused.returncode == 1, _out(refused)
    assert f"modified: {optim}" in refused.stdout
    assert "not written: the environment already fails its RECORD check" in refused.stdout
    assert not out.exists()
    assert not list(tmp_path.glob(".b.json.*"))  # no temporary file left either

    as_json = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out, "--format", "json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["written"] is False
    assert not out.exists()

    forced = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out, "--force")
    assert forced.returncode == 0, _out(forced)
    assert f"baseline written to {out}" in forced.stdout
    assert _payload(out)["files"]


def _install_speedups(venv: Path, tmp_path: Path) -> Path:
    """A distribution whose RECORD lists a .pth file with an import line (as some real ones do)."""
    wheel = build_wheel(
        tmp_path, "speedups", "1.0", {"speedups.pth": "import os\n", "speedups_mod.py": "x = 1\n"}
    )
    pip_install(venv, wheel)
    return site_packages(venv) / "speedups.pth"


def test_injection_point_is_accepted_by_the_baseline_and_a_new_one_is_not(
    _home: Path, venv: Path, pub: Path, tmp_path: Path
) -> None:
    pth = _install_speedups(venv, tmp_path)
    out = tmp_path / "b.json"
    snap = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out)
    assert snap.returncode == 0, _out(snap)
    assert f"pth-import: {os.path.realpath(pth)} [speedups]" in snap.stdout
    assert "the injection points above are accepted by this baseline" in snap.stdout

    done = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", out, "--trust", pub)
    assert done.returncode == 0, _out(done)
    assert "accepted (in the baseline): 1 injection point(s)" in done.stdout
    assert f"  pth-import: {os.path.realpath(pth)}" in done.stdout

    later = site_packages(venv) / "zz-later.pth"
    later.write_text("import os; os.system('echo MARKER')\n")
    caught = _tg(_home, "env", "verify", "--prefix", venv, "--baseline", out, "--trust", pub)
    assert caught.returncode == 1, _out(caught)
    assert f"HIGH     pth-import: {os.path.realpath(later)}" in caught.stdout


# The ledger.


def test_snapshot_and_verify_are_recorded_with_the_digest(
    _home: Path, venv: Path, pub: Path, ledger: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b.json"
    snap = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out)
    assert snap.returncode == 0, _out(snap)
    assert "not recorded" not in snap.stderr
    digest = _payload(out)["digest"]
    key_id = PublicKey.load(pub).key_id

    [snapshot] = _events(_home, "env.snapshot")
    assert snapshot["payload"]["digest"] == digest
    assert snapshot["payload"]["written"] is True
    assert snapshot["payload"]["baseline"] == os.path.realpath(out)
    assert snapshot["payload"]["key_id"] == key_id
    assert snapshot["payload"]["prefix"] == os.path.realpath(venv)

    assert _tg(_home, "env", "verify", "--prefix", venv, "--baseline", out, "--trust", pub).returncode == 0
    optim = os.path.realpath(_flip_update(venv))
    assert _tg(_home, "env", "verify", "--prefix", venv, "--baseline", out, "--trust", pub).returncode == 1

    clean, tampered = (event["payload"] for event in _events(_home, "env.verify"))
    assert clean["ok"] is True and clean["digest"] == digest and clean["baseline_digest"] == digest
    assert clean["baseline"] == os.path.realpath(out) and clean["key_id"] == key_id
    assert tampered["ok"] is False and tampered["digest"] != digest and tampered["findings"] == 1
    assert tampered["problems"] == [f"modified {optim}"]

    exported = _tg(_home, "ledger", "export", "-")
    assert exported.returncode == 0, _out(exported)
    assert sum('"type\\":\\"env.' in line for line in exported.stdout.splitlines()) == 3


def test_no_ledger_records_nothing(_home: Path, venv: Path, pub: Path, ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out, "--no-ledger").returncode == 0
    verify: list[str | Path] = [
        "env",
        "verify",
        "--prefix",
        venv,
        "--baseline",
        out,
        "--trust",
        pub,
        "--no-ledger",
    ]
    assert _tg(_home, *verify).returncode == 0
    assert [event["type"] for event in _events(_home)] == ["test.init"]


def test_require_ledger_fails_closed_when_it_cannot_record(_home: Path, venv: Path) -> None:
    """No ledger here (and none made on the fly): a warning, or exit 3 when it is required."""
    warned = _tg(_home, "env", "verify", "--prefix", venv)
    assert warned.returncode == 0, _out(warned)
    assert "env.verify not recorded in the ledger" in warned.stderr
    required = _tg(_home, "env", "verify", "--prefix", venv, "--require-ledger")
    assert required.returncode == 3, _out(required)
    assert "could not record env.verify" in required.stderr


# Quick mode.


def test_quick_mode_takes_unchanged_files_from_the_cache_and_full_hashes_again(
    _home: Path, venv: Path, baseline: Path, pub: Path
) -> None:
    verify: list[str | Path] = ["env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub]
    time.sleep(2.1)  # files changed within two seconds of a check are never cached (racy ctime)
    first = _tg(_home, *verify)
    assert first.returncode == 0, _out(first)
    assert int(_summary(first.stdout)["hashed"]) > 0

    second = _tg(_home, *verify)
    assert second.returncode == 0, _out(second)
    assert "env verify (quick)" in second.stdout
    counts = _summary(second.stdout)
    assert counts["cached"] == counts["files"] and counts["hashed"] == "0"

    full = _tg(_home, *verify, "--full")
    assert full.returncode == 0, _out(full)
    assert "env verify (full)" in full.stdout
    counts = _summary(full.stdout)
    assert counts["cached"] == "0" and counts["hashed"] == counts["files"]

    # An edit that puts size and mtime back is still hashed again (its ctime moved).
    optim = _optim(venv)
    before = optim.stat()
    _flip_update(venv)
    os.utime(optim, ns=(before.st_atime_ns, before.st_mtime_ns))
    caught = _tg(_home, *verify)
    assert caught.returncode == 1, _out(caught)
    assert f"modified: {os.path.realpath(optim)}" in caught.stdout


# --help stays instant.


@pytest.mark.parametrize("command", [["env"], ["env", "verify"], ["env", "snapshot"]])
def test_help_imports_neither_torch_nor_envcheck(_home: Path, command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainguard", *command, "--help"],
        capture_output=True,
        text=True,
        env=_environ(_home),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, _out(done)
    assert "usage: trainguard env" in done.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "trainguard.cli" in imported  # the import log is the one we think it is
    heavy = sorted(
        name
        for name in imported
        if name.partition(".")[0] in {"torch", "numpy", "cryptography"}
        or name.startswith("trainguard.envcheck")
    )
    assert heavy == []


# Regressions.


def test_trust_policy_variable_does_not_break_a_verify_without_baseline(
    _home: Path, venv: Path, pub: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "trust.toml"
    policy.write_text(f'[[trust.key]]\nname = "ops"\npath = "{pub}"\n')
    done = _tg(_home, "env", "verify", "--prefix", venv, TRAINGUARD_TRUST_POLICY=str(policy))
    assert done.returncode == 0, _out(done)


def test_snapshot_refused_only_for_undecided_files_exits_3(
    _home: Path, venv: Path, pub: Path, tmp_path: Path
) -> None:
    _install_speedups(venv, tmp_path)  # an accepted injection point: not a reason to refuse
    pyc = site_packages(venv) / "goodpkg" / "__pycache__" / PYC
    pyc.write_bytes(pyc.read_bytes()[:16] + b"\xff" * 20)
    out = tmp_path / "b.json"
    done = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out)
    assert not out.exists()
    assert "pyc-undecided" in done.stdout
    assert done.returncode == 3, _out(done)


# Entries that cannot be listed or followed.


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("loop", "loop"),  # a link to itself: ELOOP on every stat
        ("evil.dist-info", "evil.dist-info"),  # the same, where distributions are listed
        ("goodpkg/again", "."),  # a directory cycle inside a package
        ("dangling.pth", "nowhere.pth"),
    ],
)
def test_a_symlink_loop_in_site_packages_hides_no_finding(
    _home: Path, venv: Path, baseline: Path, pub: Path, name: str, target: str
) -> None:
    site = site_packages(venv)
    (site / name).symlink_to(target)
    verify: list[str | Path] = ["env", "verify", "--prefix", venv, "--baseline", baseline, "--trust", pub]
    looped = _tg(_home, *verify)
    assert looped.returncode in (1, 3), _out(looped)
    assert os.path.realpath(site / name.split("/")[0]) in looped.stdout or name in looped.stdout, _out(looped)
    _flip_update(venv)
    for args in (verify, ["env", "verify", "--prefix", venv]):
        done = _tg(_home, *args)
        assert done.returncode == 1, _out(done)
        assert "goodpkg/optim.py" in done.stdout, _out(done)


def test_a_snapshot_after_a_clean_check_takes_unchanged_files_from_its_cache(
    _home: Path, venv: Path, pub: Path, tmp_path: Path
) -> None:
    time.sleep(2.1)  # files changed within two seconds of a check are never cached (racy ctime)
    assert _tg(_home, "env", "verify", "--prefix", venv).returncode == 0
    out = tmp_path / "quick.json"
    quick = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", out, "--format", "json")
    assert quick.returncode == 0, _out(quick)
    report = json.loads(quick.stdout)
    # The files the RECORDs vouched for (the standard library has no RECORD: hashed each time).
    assert report["cached"] >= len(GOOD_FILES), report
    full = _tg(
        _home,
        "env",
        "snapshot",
        "--prefix",
        venv,
        "--out",
        tmp_path / "full.json",
        "--full",
        "--format",
        "json",
    )
    assert full.returncode == 0, _out(full)
    assert json.loads(full.stdout)["cached"] == 0
    assert _payload(out)["digest"] == _payload(tmp_path / "full.json")["digest"]
    # A file edited since the clean check is hashed again: the snapshot refuses it.
    _flip_update(venv)
    edited = _tg(_home, "env", "snapshot", "--prefix", venv, "--out", tmp_path / "after.json")
    assert edited.returncode == 1, _out(edited)
    assert "goodpkg/optim.py" in edited.stdout and not (tmp_path / "after.json").exists()
