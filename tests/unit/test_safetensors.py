"""safetensors headers: what the format allows passes, every other shape of header is named."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from trainguard.findings import Verdict
from trainguard.scan.api import scan_file


def _write(path: Path, header: dict[str, Any], data: bytes) -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


GOOD = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
}


def test_a_valid_header_is_clean(tmp_path: Path) -> None:
    result = scan_file(_write(tmp_path / "m.safetensors", GOOD, bytes(24)))
    assert result.verdict is Verdict.CLEAN, result


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"a": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}}, "unknown dtype"),
        ({"a": {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}}, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, "shape must be"),
        ({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, "shape must be"),
        ({"a": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}, "shape must be"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, "data_offsets must be"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [False, 16]}}, "data_offsets must be"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, "needs 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, "overlaps"),
        ({"b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}, "past the data"),
        ({"__metadata__": {"format": 1}}, "__metadata__ must map strings to strings"),
        ({"c": [1, 2]}, "entry is not an object"),
    ],
)
def test_invalid_headers_are_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    result = scan_file(_write(tmp_path / "m.safetensors", {**GOOD, **change}, bytes(24)))
    assert result.verdict is not Verdict.CLEAN
    assert any(message in f.message for f in result.findings), [f.message for f in result.findings]
