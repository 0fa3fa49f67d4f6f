"""Coverage-guided fuzzing of scan_file with atheris (not collected by pytest).

    .venv/bin/pip install atheris
    .venv/bin/python tests/unit/fuzz_scan.py -max_total_time=600 [CORPUS_DIR ...]

Any exception out of scan_file, or an "Error" problem (an unexpected exception that scan_file's
safety net turned into "undecided"), is reported as a crash with the input that caused it.
Seed the corpus with real artifacts (a torch.save file, .npy, .npz, safetensors, joblib) for depth.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from trainguard.scan import scan_file

_FD, _PATH = tempfile.mkstemp(prefix="trainguard-fuzz-")
os.close(_FD)


def test_one_input(data: bytes) -> None:
    with open(_PATH, "wb") as handle:  # noqa: PTH123 - hot loop, no Path object per input
        handle.write(data)
    result = scan_file(_PATH)
    errors = [p.message for p in result.problems if p.kind == "Error"]
    if errors:
        raise RuntimeError(f"internal error while scanning: {errors[0]}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        os.unlink(_PATH)  # noqa: PTH108


if __name__ == "__main__":
    main()
