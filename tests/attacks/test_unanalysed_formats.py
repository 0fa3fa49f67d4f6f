"""Files that trainguard recognises by their bytes but cannot analyse are undecided (exit 3), never
skipped: here HDF5 files that are not Keras models (their datasets may hold pickles) or that this
reader cannot follow. (Keras models in HDF5, GGUF and Keras archives: test_hdf5.py, test_gguf.py,
test_keras.py.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path

HDF5 = b"\x89HDF\r\n\x1a\n"


def _verdict(path: Path) -> tuple[Verdict, str]:
    report = scan_path(path, ScanOptions(jobs=1))
    assert report.exit_code == 3, report
    (result,) = report.results
    return result.verdict, " | ".join(p.message for p in result.problems)


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("model.h5", HDF5 + bytes(2040), "HDF5"),
        ("with-user-block.h5", bytes(512) + HDF5 + bytes(1000), "HDF5"),
    ],
)
def test_a_recognised_model_format_not_analysed_is_undecided(
    tmp_path: Path, name: str, data: bytes, says: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    verdict, said = _verdict(path)
    assert verdict is Verdict.UNDECIDED, said
    assert says in said


def test_a_keras_archive_whose_weights_are_not_plain_hdf5_is_undecided(tmp_path: Path) -> None:
    # Keras reads model.weights.h5 as datasets only, so plain HDF5 there is labelled; anything else
    # (here a user block in front, which another reader could take for something else) is analysed
    # as an artifact of its own, and HDF5 is not analysed yet.
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", '{"keras_version": "3.6.0"}')
        archive.writestr("config.json", '{"class_name": "Sequential", "config": {"layers": []}}')
        archive.writestr("model.weights.h5", bytes(512) + HDF5 + bytes(2040))
    verdict, said = _verdict(path)
    assert verdict is Verdict.UNDECIDED, said
    assert "model.weights.h5" in said
