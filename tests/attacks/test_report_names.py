"""Names from an artifact reach the text report: none may keep the report from being written, or
rewrite the lines around it. The real command line, in a subprocess, writing to a pipe and to a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# PROTO 4, SHORT_BINUNICODE module, SHORT_BINUNICODE name, STACK_GLOBAL, STOP: the module name is
# decoded as pickle decodes it (UTF-8 with surrogates passed), so it holds a lone surrogate.
SURROGATE = b"\x80\x04\x8c\x03\xed\xa0\x80\x8c\x01x\x93."
# The same with an escape sequence that would clear the line and a carriage return.
ESCAPES = b"\x80\x04\x8c\x0bos\x1b[2K\rsafe\x8c\x01x\x93."
# A genuine finding in another file: it must be in every report.
SYSTEM = b"\x80\x02cos\nsystem\n."


def _scan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", "scan", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="strict",
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", ["surrogate", "escapes"])
def test_a_hostile_import_name_is_escaped_and_every_report_is_written(tmp_path: Path, name: str) -> None:
    hostile = tmp_path / f"{name}.pkl"
    hostile.write_bytes(SURROGATE if name == "surrogate" else ESCAPES)
    other = tmp_path / "other.pkl"
    other.write_bytes(SYSTEM)
    out = tmp_path / "report.txt"
    for printed, args in ((True, []), (False, ["-o", str(out)])):
        result = _scan(str(hostile), str(other), *args)
        text = result.stdout if printed else out.read_text(encoding="utf-8")
        assert result.returncode == 1, result.stderr
        assert "internal error" not in result.stderr
        assert "dangerous import os.system" in text
        assert f"{hostile}: FINDINGS" in text
        assert "\x1b" not in text and "\r" not in text
        expected = "\\ud800.x" if name == "surrogate" else "os\\x1b[2K\\rsafe.x"
        assert expected in text, text
