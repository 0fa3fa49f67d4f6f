"""The scanner's model of a pickled NumPy dtype must match what NumPy itself builds.

joblib.load reads `count * itemsize` raw bytes after each array header (or a nested pickle when the
dtype holds objects) and then goes on unpickling. The scanner skips the same bytes using its own
reading of the pickled dtype; any disagreement lets a file show the scanner one opcode stream and
joblib another.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest

from trainguard._pickle.machine import Machine
from trainguard.findings import Verdict
from trainguard.scan import scan_file
from trainguard.scan.formats.dtypes import pickled_numpy_dtype

np = pytest.importorskip("numpy")


class _DtypeWithState:
    """Pickles as numpy.dtype(*args) followed by BUILD with `state`, whatever NumPy would write."""

    def __init__(self, args: tuple[Any, ...], state: tuple[Any, ...]) -> None:
        self.args = args
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.dtype, self.args, self.state)


def _variants() -> list[Any]:
    cases = []
    for spec in ["i8", "f4", "f2", "c16", "u1", "?", "M8[ns]", "m8[s]", "U5", "S3", "V8", "O"]:
        dtype = np.dtype(spec)
        _, args, state = dtype.__reduce__()
        cases.append(pytest.param(args, state, id=f"{spec}-as-written"))
        for elsize in (0, 3, 4, 12):
            changed = (*state[:5], elsize, *state[6:])
            cases.append(pytest.param(args, changed, id=f"{spec}-elsize-{elsize}"))
        for flags in (0, 1):
            changed = (*state[:7], flags, *state[8:])
            cases.append(pytest.param(args, changed, id=f"{spec}-flags-{flags}"))
        # Below state version 3 NumPy rebuilds the flags: any non-zero value means objects.
        for version, flags in ((2, 8), (2, 1), (2, 0), (1, 16), (4, 8), (4, 1)):
            changed = (version, *state[1:7], flags, *state[8:])
            cases.append(pytest.param(args, changed, id=f"{spec}-version-{version}-flags-{flags}"))
    return cases


@pytest.mark.parametrize(("args", "state"), _variants())
def test_pickled_dtype_matches_numpy(args: tuple[Any, ...], state: tuple[Any, ...]) -> None:
    data = pickle.dumps(_DtypeWithState(args, state), protocol=4)
    try:
        real = pickle.loads(data)
    except (ValueError, TypeError):
        real = None  # NumPy refuses this state: joblib.load stops here too
    result = Machine(data).run()
    assert result.error is None
    model = pickled_numpy_dtype(result.value)
    if model is None or real is None:
        return  # the scanner gives up (the file ends undecided) or NumPy does: nothing to disagree about
    assert model == (real.itemsize, real.hasobject), (model, real, real.itemsize, real.hasobject)


def _joblib_array_with_lying_itemsize(path: Path) -> None:
    """An int64 array whose pickled dtype state claims 4-byte items: NumPy ignores that.

    Before 9380615 the scanner believed it: it skipped 4 x 4 bytes, read a STOP and then a BINBYTES8
    that swallowed the rest and called the file clean, while joblib skips 4 x 8 bytes and runs the
    opcodes hidden in that BINBYTES8 payload.
    """
    joblib = pytest.importorskip("joblib")
    buf = io.BytesIO()
    joblib.dump(np.arange(4, dtype=np.int64), buf)
    data = buf.getvalue()
    state = (
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"  # names, fields, subarray, elsize, alignment, flags
    )
    assert data.count(state) == 1
    data = data.replace(state, b"NNNJ\x04\x00\x00\x00J\xff\xff\xff\xffK\x00t")
    head = (
        data[: data.rindex(b"ub") + 2] + b"\x03\xff\xff\xff"
    )  # the wrapper's BUILD, then 3 bytes of padding
    hidden = b"cbuiltins\nprint\n(S'joblib.load ran this'\ntR."
    region = bytes(16) + b"." + b"\x8e" + struct.pack("<Q", 6 + len(hidden)) + bytes(6)
    assert len(region) == 4 * 8
    path.write_bytes(head + region + hidden + b".")


def test_joblib_array_with_lying_itemsize_is_not_clean(tmp_path: Path) -> None:
    path = tmp_path / "lying-itemsize.joblib"
    _joblib_array_with_lying_itemsize(path)
    result = scan_file(str(path))
    assert result.verdict is not Verdict.CLEAN, result
    assert any("builtins.print" in f.message for f in result.findings), result


def test_joblib_array_with_lying_itemsize_really_runs_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reproducer above is a real bypass: joblib.load calls the hidden import (a harmless print)."""
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "lying-itemsize.joblib"
    _joblib_array_with_lying_itemsize(path)
    assert joblib.load(path) is None
    assert "joblib.load ran this" in capsys.readouterr().out
