"""Where a writer's events go, and what a job may send the supervisor: settings and checks, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.errors import KeyFileError, UsageError
from trainguard.ledger import new_event
from trainguard.ledger._events import Actor
from trainguard.relay._destination import check_server_url, server_settings
from trainguard.relay._jobsocket import check_job_event

TOKEN = "tgs_tg_0123abcd_" + "B" * 42 + "A"


@pytest.mark.parametrize(
    "url",
    [
        "https://tg.example",
        "https://tg.example:8443/prefix/",
        "http://127.0.0.1:8750",
        "http://[::1]:1",
        "http://localhost",
    ],
)
def test_urls_that_keep_the_token_safe_are_taken(url: str) -> None:
    check_server_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://10.0.0.5:8750", "refusing plain http to 10.0.0.5"),
        ("http://127.0.0.1.evil.example", "refusing plain http"),  # a name, not a loopback address
        ("http://localhost@evil.example", "no user, query or fragment"),
        ("https://tg.example/?token=x", "no user, query or fragment"),
        ("tg.example", "not a server URL"),
        ("https://tg.example:99999", "not a server URL"),
    ],
)
def test_urls_that_would_expose_the_token_are_refused(url: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        check_server_url(url)
    assert message in caught.value.message


def test_plain_http_elsewhere_needs_an_explicit_opt_in() -> None:
    check_server_url("http://10.0.0.5:8750", allow_http=True)
    environ = {"TRAINGUARD_SERVER": "http://10.0.0.5", "TRAINGUARD_SERVER_TOKEN_FILE": "/t"}
    with pytest.raises(UsageError):
        server_settings(environ=environ)
    settings = server_settings(environ={**environ, "TRAINGUARD_SERVER_ALLOW_HTTP": "1"})
    assert settings is not None and settings.allow_http


def test_no_settings_mean_the_local_ledger_and_half_settings_are_an_error() -> None:
    assert server_settings(environ={}) is None
    with pytest.raises(UsageError, match="needs a job token"):
        server_settings(environ={"TRAINGUARD_SERVER": "https://tg.example"})
    with pytest.raises(UsageError, match="no server"):
        server_settings(environ={"TRAINGUARD_SERVER_TOKEN_FILE": "/t"})


def test_flags_win_over_variables(tmp_path: Path) -> None:
    environ = {"TRAINGUARD_SERVER": "https://a.example", "TRAINGUARD_SERVER_TOKEN_FILE": "/a"}
    settings = server_settings("https://b.example", tmp_path / "b", environ=environ)
    assert settings is not None and (settings.url, settings.token_file) == (
        "https://b.example",
        tmp_path / "b",
    )


def _token_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_token_file_is_read_like_a_private_key(tmp_path: Path) -> None:
    path = _token_file(tmp_path, TOKEN + "\n")
    settings = server_settings("https://tg.example", path, environ={})
    assert settings is not None and settings.token() == TOKEN
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="accessible by other users"):
        settings.token()


def test_a_file_without_a_token_is_refused_without_echoing_it(tmp_path: Path) -> None:
    secret = TOKEN[:-3] + "!!!"
    settings = server_settings("https://tg.example", _token_file(tmp_path, secret), environ={})
    assert settings is not None
    with pytest.raises(UsageError) as caught:
        settings.token()
    assert "does not hold a trainguard server token" in caught.value.message
    assert "B" * 20 not in caught.value.diagnostics()


def test_a_fifo_in_place_of_the_token_file_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    settings = server_settings("https://tg.example", path, environ={})
    assert settings is not None
    with pytest.raises(KeyFileError, match="not a regular file"):
        settings.token()


def _me() -> tuple[int, int]:
    return os.getpid(), os.getuid()


def test_a_job_event_of_this_run_from_its_sender_is_taken() -> None:
    event = new_event("monitor.alert", {"check": "update"}, run_id="r1", rank=0)
    pid, uid = _me()
    assert check_job_event(event.canonical(), run_id="r1", sender_pid=pid, sender_uid=uid) == event


@pytest.mark.parametrize(
    ("event_type", "run", "actor_pid", "message"),
    [
        ("run.end", "r1", None, "may not write 'run.end'"),
        ("spool.gap", "r1", None, "may not write"),
        ("monitor.alert", "r2", None, "of run 'r2', not this run"),
        ("monitor.alert", "r1", 1, "claims pid 1"),
    ],
)
def test_a_job_event_the_job_may_not_send_is_refused(
    event_type: str, run: str, actor_pid: int | None, message: str
) -> None:
    pid, uid = _me()
    actor = Actor.current() if actor_pid is None else Actor(user="x", uid=uid, host="h", pid=actor_pid)
    event = new_event(event_type, {}, run_id=run, actor=actor)
    with pytest.raises(ValueError) as caught:
        check_job_event(event.canonical(), run_id="r1", sender_pid=pid, sender_uid=uid)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"\x80\x04K\x01.", b'{"type": "monitor.alert"}', b"{}", b"x" * 70000, b'{"a":1, "a":2}'],
)
def test_junk_in_the_job_socket_is_refused(data: bytes) -> None:
    pid, uid = _me()
    with pytest.raises(ValueError):
        check_job_event(data, run_id="r1", sender_pid=pid, sender_uid=uid)


def test_a_datagram_without_the_kernel_s_word_on_its_sender_is_refused() -> None:
    event = new_event("monitor.alert", {}, run_id="r1")
    with pytest.raises(ValueError, match="did not name the sender"):
        check_job_event(event.canonical(), run_id="r1", sender_pid=None, sender_uid=None)


@pytest.mark.parametrize("command", [["spool", "push"], ["run"]])
def test_help_of_the_reporting_commands_imports_no_room(command: list[str]) -> None:
    code = (
        "import sys; from trainguard.cli import main\n"
        f"try:\n    main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "rooms = ('trainguard.relay', 'trainguard.ledger', 'trainguard.supervisor', 'torch')\n"
        "assert not [m for m in rooms if m in sys.modules], sorted(m for m in rooms if m in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--server" in done.stdout
