"""A real torch==2.13.0 venv, installed by pip: clean after `import torch` and after `python -O`, and the
saboteur's edit of the optimizer source found, by RECORD and by baseline."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.envcheck import snapshot_environment, verify_environment
from trainguard.envcheck._baseline import Baseline

from .conftest import clean_environ, site_packages, venv_python

pytestmark = [pytest.mark.torch, pytest.mark.slow]
TORCH = "torch==2.13.0"


@pytest.fixture(scope="module")
def torch_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("torch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH]
    done = subprocess.run(pip, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"pip cannot install {TORCH} here: {done.stderr.strip()[-300:]}")
    return venv


@pytest.fixture(scope="module")
def torch_baseline(torch_venv: Path) -> Baseline:
    baseline, report = snapshot_environment(prefix=str(torch_venv), environ=clean_environ())
    assert report.findings == [] and report.undecided == [], report.findings + report.undecided
    assert report.bytecode_checked > 2000  # torch's own pycs, compiled by pip, compared with their sources
    return baseline


def _run(venv: Path, *flags: str) -> None:
    env = {k: v for k, v in clean_environ().items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = "import torch; torch.manual_seed(0); torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)"
    subprocess.run([str(venv_python(venv)), *flags, "-c", code], check=True, env=env)


def test_clean_after_import_torch_and_python_dash_o(torch_venv: Path, torch_baseline: Baseline) -> None:
    _run(torch_venv)
    _run(torch_venv, "-O")
    optim = site_packages(torch_venv) / "torch" / "optim" / "__pycache__"
    assert list(optim.glob("sgd.*.opt-1.pyc")), "python -O wrote no bytecode: the test proves nothing"
    with_baseline = verify_environment(
        prefix=str(torch_venv), baseline=torch_baseline, environ=clean_environ()
    )
    assert with_baseline.findings == [] and with_baseline.undecided == [], with_baseline.findings
    assert with_baseline.bytecode_checked > 0  # the -O bytecode is new: compiled and compared
    assert with_baseline.digest == torch_baseline.digest
    without = verify_environment(prefix=str(torch_venv), environ=clean_environ(), full=True)
    assert without.findings == [] and without.undecided == [], without.findings


def test_optimizer_source_edited_and_its_record_row_rewritten(
    torch_venv: Path, torch_baseline: Baseline
) -> None:
    """The 2024 sabotage: the shared install's optimizer edited so updates go the wrong way."""
    site = site_packages(torch_venv)
    sgd = site / "torch" / "optim" / "sgd.py"
    original = sgd.read_bytes()
    record = next(site.glob("torch-2.13.0*.dist-info")) / "RECORD"
    original_record = record.read_bytes()
    try:
        tampered = original.replace(b"param.add_(grad, alpha=-lr)", b"param.add_(grad, alpha=lr)")
        assert tampered != original
        sgd.write_bytes(tampered)
        quick = {"environ": clean_environ(), "full": True, "check_bytecode": False}  # bytecode: other tests
        without = verify_environment(prefix=str(torch_venv), **quick)  # type: ignore[arg-type]
        assert any(f.kind == "modified" and f.path.endswith("optim/sgd.py") for f in without.findings)

        def row(data: bytes) -> bytes:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            return b"sha256=" + digest + b"," + str(len(data)).encode()

        record.write_bytes(original_record.replace(row(original), row(tampered)))
        hidden = verify_environment(prefix=str(torch_venv), **quick)  # type: ignore[arg-type]
        assert not any(f.path.endswith("optim/sgd.py") for f in hidden.findings if f.kind == "modified")
        caught = verify_environment(prefix=str(torch_venv), baseline=torch_baseline, environ=clean_environ())
        [finding] = [f for f in caught.findings if f.path.endswith("optim/sgd.py")]
        assert finding.kind == "modified" and "rewritten to match" in finding.message
        assert finding.distribution == "torch"
    finally:
        sgd.write_bytes(original)
        record.write_bytes(original_record)
        os.utime(sgd)
