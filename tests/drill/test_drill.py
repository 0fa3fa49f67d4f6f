"""`trainguard drill` as a user runs it: real runs of the job under `trainguard run`, real attacks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from trainguard.drill._attacks import GROUPS, build, select

pytestmark = pytest.mark.torch


def test_attacks_are_chosen_by_name_or_group() -> None:
    attacks = build(2)
    assert {a.group for a in attacks} <= set(GROUPS)
    assert [a.name for a in select(attacks, ["d"])] == ["sigterm-rank", "sigkill-rank"]
    assert [a.name for a in select(attacks, ["flip-one-rank", "f"])] == [
        "flip-one-rank",
        "ledger-row-edited",
        "ledger-truncated",
        "ledger-rolled-back",
    ]
    with pytest.raises(ValueError, match="no attack or group 'z'"):
        select(attacks, ["z"])


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _site_packages_state() -> dict[str, tuple[int, int, int]]:
    """Size, mtime and inode of every file of the real environment's site-packages: a file edited
    through a hard link, or replaced, shows here (hashing all of torch would take a minute)."""
    state = {}
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                info = path.stat()
                state[str(path)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return state


# A short drill for CI: one attack of each kind of play, and the clean run.
SHORT = [
    "checkpoint-payload-signed",
    "flip-one-rank",
    "lr-negated-one-rank",
    "torch-optimizer-edited",
    "sigterm-rank",
    "weight-altered",
    "checkpoint-swapped",
    "ledger-row-edited",
]


def test_a_short_drill_catches_every_attack_and_touches_nothing_of_the_user(tmp_path: Path) -> None:
    # The user's own home (ledger, keys), a run folder with checkpoints where the drill is started,
    # and the Python environment it runs in: none may change, byte for byte.
    home = tmp_path / "user-home"
    (home / "keys").mkdir(parents=True)
    (home / "ledger.db").write_bytes(b"the user's own ledger")
    (home / "keys" / "signing.pem").write_bytes(b"the user's own key")
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    (work / "ckpt" / "step-0005.pt").write_bytes(b"the user's own checkpoint")
    before = _tree_digest(home), _tree_digest(work / "ckpt")
    environment = _site_packages_state()
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "drill",
            "--steps",
            "16",
            "--out",
            str(out),
            "--attacks",
            *SHORT,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TRAINGUARD_HOME": str(home)},
        cwd=work,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-8000:]
    report = json.loads((out / "drill.json").read_text())
    assert report["schema_version"] == "1" and report["ok"] is True
    assert report["clean_run"]["false_alarms"] == []
    by_name = {a["name"]: a for a in report["attacks"]}
    assert sorted(by_name) == sorted(SHORT)
    assert all(a["caught"] for a in report["attacks"]), report["attacks"]
    assert by_name["flip-one-rank"]["named"] == "rank(s) 1"
    assert by_name["flip-one-rank"]["evidence"]["inclusion_proof_verified"] is True
    # No code patched: the replicas' fingerprints disagree at the very step it acts.
    assert by_name["lr-negated-one-rank"]["detected_by"] == "monitor: fingerprint"
    assert by_name["lr-negated-one-rank"]["steps_to_detection"] == 0
    assert "sender pid" in by_name["sigterm-rank"]["named"]
    assert "TRAINGUARD-DRILL-PAYLOAD-RAN" not in done.stdout + done.stderr
    assert f"{len(SHORT)} of {len(SHORT)} attacks caught, 0 false alarm(s)" in done.stdout
    assert (_tree_digest(home), _tree_digest(work / "ckpt")) == before
    after = _site_packages_state()
    changed = sorted(
        path for path in environment.keys() | after.keys() if environment.get(path) != after.get(path)
    )
    assert not changed, changed[:20]


def test_an_alert_only_check_in_the_clean_run_is_shown_but_is_no_false_alarm(tmp_path: Path) -> None:
    # data_wait and spike alert without stopping (legitimate causes exist): on a loaded machine the clean
    # run may raise one. It is listed; a stopping alert is a false alarm and fails the drill.
    from trainguard.drill._drill import DrillResult, _clean_alerts, _false_alarms
    from trainguard.drill._runs import RunRecord

    def alert(check: str, action: str) -> tuple[int, str, int | None, dict[str, object]]:
        return (7, "monitor.alert", 0, {"check": check, "step": 6, "message": "slow", "action": action})

    ranks = [{"rank": 0, "finished": True}, {"rank": 1, "finished": True}]
    noisy = RunRecord("clean", tmp_path, 0, "", ranks, {}, [alert("data_wait", "alert")], 1.0)
    assert _false_alarms(noisy, None) == []
    assert _clean_alerts(noisy, stopping=False) == ["data_wait at step 6: slow"]
    result = DrillResult(2, 10, "cpu", noisy, [], [], 1.0, None, _clean_alerts(noisy, stopping=False))
    assert result.ok
    assert result.tally() == (
        "0 of 0 attacks caught, 0 false alarm(s) in the clean run (1 alert(s) of alert-only checks)"
    )
    assert result.to_json()["clean_run"]["alerts_of_alert_only_checks"] == ["data_wait at step 6: slow"]
    stopped = RunRecord("clean", tmp_path, 1, "stopped", ranks, {}, [alert("fingerprint", "stop")], 1.0)
    assert _false_alarms(stopped, None)[0] == "fingerprint at step 6: slow"
