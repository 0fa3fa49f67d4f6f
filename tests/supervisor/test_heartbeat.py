"""The heartbeat datagrams: JSON of one exact shape, at most 4 KiB, refused otherwise; a sender that
never raises into the training job."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainguard.monitor._heartbeat import (
    ENV_SOCKET,
    MAX_DATAGRAM,
    HeartbeatSender,
    encode_datagram,
    parse_datagram,
)


@pytest.fixture
def receiver() -> Iterator[tuple[str, socket.socket]]:
    folder = tempfile.mkdtemp(prefix="tg-hb-")  # short: AF_UNIX paths are limited to 107 bytes
    path = str(Path(folder) / "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield path, sock
    sock.close()
    Path(path).unlink()
    Path(folder).rmdir()


def test_a_datagram_round_trips() -> None:
    datagram = parse_datagram(encode_datagram("signal", 3, 57, {"signal": 15, "name": "SIGTERM"}))
    assert (datagram.kind, datagram.rank, datagram.step, datagram.pid) == ("signal", 3, 57, os.getpid())
    assert datagram.payload == {"signal": 15, "name": "SIGTERM"}


GOOD = {"v": 1, "kind": "beat", "rank": 0, "pid": 4242, "step": 1, "time": 1767225600.5, "payload": {}}


def test_the_good_one_is_good() -> None:
    assert parse_datagram(json.dumps(GOOD).encode()).pid == 4242


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04K\x01.",
        b"[]",
        json.dumps({**GOOD, "extra": 1}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "step"}).encode(),
        json.dumps({**GOOD, "v": 2}).encode(),
        json.dumps({**GOOD, "v": True}).encode(),
        json.dumps({**GOOD, "kind": "exec"}).encode(),
        json.dumps({**GOOD, "rank": True}).encode(),
        json.dumps({**GOOD, "rank": -1}).encode(),
        json.dumps({**GOOD, "pid": "1"}).encode(),
        json.dumps({**GOOD, "payload": []}).encode(),
        json.dumps({**GOOD, "time": "now"}).encode(),
        json.dumps(GOOD).replace('"time":', '"time": NaN, "x":').encode(),
        json.dumps(GOOD)[:-1].encode() + b', "rank": 2}',  # a duplicate key
        json.dumps({**GOOD, "payload": {"x": "a" * MAX_DATAGRAM}}).encode(),
        b"\xff\xfe",
    ],
    ids=[
        "pickle",
        "array",
        "extra-key",
        "missing-key",
        "version-2",
        "version-true",
        "unknown-kind",
        "bool-rank",
        "negative-rank",
        "string-pid",
        "list-payload",
        "string-time",
        "nan",
        "duplicate-key",
        "too-long",
        "not-utf8",
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_datagram(data)


def test_large_payloads_are_cut_to_fit() -> None:
    data = encode_datagram("signal", 0, 0, {"sender_cmdline": "x" * 100_000})
    assert len(data) <= MAX_DATAGRAM
    assert parse_datagram(data).payload["sender_cmdline"] != "x" * 100_000
    many = encode_datagram("signal", 0, 0, {f"k{i}": "y" * 1000 for i in range(10)})
    assert parse_datagram(many).payload == {"truncated": True}
    not_json = encode_datagram("signal", 0, 0, {"x": object()})
    assert parse_datagram(not_json).payload == {"truncated": True}


def test_the_sender_beats_with_its_step_and_says_bye(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    sender = HeartbeatSender(path, 5, interval=0.01)
    first = parse_datagram(sock.recv(MAX_DATAGRAM))
    assert (first.kind, first.rank, first.step) == ("beat", 5, 0)
    sender.set_step(42)
    while (beat := parse_datagram(sock.recv(MAX_DATAGRAM))).step != 42:
        assert beat.kind == "beat"
    sender.send("signal", {"signal": 15})
    sender.close()
    sender.close()
    kinds = []
    sock.settimeout(0.5)
    try:
        while True:
            kinds.append(parse_datagram(sock.recv(MAX_DATAGRAM)).kind)
    except TimeoutError:
        pass
    assert "signal" in kinds and kinds[-1] == "bye" and kinds.count("bye") == 1


def test_a_gone_supervisor_is_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trainguard")
    sender = HeartbeatSender(str(tmp_path / "nobody"), 0, interval=0.01)
    for _ in range(5):
        sender.send("signal", {"signal": 15})
    sender.close()
    warnings = [r for r in caplog.records if "heartbeats to the supervisor" in r.getMessage()]
    assert len(warnings) == 1


def test_no_supervisor_no_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_SOCKET, raising=False)
    assert HeartbeatSender.from_environment(0) is None
