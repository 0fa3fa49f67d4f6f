"""`trainguard drill --script`: the incident's attacks played against a team's own training script,
planted from outside it (the file is never edited), with a third verdict for attacks the script gives
no hold for."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainguard.cli import main
from trainguard.drill._attacks import build
from trainguard.drill._drill import DrillResult, scorecard
from trainguard.drill._play import Outcome
from trainguard.drill._report import render
from trainguard.drill._runs import RunRecord, job_command
from trainguard.drill._script import NO_WATCH, Script, plant_overlay, rank_process

# A team's own job, nothing like the built-in GPT: an MLP regression under DDP over gloo, AdamW,
# guarded by trainguard.watch, a signed checkpoint every 5 steps into ./ckpt.
USER_SCRIPT = """\
import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import trainguard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = trainguard.watch(model, optimizer)
    data = torch.Generator().manual_seed(1)
    weights = torch.randn(8, 1, generator=data)
    Path("ckpt").mkdir(exist_ok=True)
    for step in range(1, args.steps + 1):
        inputs = torch.randn(16 * world, 8, generator=data)[rank * 16 : (rank + 1) * 16]
        loss = nn.functional.mse_loss(model(inputs), inputs @ weights)
        guard.observe_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 5 == 0:
            trainguard.save(model.module.state_dict(), Path("ckpt") / f"model-{step}.pt")
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
"""

ATTACKS = ["flip-one-rank", "sigterm-rank", "checkpoint-deleted", "ledger-row-edited", "checkpoint-payload"]


def _drill(script: Path, out: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", "drill", "--out", str(out), "--script", str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TRAINGUARD_HOME": str(home)},
        cwd=script.parent,
        timeout=900,
        check=False,
    )


def _listing(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.torch
def test_the_attacks_are_played_against_the_users_own_script(tmp_path: Path) -> None:
    team = tmp_path / "team"
    team.mkdir()
    script = team / "train.py"
    script.write_text(USER_SCRIPT)
    before = _listing(team)
    out = tmp_path / "report"
    done = _drill(script, out, tmp_path / "home", "--attacks", *ATTACKS, "--", "--steps", "12")
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    report = json.loads((out / "drill.json").read_text())
    assert report["schema_version"] == "1" and report["ok"] is True
    assert report["script"] == {"path": str(script.resolve()), "args": ["--steps", "12"]}
    assert report["steps"] is None
    by_name = {a["name"]: a for a in report["attacks"]}
    for name in ATTACKS[:-1]:
        assert by_name[name]["verdict"] == "caught" and by_name[name]["caught"] is True, by_name[name]
    # The patch is planted through sitecustomize; the replicas' code differs, the rank is named.
    assert by_name["flip-one-rank"]["named"] == "rank(s) 1"
    assert "sender pid" in by_name["sigterm-rank"]["named"]
    # The checkpoints the script signed with trainguard.save, wherever it put them.
    assert "model-10.pt" in by_name["checkpoint-deleted"]["named"]
    payload = by_name["checkpoint-payload"]
    assert payload["verdict"] == "not applicable" and payload["caught"] is False
    assert payload["details"].startswith("not applicable: ")
    assert report["missed"] == [] and report["not_applicable"] == ["checkpoint-payload"]
    assert "4 of 4 applicable attacks caught, 1 not applicable, 0 false alarm(s)" in done.stdout
    assert 'data-verdict="not-applicable"' in (out / "report.html").read_text()
    # The script is run where it is, never edited, and nothing is written beside it.
    assert _listing(team) == before


# The attacks the built-in job plants in its data module, reaching its loop's locals: in a script, a
# thread started by the planted module finds the guard and its optimizer among the interpreter's objects.
FROM_A_THREAD = [
    "weights-nudged-one-rank",
    "lr-negated-one-rank",
    "optimizer-state-flipped-one-rank",
    "grad-flipped-before-allreduce-one-rank",
    "busy-wait-one-rank",
    "guard-switched-off",
]


@pytest.mark.torch
def test_the_attacks_on_the_loops_objects_are_planted_in_a_thread_of_the_script(tmp_path: Path) -> None:
    team = tmp_path / "team"
    team.mkdir()
    script = team / "train.py"
    script.write_text(USER_SCRIPT)
    before = _listing(team)
    out = tmp_path / "report"
    done = _drill(script, out, tmp_path / "home", "--attacks", *FROM_A_THREAD, "--", "--steps", "12")
    report = json.loads((out / "drill.json").read_text())
    by_name = {a["name"]: a for a in report["attacks"]}
    assert list(by_name) == FROM_A_THREAD
    for name in FROM_A_THREAD:
        assert by_name[name]["verdict"] == "caught", (by_name[name], done.stdout, done.stderr[-4000:])
        # Named by the evidence, as in the built-in job; a window between steps the thread missed
        # moves the alert a step on, never before the attack acted.
        assert by_name[name]["named"] == "rank(s) 1", by_name[name]
        assert 0 <= by_name[name]["steps_to_detection"] <= 2, by_name[name]
    flipped = by_name["grad-flipped-before-allreduce-one-rank"]
    assert flipped["detected_by"] == "monitor: gradient_path" and "set to divide by -2" in flipped["details"]
    assert by_name["busy-wait-one-rank"]["detected_by"] == "monitor: step_time"
    assert report["missed"] == [] and report["not_applicable"] == [] and done.returncode == 0
    assert _listing(team) == before


@pytest.mark.torch
def test_a_script_without_the_guard_fails_the_drill(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n"
    )
    out = tmp_path / "report"
    done = _drill(script, out, tmp_path / "home", "--attacks", "flip-one-rank")
    assert done.returncode == 1, done.stdout + done.stderr[-4000:]
    assert NO_WATCH in done.stderr
    report = json.loads((out / "drill.json").read_text())
    assert report["clean_run"]["false_alarms"] == [NO_WATCH] and report["attacks"] == []


# -- without runs ----------------------------------------------------------------------------------


def _result(outcomes: list[Outcome]) -> DrillResult:
    clean = RunRecord("clean", Path("/nonexistent"), 0, "", [], {}, [], 1.0)
    return DrillResult(2, None, "cpu", clean, [], outcomes, 3.0, Script(Path("/t/train.py"), ("--x",)))


def test_not_applicable_attacks_count_neither_way() -> None:
    attacks = {a.name: a for a in build(2)}
    reason = "not applicable: the script never ran the patched function"
    result = _result(
        [
            Outcome(attacks["sigterm-rank"], True, "supervisor: signal", "sender pid 1"),
            Outcome.not_applicable(attacks["flip-one-rank"], reason),
            Outcome.not_applicable(attacks["checkpoint-payload"], "not applicable: resume"),
        ]
    )
    assert result.ok
    assert (
        result.tally()
        == "1 of 1 applicable attacks caught, 2 not applicable, 0 false alarm(s) in the clean run"
    )
    document = result.to_json()
    assert document["schema_version"] == "1"
    assert [a["verdict"] for a in document["attacks"]] == ["caught", "not applicable", "not applicable"]
    assert [a["caught"] for a in document["attacks"]] == [True, False, False]
    assert document["missed"] == [] and document["not_applicable"] == ["flip-one-rank", "checkpoint-payload"]
    text = scorecard(result)
    assert "1 of 1 applicable attacks caught, 2 not applicable, 0 false alarm(s)" in text
    [row] = [line for line in text.splitlines() if line.startswith("flip-one-rank ")]
    assert row.split()[2:4] == ["not", "applicable"] and row.endswith(reason)
    page = render(result)
    assert 'data-attack="flip-one-rank" data-verdict="not-applicable"' in page
    # A miss still fails the drill; without any not applicable the line reads as it always has.
    missed = _result([Outcome(attacks["sigterm-rank"], False, "", "")])
    assert not missed.ok and missed.to_json()["missed"] == ["sigterm-rank"]
    assert missed.tally() == "0 of 1 attacks caught, 0 false alarm(s) in the clean run"


def test_the_built_in_jobs_command_is_unchanged() -> None:
    folder = Path("/w/runs/clean")
    assert job_command(Path("/py"), folder, 2, 16, "cpu", ["--resume", "r.pt"], None) == [
        "/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
        "/w/runs/clean/job/train.py", "--out", "/w/runs/clean/out", "--steps", "16",
        "--ckpt", "/w/runs/clean/ckpt", "--save-every", "5", "--device", "cpu", "--resume", "r.pt",
    ]  # fmt: skip
    script = Script(Path("/team/train.py"), ("--steps", "12"))
    assert job_command(Path("/py"), folder, 3, 16, "cpu", [], script) == [
        "/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "--max-restarts=0",
        "/team/train.py", "--steps", "12",
    ]  # fmt: skip


def test_script_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.py"
    assert main(["drill", "--script", str(missing), "--", "--steps", "3"]) == 2
    assert f"--script {missing}: cannot read it" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["drill", "--script", str(script), "--steps", "12"]) == 2
    assert "give your script's own arguments after --" in capsys.readouterr().err
    assert main(["drill", "--", "--steps", "12"]) == 2
    assert "only a --script takes arguments" in capsys.readouterr().err
    assert Script.from_arguments(script, ["--", "--lr", "1"]) == Script(script.resolve(), ("--lr", "1"))


def test_the_overlay_plants_code_in_the_ranks_only(tmp_path: Path) -> None:
    environment = plant_overlay(tmp_path, "print('PLANTED')\n")
    probe = [sys.executable, "-c", "pass"]
    base = {**os.environ, **environment}
    rank = subprocess.run(
        probe, env={**base, "RANK": "1", "LOCAL_RANK": "1"}, capture_output=True, text=True, check=True
    )
    launcher = subprocess.run(probe, env=base, capture_output=True, text=True, check=True)
    assert rank.stdout == "PLANTED\n" and launcher.stdout == ""


def test_a_ranks_process_is_found_by_its_environment() -> None:
    # A parent (as torchrun would be) whose child carries RANK=7 in its environment.
    child = (
        "import os, subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'], "
        "env={**os.environ, 'RANK': '7'})"
    )
    with subprocess.Popen([sys.executable, "-c", child]) as parent:
        try:
            deadline = time.monotonic() + 20
            found = None
            while found is None and time.monotonic() < deadline:
                found = rank_process(parent.pid, 7)
                time.sleep(0.05)
            assert found is not None and found != parent.pid
            assert rank_process(parent.pid, 3) is None
            environ = Path(f"/proc/{found}/environ").read_bytes().split(b"\0")
            assert b"RANK=7" in environ
        finally:
            if found is not None:
                os.kill(found, 9)
            parent.wait(timeout=20)
