"""The command line: exit codes, output formats, configuration and start-up cost."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.cli import main

ROOT = Path(__file__).resolve().parents[2]
EVIL = b"cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."
CLEAN = pickle.dumps({"a": 1, "b": [1.5, "x"]}, protocol=4)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "evil": tmp_path / "evil.bin",
        "clean": tmp_path / "clean.pkl",
        "truncated": tmp_path / "truncated.pkl",
    }
    paths["evil"].write_bytes(EVIL)
    paths["clean"].write_bytes(CLEAN)
    paths["truncated"].write_bytes(CLEAN[:-4])
    return paths


def test_clean_file_exits_0(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(files["clean"])]) == 0
    assert "1 clean" in capsys.readouterr().out


def test_findings_exit_1_and_name_the_import(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scan", str(files["evil"])]) == 1
    out = capsys.readouterr().out
    assert "os.system" in out
    assert "[critical] dangerous-import" in out


def test_truncated_pickle_exits_3_not_0(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(files["truncated"])]) == 3
    assert "UNDECIDED" in capsys.readouterr().out


def test_missing_path_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: no such file or directory" in capsys.readouterr().err


def test_bad_flag_is_a_usage_error(files: dict[str, Path]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", "--format", "xml", str(files["clean"])])
    assert exit_info.value.code == 2


def test_findings_win_over_undecided_in_one_run(files: dict[str, Path]) -> None:
    assert main(["scan", str(files["truncated"]), str(files["evil"]), str(files["clean"])]) == 1


def test_json_output(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "--format", "json", str(files["evil"]), str(files["clean"])]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == "1"
    assert doc["exit_code"] == 1
    by_path = {Path(r["path"]).name: r for r in doc["results"]}
    assert by_path["clean.pkl"]["verdict"] == "clean"
    evil = by_path["evil.bin"]
    assert evil["verdict"] == "findings"
    assert evil["formats"] == ["pickle"]
    assert evil["findings"][0]["rule"] == "dangerous-import"
    assert evil["findings"][0]["severity"] == "critical"
    assert evil["findings"][0]["offset"] == 0


def test_sarif_output(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "--format", "sarif", str(files["evil"]), str(files["truncated"])]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == "2.1.0"
    run = doc["runs"][0]
    rule_ids = {rule["id"] for rule in run["tool"]["driver"]["rules"]}
    assert rule_ids == {"dangerous-import", "undecided"}
    levels = {r["ruleId"]: r["level"] for r in run["results"]}
    assert levels == {"dangerous-import": "error", "undecided": "warning"}
    uri = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri.endswith("evil.bin")


def test_output_file_is_written(files: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    assert main(["scan", "--format", "json", "-o", str(target), str(files["evil"])]) == 1
    assert json.loads(target.read_text())["exit_code"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_allow_flag_clears_an_unknown_import(tmp_path: Path) -> None:
    sample = tmp_path / "model.pkl"
    sample.write_bytes(b"\x80\x02cmypkg.models\nNet\n)\x81}b.")
    assert main(["scan", str(sample)]) == 1
    assert main(["scan", "--allow", "mypkg.models.Net", str(sample)]) == 0
    assert main(["scan", "--allow", "mypkg.models.*", str(sample)]) == 0


def test_policy_file(tmp_path: Path) -> None:
    sample = tmp_path / "model.pkl"
    sample.write_bytes(b"\x80\x02cmypkg.models\nNet\n)\x81}b.")
    policy = tmp_path / "policy.toml"
    policy.write_text('[scan.allow]\n"mypkg.models.Net" = "our model"\n')
    assert main(["scan", "--policy", str(policy), str(sample)]) == 0


def test_policy_next_to_the_artifact_is_ignored(tmp_path: Path) -> None:
    sample = tmp_path / "model.pkl"
    sample.write_bytes(EVIL)
    (tmp_path / "trainguard.toml").write_text('[scan.allow]\n"os.system" = "attacker"\n')
    (tmp_path / "policy.toml").write_text('[scan.allow]\n"os.system" = "attacker"\n')
    assert main(["scan", str(sample)]) == 1


def test_broken_policy_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[scan.allow\n")
    sample = tmp_path / "x.pkl"
    sample.write_bytes(CLEAN)
    assert main(["scan", "--policy", str(policy), str(sample)]) == 2
    assert "policy.toml is not valid TOML" in capsys.readouterr().err


def test_bad_allow_entry_is_a_usage_error(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "--allow", "os", str(files["clean"])]) == 2
    assert "invalid allow entry" in capsys.readouterr().err


def test_wildcard_never_covers_a_dotted_name(tmp_path: Path) -> None:
    # Protocol 4 resolves dotted names attribute by attribute: mypkg.*.os.system must not pass.
    sample = tmp_path / "walk.pkl"
    sample.write_bytes(b"\x80\x04\x8c\x05mypkg\x8c\tos.system\x93)R.")
    assert main(["scan", "--allow", "mypkg.*", str(sample)]) == 1


def test_folder_scan_in_parallel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(20):
        (tmp_path / f"clean{i}.pkl").write_bytes(CLEAN)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "x.bin").write_bytes(EVIL)
    assert main(["scan", "--jobs", "2", "--format", "json", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["results"]) == 21
    assert [r["verdict"] for r in doc["results"]].count("findings") == 1


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False
    )


def test_python_m_trainguard_version() -> None:
    result = _run("-m", "trainguard", "--version")
    assert result.returncode == 0
    assert re.fullmatch(r"trainguard \d+\.\d+\.\d+\n", result.stdout)


def test_help_imports_neither_torch_nor_numpy() -> None:
    code = (
        "import sys\n"
        "from trainguard.cli import main\n"
        "for argv in (['--help'], ['scan', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import trainguard.scan\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'joblib') if m in sys.modules))\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_readme_help_block_matches_the_real_help() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- scan-help -->\n```text\n(.*?)```\n<!-- /scan-help -->", readme, re.S)
    assert match, "README lost its scan --help block"
    env = dict(os.environ, COLUMNS="100")
    result = _run("-m", "trainguard", "scan", "--help", env=env)
    assert result.stdout == match.group(1), "README's scan --help block is stale: paste the new output"


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert ci.strip().splitlines()[-1] == "make test"


def test_fifo_in_a_folder_is_skipped_without_hanging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    (tmp_path / "ok.pkl").write_bytes(CLEAN)
    assert main(["scan", "--format", "json", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    verdicts = {Path(r["path"]).name: (r["verdict"], r["note"]) for r in doc["results"]}
    assert verdicts["pipe.pt"] == ("skipped", "not a regular file")


def test_unreadable_file_is_undecided(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "loop.pt"
    target.symlink_to(target)
    assert main(["scan", str(target)]) == 3
    assert "cannot read" in capsys.readouterr().out
