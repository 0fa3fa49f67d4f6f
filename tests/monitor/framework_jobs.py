"""Runs a framework job script (hf_job.py, lightning_job.py) under torchrun, gloo on loopback, and
reads what each rank wrote; shared by the framework callback tests."""

from __future__ import annotations

from pathlib import Path

from tests.monitor.conftest import JobResult, run_job

HERE = Path(__file__).parent


def run_framework_job(script: str, tmp_path: Path, nproc: int, *args: str, timeout: float = 180) -> JobResult:
    # Offline and quiet: no hub look-ups, no telemetry, no progress bars in the captured output.
    quiet = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return run_job(tmp_path, nproc, *args, script=HERE / script, timeout=timeout, **quiet)
