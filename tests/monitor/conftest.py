"""Runs `job.py` as a real multi-process job under torchrun (gloo on loopback), one JSON per rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

JOB = Path(__file__).with_name("job.py")
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class JobResult:
    ranks: list[dict[str, Any]]
    output: str
    home: Path

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [rank["error"] for rank in self.ranks]

    def error(self) -> dict[str, Any]:
        """The one IntegrityError every rank raised: same check, same ranks, same step."""
        errors = self.errors
        assert all(errors), f"a rank finished without an error:\n{self.output}"
        first = errors[0]
        for other in errors[1:]:
            assert (other["check"], other["ranks"], other["step"]) == (
                first["check"],
                first["ranks"],
                first["step"],
            )
        return first


def run_job(
    tmp_path: Path, nproc: int, *args: str, script: Path = JOB, timeout: float = 240, **env: str
) -> JobResult:
    """Run `script` (job.py unless told) under torchrun; `env` adds environment variables."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "TRAINGUARD_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **env,
    }
    environment.pop("TRAINGUARD_LEDGER", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--max-restarts=0", str(script), "--out", str(out), *args,
    ]  # fmt: skip
    completed = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, check=False
    )
    output = completed.stdout + completed.stderr
    files = sorted(out.glob("rank*.json"))
    assert len(files) == nproc, (
        f"{len(files)} of {nproc} ranks reported (exit {completed.returncode}):\n{output}"
    )
    ranks = [json.loads(path.read_text()) for path in files]
    return JobResult(sorted(ranks, key=lambda r: r["rank"]), output, tmp_path / "home")
