"""One file, several loaders: every reading a real loader could take must be checked."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest

from trainguard.findings import Verdict
from trainguard.scan import scan_path

PAYLOAD = b"cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR0"


def _fake_joblib_header(hidden_len: int) -> bytes:
    """A joblib NumpyArrayWrapper announcing `hidden_len` bytes of uint8 "array data"."""
    return (
        b"\x80\x02cjoblib.numpy_pickle\nNumpyArrayWrapper\n)\x81}(U\x05shapeK"
        + bytes([hidden_len])
        + b"\x85U\x05dtypecnumpy\ndtype\nU\x02u1\x89\x88\x87R"
        + b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbub"
    )


# joblib.load skips the bytes after an array header; torch.load and pickle.load execute them.
# A scanner that follows joblib's reading everywhere misses a payload placed there.
def test_payload_behind_a_joblib_array_header_in_a_torch_checkpoint(tmp_path: Path) -> None:
    data = _fake_joblib_header(len(PAYLOAD)) + PAYLOAD + b"0N."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
    target = tmp_path / "model.pt"
    target.write_bytes(buf.getvalue())
    report = scan_path(target)
    assert report.exit_code == 1
    messages = [f.message for r in report.results for f in r.findings]
    assert any("os.system" in m and "joblib" in m for m in messages), messages


def test_payload_behind_a_joblib_array_header_in_a_raw_pickle(tmp_path: Path) -> None:
    target = tmp_path / "model.joblib"
    target.write_bytes(_fake_joblib_header(len(PAYLOAD)) + PAYLOAD + b"0N.")
    report = scan_path(target)
    assert report.exit_code == 1
    assert any("os.system" in f.message for r in report.results for f in r.findings)


# pickle.load reads any file as a pickle, so a container may also be a pickle (a polyglot). A tar
# member name sits at offset 0: name the member after a pickle and the archive runs it when
# unpickled, while every tar reader sees a harmless archive.
def test_tar_whose_first_member_name_is_a_pickle(tmp_path: Path) -> None:
    import tarfile

    target = tmp_path / "weights.tar"
    with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR.")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    assert target.read_bytes().startswith(b"cos\nsystem\n")
    report = scan_path(target)
    assert report.exit_code == 1
    assert any("os.system" in f.message for r in report.results for f in r.findings)


def test_joblib_array_header_inside_a_frame_that_goes_on_is_not_clean(tmp_path: Path) -> None:
    # joblib reads an array from the file handle, which inside a FRAME stands at the frame's end, not
    # after the header's BUILD. joblib ends the frame at each header; a frame stretched past it makes
    # joblib and a reader that follows the opcodes read different streams.
    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    buffer = io.BytesIO()
    joblib.dump({"weights": np.arange(8.0)}, buffer)
    data = buffer.getvalue()
    assert data[2:3] == b"\x95"  # PROTO, then the first FRAME
    (length,) = struct.unpack("<Q", data[3:11])
    stretched = data[:3] + struct.pack("<Q", length + 16) + data[11:]
    path = tmp_path / "stretched.joblib"
    path.write_bytes(stretched)
    (result,) = scan_path(path).results
    assert result.verdict is not Verdict.CLEAN, result
    assert any("inside a FRAME" in p.message for p in result.problems), result


def test_a_frame_longer_than_the_file_is_read_as_the_pure_python_unpickler_reads_it(tmp_path: Path) -> None:
    # joblib's unpickler is pickle's pure-Python one: it runs what such a frame holds.
    path = tmp_path / "long-frame.pkl"
    path.write_bytes(
        b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."
    )
    (result,) = scan_path(path).results
    assert result.verdict is Verdict.FINDINGS, result
    assert any("os.system" in f.message for f in result.findings), result
