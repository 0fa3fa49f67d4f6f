"""Playing each attack against the job, and judging it by the evidence it left.

An attack counts as caught only on evidence of the right kind: an alert that names the attacked rank
at or after the step the attack acted, a load refused naming the planted file (and the payload's
marker never printed), a signal recorded with its sender, a verification or audit that fails naming
the file or the ledger's first bad index. Anything else is "missed", with what was seen, unless the
attack could not be played against the job at all (a user's script that never runs the patched
function, saves no signed checkpoint...): that is "not applicable", with the reason, and counts neither
way.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from trainguard.drill._attacks import ATTACK_STEP, MARKER, Attack
from trainguard.drill._runs import RunRecord, ledger_events, ledger_size, train
from trainguard.drill._script import (
    NEVER_ACTED,
    NEVER_REACHED,
    NO_SIGNED_CHECKPOINT,
    Script,
    not_for_scripts,
    planted_code_acted,
    rank_process,
)
from trainguard.drill._workspace import Workspace

__all__ = ["Outcome", "play"]


@dataclasses.dataclass
class Outcome:
    """How one attack went: caught or not, by what, naming what, how soon, and the ledger entry; or not
    applicable to the job (`applicable` False, the reason in `details`)."""

    attack: Attack
    caught: bool
    detected_by: str
    named: str
    step: int | None = None
    steps_to_detection: int | None = None
    seconds_to_detection: float | None = None
    evidence_index: int | None = None
    evidence_proved: bool | None = None
    details: str = ""
    run: RunRecord | None = None
    applicable: bool = True

    @classmethod
    def not_applicable(cls, attack: Attack, reason: str, run: RunRecord | None = None) -> Outcome:
        return cls(attack, False, "", "", details=reason, run=run, applicable=False)

    @property
    def verdict(self) -> str:
        """The verdict: caught, missed or not applicable."""
        if not self.applicable:
            return "not applicable"
        return "caught" if self.caught else "missed"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.attack.name,
            "group": self.attack.group,
            "what": self.attack.what,
            "caught": self.caught,
            "verdict": self.verdict,
            "detected_by": self.detected_by,
            "named": self.named,
            "step": self.step,
            "steps_to_detection": self.steps_to_detection,
            "seconds_to_detection": (
                round(self.seconds_to_detection, 3) if self.seconds_to_detection is not None else None
            ),
            "evidence": (
                {"index": self.evidence_index, "inclusion_proof_verified": self.evidence_proved}
                if self.evidence_index is not None
                else None
            ),
            "details": self.details,
            "run_seconds": round(self.run.seconds, 2) if self.run is not None else None,
        }


@dataclasses.dataclass
class Context:
    workspace: Workspace
    world: int
    steps: int
    device: str
    clean: RunRecord
    script: Script | None = None


class SetupFailed(Exception):
    """The drill could not set an attack up: the attack counts as not caught, with the reason."""


def play(attack: Attack, ctx: Context) -> Outcome:
    if ctx.script is not None and (reason := not_for_scripts(attack)):
        return Outcome.not_applicable(attack, reason)
    try:
        return _play(attack, ctx)
    except SetupFailed as exc:
        return Outcome(attack, False, "", "", details=f"the drill could not set the attack up: {exc}")


def _play(attack: Attack, ctx: Context) -> Outcome:
    # Judged on evidence that has left the job (that module imports this one: loaded here).
    from trainguard.drill._play_outside import OUTSIDE

    if attack.name in OUTSIDE:
        return OUTSIDE[attack.name](attack, ctx)
    if attack.kind == "signal":
        return _signal(attack, ctx)
    if attack.kind == "environment":
        from trainguard.drill._play_env import play_environment  # it imports this module

        return play_environment(attack, ctx)
    if attack.kind == "offline":
        try:
            return _OFFLINE[attack.name](attack, ctx)
        except NoCheckpoints as exc:
            if ctx.script is None:  # the built-in job always saves them: something went wrong
                raise SetupFailed(f"the clean run's checkpoints: {exc}") from None
            return Outcome.not_applicable(attack, str(exc))
    if attack.resume:
        return _resume(attack, ctx)
    return _patched(attack, ctx)


# Attacks inside the job: a patch in the job's own code, armed from outside the guard.


def _patched(attack: Attack, ctx: Context) -> Outcome:
    run = train(
        ctx.workspace,
        attack.name,
        world=ctx.world,
        steps=ctx.steps,
        device=ctx.device,
        plant=attack.job_patch if ctx.script is None else attack.script_patch or attack.job_patch,
        script=ctx.script,
    )
    # The clean run raised no alert, so any alert here is the attack's; one before the attack acted
    # means its code was seen before it fired (steps_to_detection is then negative).
    # Alerts that stopped the job first: an alert-only check (data_wait, spike) is weaker evidence.
    alerts = sorted(run.of_type("monitor.alert"), key=lambda e: e[3].get("action") != "stop")
    wanted = set(attack.expected_ranks)
    single = len(wanted) == 1
    for index, _, _, payload in alerts:
        ranks = set(payload.get("ranks") or [])
        if single and not wanted <= ranks:
            continue
        step = int(payload["step"])
        return Outcome(
            attack,
            run.exit_code != 0,
            f"monitor: {payload.get('check')}",
            f"rank(s) {', '.join(map(str, sorted(ranks)))}",
            step=step,
            steps_to_detection=step - ATTACK_STEP,
            seconds_to_detection=_seconds_between(run, ATTACK_STEP, step),
            evidence_index=index,
            details=str(payload.get("message", ""))[:300]
            + ("" if run.exit_code != 0 else " (but the job was not stopped)"),
            run=run,
        )
    if ctx.script is not None and not planted_code_acted(run.folder):
        # A script whose optimizer is not AdamW running single-tensor, or without DDP, or whose guard
        # never reached the attack's step: nothing to catch.
        return Outcome.not_applicable(attack, NEVER_REACHED if attack.script_patch else NEVER_ACTED, run)
    seen = "; ".join(f"{p.get('check')} ranks {p.get('ranks')} step {p.get('step')}" for _, _, _, p in alerts)
    return Outcome(
        attack,
        False,
        "",
        "",
        details=f"no alert naming rank(s) {sorted(wanted)}; seen: {seen or 'none'}",
        run=run,
    )


def _seconds_between(run: RunRecord, first: int, last: int) -> float | None:
    log = run.steps.get(0) or []
    spent = [entry["seconds"] for entry in log if first <= entry["step"] <= last]
    return sum(spent) if spent else None


# A checkpoint on the load path.

_PAYLOAD = f"cbuiltins\nprint\n(S'{MARKER}'\ntR.".encode()


def _resume(attack: Attack, ctx: Context) -> Outcome:
    from trainguard.provenance import PrivateKey, sign_path

    def prepare(folder: Path) -> list[str]:
        target = folder / "resume" / "step-0005.pt"
        target.parent.mkdir()
        if attack.resume == "altered":
            source = ctx.clean.folder / "ckpt" / "step-0005.pt"
            shutil.copy2(source, target)
            shutil.copy2(
                source.with_name(source.name + ".trainguard.sig"),
                target.with_name(target.name + ".trainguard.sig"),
            )
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0x01  # one bit of one weight
            target.write_bytes(bytes(data))
        else:
            with zipfile.ZipFile(target, "w") as archive:
                archive.writestr("step-0005/data.pkl", _PAYLOAD)
                archive.writestr("step-0005/version", "3\n")
            if attack.resume == "payload-signed":
                sign_path(target, PrivateKey.load(ctx.workspace.key_path))
        return ["--resume", str(target)]

    run = train(
        ctx.workspace, attack.name, world=ctx.world, steps=ctx.steps, device=ctx.device, prepare=prepare
    )
    ran = MARKER in run.output
    refused = [
        line for line in run.output.splitlines() if "refused to load" in line and "step-0005.pt" in line
    ]
    caught = bool(refused) and not ran and run.exit_code != 0
    exits = run.of_type("run.exit")
    return Outcome(
        attack,
        caught,
        "load gate" if refused else "",
        refused[0].split("refused to load ", 1)[1].replace(f"{run.folder}{os.sep}", "")[:200]
        if refused
        else "",
        evidence_index=exits[0][0] if exits and caught else None,
        details=("THE PAYLOAD RAN; " if ran else "")
        + (f"the job exited {run.exit_code}" if not refused else "the job stopped before training"),
        run=run,
    )


# Signals from another process.


def _signal(attack: Attack, ctx: Context) -> Outcome:
    target_rank = attack.expected_ranks[0]
    sig = signal.SIGKILL if attack.name == "sigkill-rank" else signal.SIGTERM
    sender: dict[str, int] = {}
    first = ledger_size(ctx.workspace)

    def during(folder: Path, supervisor: subprocess.Popen[str]) -> None:
        if ctx.script is not None:
            pid = _guarded_rank_process(ctx, first, supervisor, target_rank)
        else:
            pid = _trained_rank_pid(folder, supervisor, target_rank)
        if pid is None:
            return
        # The insider's own process: not the supervisor, not a rank.
        killer = subprocess.run(
            [sys.executable, "-c", f"import os; os.kill({pid}, {int(sig)}); print(os.getpid())"],
            capture_output=True,
            text=True,
            check=False,
        )
        if killer.stdout.strip().isdigit():
            sender["pid"] = int(killer.stdout.strip())

    run = train(
        ctx.workspace,
        attack.name,
        world=ctx.world,
        steps=ctx.steps,
        device=ctx.device,
        during=during,
        script=ctx.script,
    )
    if "pid" not in sender:
        return Outcome(attack, False, "", "", details="the drill could not find the rank's process", run=run)
    if sig == signal.SIGTERM:
        for index, _, rank, payload in run.of_type("run.signal"):
            if payload.get("sender_pid") == sender["pid"]:
                return Outcome(
                    attack,
                    True,
                    "supervisor: signal",
                    f"sender pid {sender['pid']} (uid {payload.get('sender_uid')}): "
                    f"{str(payload.get('sender_cmdline', ''))[:80]}; to rank {rank}",
                    evidence_index=index,
                    details=f"{payload.get('name')} recorded with its sender",
                    run=run,
                )
        return Outcome(
            attack, False, "", "", details=f"no run.signal names sender pid {sender['pid']}", run=run
        )
    # SIGKILL cannot be caught, so its sender cannot be known: the evidence is the rank lost and why (the
    # status reads "killed by SIGKILL" unless torchrun reaped the process before the supervisor looked).
    for index, _, rank, payload in run.of_type("run.rank_lost") + run.of_type("run.rank_exit"):
        if rank == target_rank:
            return Outcome(
                attack,
                run.exit_code != 0,
                "supervisor: rank lost",
                f"rank {rank} (pid {payload.get('pid')}): {payload.get('cause')}; a SIGKILL's sender cannot "
                "be known",
                evidence_index=index,
                details=str(payload.get("cause")),
                run=run,
            )
    return Outcome(attack, False, "", "", details="no rank exit records the SIGKILL", run=run)


def _trained_rank_pid(folder: Path, supervisor: subprocess.Popen[str], rank: int) -> int | None:
    """The built-in job's rank, once it has logged ATTACK_STEP steps (it writes its pid)."""
    log = folder / "out" / f"rank{rank}.steps.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and supervisor.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= ATTACK_STEP:
            break
        time.sleep(0.05)
    path = folder / "out" / f"rank{rank}.pid"
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _guarded_rank_process(
    ctx: Context, first: int, supervisor: subprocess.Popen[str], rank: int
) -> int | None:
    """A script's rank, found among the supervisor's processes once its guard has started (the ledger
    holds this run's monitor.start): a script writes no pid file, and before `trainguard.watch` no
    guard would report the signal's sender."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and supervisor.poll() is None:
        if any(event[1] == "monitor.start" for event in ledger_events(ctx.workspace, first)):
            return rank_process(supervisor.pid, rank)
        time.sleep(0.1)
    return None


# Offline: what a finished run left, edited, and the check that must see it.


def _trainguard(ctx: Context, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        env=ctx.workspace.environ(),
        timeout=300,
        check=False,
    )


def _saved_checkpoints(clean: RunRecord) -> list[Path]:
    """The files the clean run signed through `trainguard.save` (its provenance.sign events), oldest
    first, that are still there: the built-in job's checkpoints, or a script's wherever it saved them."""
    saved: dict[str, Path] = {}
    for _, _, _, payload in clean.of_type("provenance.sign"):
        path = Path(str(payload.get("path", "")))
        if payload.get("kind") == "file" and path.is_file():
            saved.pop(path.name, None)  # saved again: it counts as of its latest signing
            saved[path.name] = path
    return list(saved.values())


def _team_checkpoints(
    ctx: Context, attack: Attack, needed: int = 1
) -> tuple[Path, list[Path], dict[str, int]]:
    """A copy of the clean run's checkpoints, each signed by the team (`trainguard sign`, recorded in the
    ledger), for one attack to edit: every attack gets its own, so none depends on another's edits.
    Returns the folder, the copies oldest first and each file's signing entry in the ledger; raises
    NoCheckpoints when the clean run signed fewer than `needed`."""
    sources = _saved_checkpoints(ctx.clean)
    if len(sources) < needed:
        raise NoCheckpoints(
            NO_SIGNED_CHECKPOINT
            if not sources
            else f"not applicable: the attack needs {needed} signed checkpoints, the script saved "
            f"{len(sources)} through trainguard.save"
        )
    folder = ctx.workspace.root / "tampered" / attack.name / "ckpt"
    folder.mkdir(parents=True)
    first = ledger_size(ctx.workspace)
    for source in sources:
        shutil.copy2(source, folder / source.name)
        signed = _trainguard(ctx, "sign", str(folder / source.name), "--require-ledger")
        if signed.returncode != 0:
            raise SetupFailed(f"the drill could not sign {folder / source.name}: {signed.stderr.strip()}")
    indexes = {
        Path(payload["path"]).name: index
        for index, event_type, _, payload in ledger_events(ctx.workspace, first)
        if event_type == "provenance.sign"
    }
    return folder, [folder / source.name for source in sources], indexes


class NoCheckpoints(Exception):
    """The clean run left too few signed checkpoints for the attack; the reason it is not applicable."""


def _deleted(attack: Attack, ctx: Context) -> Outcome:
    ckpt, copies, signings = _team_checkpoints(ctx, attack)
    victim = copies[-1]
    victim.unlink()
    victim.with_name(victim.name + ".trainguard.sig").unlink()
    audit = _trainguard(ctx, "ckpt", "audit", str(ckpt), "--trust", str(_public(ctx)))
    missing = [
        line for line in audit.stdout.splitlines() if victim.name in line and "MISSING" in line.upper()
    ]
    return Outcome(
        attack,
        audit.returncode == 1 and bool(missing),
        "ckpt audit" if missing else "",
        missing[0].strip().replace(f"{ckpt}{os.sep}", "")[:200] if missing else "",
        evidence_index=signings.get(victim.name),
        details=f"{victim.name} and its signature deleted; ckpt audit exit {audit.returncode}",
    )


def _swapped(attack: Attack, ctx: Context) -> Outcome:
    ckpt, copies, signings = _team_checkpoints(ctx, attack, needed=2)
    oldest, *_, newest = copies
    for suffix in ("", ".trainguard.sig"):
        shutil.copy2(ckpt / f"{oldest.name}{suffix}", ckpt / f"{newest.name}{suffix}")
    verify = _trainguard(ctx, "verify", str(newest), "--trust", str(_public(ctx)))
    named = [line.strip() for line in verify.stdout.splitlines() if "renamed" in line or "signed as" in line]
    return Outcome(
        attack,
        verify.returncode == 1,
        "verify" if verify.returncode == 1 else "",
        named[0][:200] if named else "",
        evidence_index=signings.get(newest.name),
        details=f"{newest.name} replaced by a copy of {oldest.name} with its signature; "
        f"verify exit {verify.returncode}",
    )


def _ledger_copy(ctx: Context, name: str) -> Path:
    copy = ctx.workspace.root / "tampered" / name / "ledger.db"
    copy.parent.mkdir(parents=True)
    with sqlite3.connect(ctx.workspace.home / "ledger.db") as source, sqlite3.connect(copy) as target:
        source.backup(target)
    return copy


def _row_edited(attack: Attack, ctx: Context) -> Outcome:
    copy = _ledger_copy(ctx, attack.name)
    victim = ctx.clean.events[len(ctx.clean.events) // 2][0]
    with sqlite3.connect(copy) as db:
        db.execute(
            "UPDATE entries SET data = replace(data, '\"run_id\"', '\"run_jd\"') WHERE idx = ?", (victim,)
        )
    public = ctx.workspace.home / "keys" / "ledger.pub"
    verify = _trainguard(ctx, "ledger", "verify", "--store", str(copy), "--public-key", str(public))
    line = next((ln.strip() for ln in verify.stdout.splitlines() if "first bad index" in ln), "")
    return Outcome(
        attack,
        verify.returncode == 1 and line == f"first bad index: {victim}",
        "ledger verify" if verify.returncode == 1 else "",
        line,
        details=f"row {victim} edited in a copy of the ledger; verify exit {verify.returncode}",
    )


def _truncated(attack: Attack, ctx: Context) -> Outcome:
    # The drill keeps the head it saw, as a witness would: a consistent rollback leaves nothing else.
    head = _trainguard(ctx, "ledger", "head")
    note = ctx.workspace.root / "tampered" / "head.note"
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(head.stdout)
    copy = _ledger_copy(ctx, attack.name)
    keep = max(1, ctx.clean.events[0][0] + 1)
    with sqlite3.connect(copy) as db:
        db.execute("DELETE FROM entries WHERE idx >= ?", (keep,))
        db.execute("DELETE FROM checkpoints WHERE size > ?", (keep,))
        db.execute("DELETE FROM nodes WHERE (idx + 1) * (1 << level) > ?", (keep,))
    public = ctx.workspace.home / "keys" / "ledger.pub"
    alone = _trainguard(ctx, "ledger", "verify", "--store", str(copy), "--public-key", str(public))
    kept = _trainguard(
        ctx, "ledger", "verify", "--store", str(copy), "--public-key", str(public), "--checkpoint", str(note)
    )
    line = next(
        (ln.strip() for ln in kept.stdout.splitlines() if "rolled back" in ln or "first bad" in ln), ""
    )
    return Outcome(
        attack,
        kept.returncode == 1,
        "ledger verify against a kept head" if kept.returncode == 1 else "",
        line[:200],
        details=f"rows {keep}.. deleted with their checkpoints and hashes; verify alone exit "
        f"{alone.returncode}, against the head kept outside exit {kept.returncode}",
    )


def _public(ctx: Context) -> Path:
    return ctx.workspace.key_path.with_name("signing.pem.pub")


_OFFLINE = {
    "checkpoint-deleted": _deleted,
    "checkpoint-swapped": _swapped,
    "ledger-row-edited": _row_edited,
    "ledger-truncated": _truncated,
}
