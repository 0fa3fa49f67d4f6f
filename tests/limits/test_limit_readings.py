"""A limit of the pickle reader, reached in any reading of a file, ends in "undecided": pickle.load has
no such limit and reads on, so whatever lies beyond was never checked. Never "not a pickle", never
"clean". The limits are set low here so that the files stay small; the defaults behave the same."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from trainguard._pickle.machine import PickleLimits
from trainguard.findings import Verdict
from trainguard.scan import ScanLimits, ScanOptions, scan_path

LOW = ScanLimits(pickle=PickleLimits(max_marks=50, max_stack=500, max_memo=50))
# What the reader would find past the limit: os.system called with a harmless command.
PAYLOAD = b"cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."


def _verdict(path: Path, limits: ScanLimits = LOW) -> tuple[Verdict, str]:
    report = scan_path(path, ScanOptions(limits=limits, jobs=1))
    (result,) = report.results
    said = " | ".join([*(p.message for p in result.problems), *(f.message for f in result.findings)])
    return result.verdict, said


# Streams that do not start with PROTO: the reader must not call them "not a pickle".
UNPROVEN = {
    "marks": b"(" * 51 + PAYLOAD,
    "stack": b"N" * 501 + PAYLOAD,
    "memo": b"".join(b"Np%d\n0" % i for i in range(51)) + PAYLOAD,
}


@pytest.mark.parametrize("name", list(UNPROVEN))
def test_a_limit_in_a_stream_without_proto_is_undecided_not_skipped(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.bin"
    path.write_bytes(UNPROVEN[name])
    verdict, said = _verdict(path)
    assert verdict is Verdict.UNDECIDED, said
    assert "stopped at a limit" in said


def test_a_line_longer_than_the_reader_reads_is_undecided(tmp_path: Path) -> None:
    # The shape at the default limits: a quoted string line of over 1 MiB, then the payload.
    path = tmp_path / "long-line.bin"
    path.write_bytes(b"S'" + b"a" * (1 << 20) + b"'\n0" + PAYLOAD)
    verdict, said = _verdict(path, ScanLimits())
    assert verdict is Verdict.UNDECIDED, said
    assert "line longer than" in said


def test_the_default_mark_limit_example_is_undecided(tmp_path: Path) -> None:
    path = tmp_path / "marks.pkl"
    path.write_bytes(b"(" * 100001 + PAYLOAD)
    verdict, said = _verdict(path, ScanLimits())
    assert verdict is Verdict.UNDECIDED, said


def test_a_limit_in_a_pickle_after_the_first_is_undecided(tmp_path: Path) -> None:
    # pickle.load called again on the same file reads the next pickle.
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps({"step": 1}, protocol=2) + b"(" * 51 + PAYLOAD)
    verdict, said = _verdict(path)
    assert verdict is Verdict.UNDECIDED, said
    assert "after the last complete one" in said


def test_a_limit_in_joblibs_plain_reading_is_undecided(tmp_path: Path) -> None:
    # joblib.load skips an array's bytes (here 200 "(" that it loads as uint8); every other
    # unpickler reads them as opcodes: MARKs past the limit.
    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    from joblib.numpy_pickle import NumpyArrayWrapper

    header = NumpyArrayWrapper(np.ndarray, (200,), "C", np.dtype("uint8"), numpy_array_alignment_bytes=None)
    data = pickle.dumps(header, protocol=2)[:-1] + b"(" * 200 + b"."
    assert (joblib.load(io.BytesIO(data)) == ord("(")).all()  # what joblib itself makes of it
    path = tmp_path / "array.joblib"
    path.write_bytes(data)
    verdict, said = _verdict(path)
    assert verdict is Verdict.UNDECIDED, said
    assert "but joblib.load" in said


def test_a_limit_in_a_container_read_as_a_pickle_is_undecided(tmp_path: Path) -> None:
    # pickle.load reads a tar from its first byte: a member name of MARKs reaches the limit.
    path = tmp_path / "archive.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("(" * 90)
        data = b"plain text\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    verdict, said = _verdict(path)
    assert verdict is Verdict.UNDECIDED, said
    assert "read as a pickle" in said


def test_a_zip_whose_first_line_is_long_stays_clean(tmp_path: Path) -> None:
    # "PK" read as a pickle is a persistent id: pickle.load stops right after that first line.
    path = tmp_path / "stored.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("blob.bin", b"a" * (2 << 20))
    assert b"\n" not in path.read_bytes()[: 1 << 20]
    verdict, said = _verdict(path, ScanLimits())
    assert verdict in (Verdict.CLEAN, Verdict.SKIPPED), said


def test_a_long_persistent_id_line_outside_a_container_is_undecided(tmp_path: Path) -> None:
    # torch's legacy loader has a persistent_load: it reads the line and goes on. Only a container
    # read as a pickle may stop at its first PERSID line.
    path = tmp_path / "persid.bin"
    path.write_bytes(b"P" + b"a" * (1 << 20) + b"\n0" + PAYLOAD)
    verdict, said = _verdict(path, ScanLimits())
    assert verdict is Verdict.UNDECIDED, said
    assert "line longer than" in said
