"""The work one file can cost is bounded in terms no clock decides: opcodes run for all its pickles
together, and decompressed bytes that never take the temporary folder's disk below a reserve.
Reaching either is "undecided" (exit 3), naming the limit. The limits are set low here; the defaults
(20 million opcodes, 1 GiB kept free) behave the same."""

from __future__ import annotations

import dataclasses
import gzip
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from trainguard._pickle.machine import PickleLimits
from trainguard.cli import main
from trainguard.findings import Verdict
from trainguard.scan import ScanLimits, ScanOptions, scan_path

BUDGET = 1_000
# About 600 opcodes each, no globals: alone, each is clean under the budget.
SMALL = b"\x80\x04" + b"N0" * 300 + b"N."


def _scan(path: Path, limits: ScanLimits) -> tuple[Verdict, str]:
    (result,) = scan_path(path, ScanOptions(limits=limits, jobs=1)).results
    return result.verdict, " | ".join(p.message for p in result.problems)


LOW_OPS = ScanLimits(pickle=PickleLimits(max_ops=BUDGET))


def test_one_pickle_under_the_budget_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "one.pkl"
    path.write_bytes(SMALL)
    assert _scan(path, LOW_OPS)[0] == Verdict.CLEAN


def test_pickles_after_the_first_share_the_files_opcode_budget(tmp_path: Path) -> None:
    path = tmp_path / "many.pkl"
    path.write_bytes(SMALL * 3)
    verdict, said = _scan(path, LOW_OPS)
    assert verdict == Verdict.UNDECIDED
    assert f"more than {BUDGET} opcodes in one file" in said


def test_members_of_an_archive_share_the_files_opcode_budget(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            zf.writestr(f"part{i}.pkl", SMALL)
    path = tmp_path / "parts.zip"
    path.write_bytes(buf.getvalue())
    verdict, said = _scan(path, LOW_OPS)
    assert verdict == Verdict.UNDECIDED, said
    assert "opcodes in one file" in said


def test_a_small_gzip_that_expands_to_many_opcodes_stops_at_the_budget(tmp_path: Path) -> None:
    # The shape of the 48 KB gzip that held 50 million opcodes: work bounded by the budget, not the size.
    path = tmp_path / "amplified.pkl.gz"
    path.write_bytes(gzip.compress(b"\x80\x04" + b"N0" * 200_000 + b"N."))
    assert path.stat().st_size < 2_000
    verdict, said = _scan(path, LOW_OPS)
    assert verdict == Verdict.UNDECIDED
    assert "opcodes in one file" in said


def test_the_budget_is_set_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "many.pkl"
    path.write_bytes(SMALL * 3)
    assert main(["scan", "--max-ops", str(BUDGET), str(path)]) == 3
    assert main(["scan", "--max-ops", str(10 * BUDGET), str(path)]) == 0
    capsys.readouterr()


def test_the_default_budget_is_per_file() -> None:
    assert ScanLimits().pickle.max_ops == 20_000_000


def test_decompressed_data_never_takes_the_disk_below_the_reserve(tmp_path: Path) -> None:
    path = tmp_path / "big.pkl.gz"
    payload = b"\x80\x04\x8e" + (4 << 20).to_bytes(8, "little") + bytes(4 << 20) + b"."  # BINBYTES8
    path.write_bytes(gzip.compress(payload))
    free = shutil.disk_usage(tmp_path).free
    # In memory up to 1 MiB, then spilled: a reserve above the free space refuses the spill.
    tight = ScanLimits(spool_in_memory=1 << 20, spill_reserve=free + (1 << 40))
    verdict, said = _scan(path, tight)
    assert verdict == Verdict.UNDECIDED
    assert "would leave under" in said and "free" in said
    roomy = dataclasses.replace(tight, spill_reserve=1)
    assert _scan(path, roomy)[0] == Verdict.CLEAN
