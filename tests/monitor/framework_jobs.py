"""Runs a framework job script (hf_job.py, lightning_job.py) under torchrun, gloo on loopback, and
reads what each rank wrote; shared by the framework callback tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.monitor.conftest import JobResult

HERE = Path(__file__).parent


def run_framework_job(script: str, tmp_path: Path, nproc: int, *args: str, timeout: float = 180) -> JobResult:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TRAINGUARD_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        # Offline and quiet: no hub look-ups, no telemetry, no progress bars in the captured output.
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")])),
    }
    env.pop("TRAINGUARD_LEDGER", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--max-restarts=0", str(HERE / script), "--out", str(out), *args,
    ]  # fmt: skip
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, check=False
    )
    output = completed.stdout + completed.stderr
    files = sorted(out.glob("rank*.json"))
    assert len(files) == nproc, (
        f"{len(files)} of {nproc} ranks reported (exit {completed.returncode}):\n{output}"
    )
    ranks = [json.loads(path.read_text()) for path in files]
    return JobResult(sorted(ranks, key=lambda r: r["rank"]), output, tmp_path / "home")
