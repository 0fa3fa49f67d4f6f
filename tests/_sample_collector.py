"""Keeps a copy of every file an attack or limit test wrote, when TRAINGUARD_SAMPLE_DIR names a folder.

The differential test runs those tests with it set, then loads every kept sample with the real
loaders: the hostile files the suite builds are checked against what the loaders really do, not
only against what each test expects.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SAMPLE_DIR_VARIABLE = "TRAINGUARD_SAMPLE_DIR"
_LARGEST_KEPT = 8 << 20  # zip bombs and other huge files are left out: loading them proves nothing


@pytest.fixture(autouse=True)
def _keep_samples(request: pytest.FixtureRequest) -> Iterator[None]:
    target = os.environ.get(SAMPLE_DIR_VARIABLE)
    if not target:
        yield
        return
    tmp_path: Path = request.getfixturevalue("tmp_path")
    yield
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
    for path in sorted(tmp_path.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _LARGEST_KEPT:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(path.relative_to(tmp_path)))
        shutil.copyfile(path, Path(target) / f"{prefix}__{name}")
