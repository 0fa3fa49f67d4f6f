"""The scanner against the real loaders: no file scanned clean makes a loader resolve a forbidden global.

Every hostile sample the attack and limit tests build, and a seeded set of genuine files mutated as
an attacker would (`_fuzz`), is scanned, then loaded by the real ``pickle`` (C and pure Python, every
pickle in the file), ``torch.load(weights_only=False)``, ``numpy.load(allow_pickle=True)`` and
``joblib.load``, each in a throwaway process where an audit hook records every global resolved and
refuses, before its import, any that the allowlist does not hold (`_real_loaders`). A file the scanner
calls clean or skips must never get that far.

CI runs a fixed seed. For a longer run:
``TRAINGUARD_FUZZ_SAMPLES=20000 TRAINGUARD_FUZZ_SEED=$RANDOM make differential``.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests._sample_collector import SAMPLE_DIR_VARIABLE
from tests.attacks import _fuzz
from trainguard.findings import Verdict
from trainguard.scan.api import scan_file
from trainguard.scan.policy import Policy

pytest.importorskip("torch")
pytest.importorskip("joblib")

_HERE = Path(__file__).parent
_ROOT = _HERE.parent.parent
_LOADERS = ["pickle", "pickle-py", "torch", "numpy", "joblib"]
_PASSED = (Verdict.CLEAN, Verdict.SKIPPED)  # what exit 0 means


def _load_everywhere(samples: Sequence[Path]) -> list[dict[str, Any]]:
    policy = Policy.default()
    request = {
        "samples": [str(p) for p in samples],
        "loaders": _LOADERS,
        "allowed": sorted(policy.allowed),
        "wildcards": sorted(policy.wildcards),
        "timeout": 10,
        "memory": 2 << 30,
    }
    # -I: no user site, no PYTHON* variables; the loaders come from this environment only.
    done = subprocess.run(
        [sys.executable, "-I", str(_HERE / "_real_loaders.py")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(samples) * len(_LOADERS), done.stderr[-4000:]
    return results


def _escapes(results: list[dict[str, Any]], verdicts: dict[str, Verdict]) -> list[str]:
    """Every load of a file that scanned clean (or skipped) that reached a forbidden global or event."""
    found = []
    for r in results:
        if verdicts[r["sample"]] in _PASSED and (r["refused"] or r["blocked"]):
            what = ".".join(r["refused"]) if r["refused"] else r["blocked"]
            found.append(f"{r['sample']} ({verdicts[r['sample']].value}): {r['loader']} resolved {what}")
    return found


def _check(samples: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, Verdict]]:
    verdicts = {str(p): scan_file(str(p)).verdict for p in samples}
    results = _load_everywhere(samples)
    escapes = _escapes(results, verdicts)
    assert not escapes, "scanned clean, yet a real loader resolved a forbidden global:\n" + "\n".join(escapes)
    return results, verdicts


def _live(results: list[dict[str, Any]]) -> set[str]:
    """Samples that some real loader would have run: a forbidden global or event was reached."""
    return {r["sample"] for r in results if r["refused"] or r["blocked"]}


def test_fuzzed_model_files_never_scan_clean_when_a_loader_would_run_them(tmp_path: Path) -> None:
    count = int(os.environ.get("TRAINGUARD_FUZZ_SAMPLES", "240"))
    seed = int(os.environ.get("TRAINGUARD_FUZZ_SEED", "20261206"))
    samples = _fuzz.generate(tmp_path, count, seed)
    results, verdicts = _check([s.path for s in samples])

    # The check above is only worth something if the samples are real attacks and some pass the
    # scan: most hostile samples must be live in a real loader, and some files must scan clean.
    live = _live(results)
    hostile = [s for s in samples if s.hostile]
    live_share = sum(str(s.path) in live for s in hostile) / len(hostile)
    loaded_clean = {
        r["sample"] for r in results if r["outcome"] == "loaded" and verdicts[r["sample"]] == Verdict.CLEAN
    }
    per_carrier = collections.Counter(s.carrier for s in samples if str(s.path) in live)
    print(f"seed {seed}: {len(samples)} samples, {len(live)} live, {len(loaded_clean)} clean and loadable")
    print("live per carrier:", dict(sorted(per_carrier.items())))
    assert live_share > 0.5, f"only {live_share:.0%} of the hostile samples reach a forbidden global"
    assert loaded_clean, "no sample scanned clean and loaded: the clean side was never exercised"
    carriers_live = {s.carrier for s in samples if str(s.path) in live}
    assert len(carriers_live) >= 10, f"live samples came from {sorted(carriers_live)} only"


@pytest.mark.slow
def test_attack_and_limit_suite_samples_against_the_real_loaders(tmp_path: Path) -> None:
    kept = tmp_path / "samples"
    kept.mkdir()
    environment = dict(os.environ, **{SAMPLE_DIR_VARIABLE: str(kept)})
    environment.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",
            "--deselect",
            "tests/attacks/test_differential.py",
            "tests/attacks",
            "tests/limits",
        ],
        cwd=_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    samples = sorted(kept.iterdir())
    assert len(samples) > 200, f"only {len(samples)} samples were kept"
    results, _ = _check(samples)
    assert len(_live(results)) > 150, "the attack suite's samples no longer reach forbidden globals"


def test_the_sandbox_refuses_a_forbidden_global_before_anything_runs(tmp_path: Path) -> None:
    witness = tmp_path / "ran"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(b"cos\nsystem\n(S'touch " + str(witness).encode() + b"'\ntR.")
    benign = tmp_path / "benign.pkl"
    benign.write_bytes(b"\x80\x02ccollections\nOrderedDict\n)R}b.")
    results = {(Path(r["sample"]).name, r["loader"]): r for r in _load_everywhere([hostile, benign])}
    for loader in _LOADERS:
        assert results["hostile.pkl", loader]["refused"] == ["os", "system"], loader
        assert results["benign.pkl", loader]["refused"] is None, loader
    assert results["benign.pkl", "pickle"]["outcome"] == "loaded"
    assert results["benign.pkl", "pickle"]["resolved"] == [["collections", "OrderedDict"]]
    assert not witness.exists(), "the payload ran: the audit hook did not stop the import"
    verdicts = {str(hostile): Verdict.CLEAN, str(benign): Verdict.CLEAN}
    escaped = _escapes(list(results.values()), verdicts)
    assert len(escaped) == len(_LOADERS) and all("resolved os.system" in e for e in escaped)
