"""`trainguard sign` and `env` inside a job report where the job does: through the supervisor when it runs
under `trainguard run --server` (the job holds no token), else straight to the server with the token file.
The guard in a job run without the supervisor (plain torchrun) keeps its own spool and delivery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.relay.conftest import RUN, clean_env, cli, deployment, finish

JOB = str(Path(__file__).with_name("guarded_job.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _signing_job(tmp_path: Path) -> list[str]:
    key, checkpoint = tmp_path / "signing.pem", tmp_path / "model.bin"
    checkpoint.write_bytes(b"weights")
    tg = f"{sys.executable} -m trainguard"
    script = f"{tg} keygen --pem {key} && {tg} sign --key {key} --require-ledger {checkpoint}"
    return ["sh", "-c", script]


def test_a_signing_inside_a_supervised_job_goes_through_the_supervisor(tmp_path: Path) -> None:
    with deployment(tmp_path, None) as d:
        status, _, err = finish(d.run(_signing_job(tmp_path), *d.server_options()))
        assert status == 0, err
        events = d.events()
    signs = [event for event in events if event["type"] == "provenance.sign"]
    assert len(signs) == 1, [event["type"] for event in events]
    assert signs[0]["payload"]["path"] == str((tmp_path / "model.bin").resolve())
    end = next(event for event in events if event["type"] == "run.end")
    assert end["payload"]["job_events"] == 1 and end["payload"]["job_events_refused"] == 0


def test_a_signing_with_the_server_s_variables_reports_to_it(tmp_path: Path) -> None:
    with deployment(tmp_path, None) as d:
        env = {"TRAINGUARD_SERVER": d.server.url, "TRAINGUARD_SERVER_TOKEN_FILE": str(d.token_file)}
        key, checkpoint = tmp_path / "signing.pem", tmp_path / "model.bin"
        checkpoint.write_bytes(b"weights")
        assert cli(d.job_home, "keygen", "--pem", str(key)).returncode == 0
        done = cli(d.job_home, "sign", "--key", str(key), "--require-ledger", str(checkpoint), **env)
        assert done.returncode == 0, done.stderr
        events = d.events()
        # Not written to a local ledger as well.
        assert not (d.job_home / "ledger.db").exists()
    assert [event["type"] for event in events] == ["provenance.sign"]
    assert events[0]["run_id"] == RUN  # the token's run, asked of the server


def test_a_required_event_the_server_cannot_take_fails_the_command(tmp_path: Path) -> None:
    with deployment(tmp_path, None, start=False) as d:
        env = {
            "TRAINGUARD_SERVER": d.server.url,
            "TRAINGUARD_SERVER_TOKEN_FILE": str(d.token_file),
            "TRAINGUARD_RUN_ID": RUN,
        }
        key, checkpoint = tmp_path / "signing.pem", tmp_path / "model.bin"
        checkpoint.write_bytes(b"weights")
        assert cli(d.job_home, "keygen", "--pem", str(key)).returncode == 0
        done = cli(d.job_home, "sign", "--key", str(key), "--require-ledger", str(checkpoint), **env)
        assert done.returncode == 3, done.stderr
        assert "not yet delivered" in done.stderr and "spool push" in done.stderr
        # Without --require-ledger the signing stands, and its event waits in the spool.
        done = cli(d.job_home, "sign", "--key", str(key), str(checkpoint), **env)
        assert done.returncode == 0 and "not yet delivered" in done.stderr, done.stderr
        d.server.start()
        pushed = cli(d.job_home, "spool", "push", "--run", RUN, **env)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        events = d.events()
    # Both signings were spooled (the required one too: it failed the command, not the record).
    assert [event["type"] for event in events] == ["provenance.sign", "provenance.sign"]


@pytest.mark.torch
@pytest.mark.slow
def test_a_guarded_job_under_plain_torchrun_reports_with_its_own_spool(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with deployment(tmp_path, None) as d:
        env = {
            "TRAINGUARD_SERVER": d.server.url,
            "TRAINGUARD_SERVER_TOKEN_FILE": str(d.token_file),
            "TRAINGUARD_RUN_ID": RUN,
        }
        job = subprocess.run(
            [*TORCHRUN, JOB, "--out", str(out), "--steps", "4"],
            capture_output=True,
            text=True,
            env=clean_env(d.job_home, **env),
            timeout=300,
            check=False,
        )
        assert job.returncode == 0, job.stderr
        events = d.events()
    types = [event["type"] for event in events]
    assert types.count("monitor.start") == 1 and types.count("monitor.end") == 1, types
    rows = [
        row[0] for event in events if event["type"] == "monitor.steps" for row in event["payload"]["rows"]
    ]
    assert rows == [1, 2, 3, 4]
    assert json.loads((out / "rank0.json").read_text())["pid"] == events[0]["actor"]["pid"]
