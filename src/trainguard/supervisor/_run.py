"""`trainguard run -- CMD...`: check, attest, launch, watch, and record how the job ended.

The catchable signals are blocked in the supervisor before any thread exists. Every thread then inherits
the block, and so does the job (a block survives fork and exec): a signal to the supervisor is taken by
its sigwaitinfo thread, which records the sender and stops the job; a signal to a job process is taken
by that process's own `watch_signals` thread, or, if it has none, found pending by the watcher.
Ledger events, all with the run id: run.attest, run.start, run.signal, run.rank_lost, run.exit, run.end.

With --server, every event goes through the run's spool to `trainguard serve` instead (`_reporting`), and
the job's own events (the guard's, its commands') come to the supervisor over a second socket: the job is
never given the token.
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trainguard.errors import UsageError
from trainguard.monitor._heartbeat import ENV_RUN_ID, ENV_SOCKET
from trainguard.monitor._signals import CATCHABLE, signal_event
from trainguard.relay._destination import SERVER_VARIABLES
from trainguard.relay._jobsocket import ENV_EVENTS
from trainguard.supervisor._attest import (
    build_attestation,
    code_state,
    config_state,
    sign_attestation,
    unsigned,
)
from trainguard.supervisor._jobevents import JobEvents, event_socket
from trainguard.supervisor._journal import Journal
from trainguard.supervisor._preflight import Refused, check_environment, check_inputs
from trainguard.supervisor._procs import JobProcesses, describe_wait_status, signal_name
from trainguard.supervisor._reporting import ServerRefusedLaunch, open_journal
from trainguard.supervisor._say import say
from trainguard.supervisor._watch import Watcher

__all__ = ["ENV_ENV_DIGEST", "ENV_SEED", "EXIT_SERVER_REFUSED", "cmd_run"]

ENV_ENV_DIGEST = "TRAINGUARD_ENV_DIGEST"
EXIT_SERVER_REFUSED = 4
"""`trainguard run --server` did not launch: the server refuses the token."""
ENV_SEED = "TRAINGUARD_SEED"
_TERMINATING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})
_TICK_S = 0.1
_LEFTOVER_WAIT_S = 1.0
_SOCKET_BUFFER = 1 << 20


def _say(message: str) -> None:
    say(message)


def new_run_id() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"run-{now}-{secrets.token_hex(4)}"


class _SignalDesk:
    """Takes every catchable signal sent to the supervisor: records its sender, then stops the job."""

    def __init__(self, journal: Journal, grace: float) -> None:
        self._journal = journal
        self._grace = grace
        self._lock = threading.Lock()
        self.job: JobProcesses | None = None
        self.received: list[int] = []
        self.forwarding = False
        self.deadline: float | None = None
        threading.Thread(target=self._loop, name="trainguard-signals", daemon=True).start()

    def _loop(self) -> None:
        while True:
            event = signal_event(signal.sigwaitinfo(CATCHABLE))
            self._journal.write("run.signal", {"to": "supervisor", "pid": os.getpid(), **event.payload()})
            sender = f"pid {event.sender_pid} (uid {event.sender_uid}): {event.sender_cmdline or '?'}"
            _say(f"received {event.name} from {sender}")
            self.forward(signal.Signals(event.signal))

    def forward(self, sig: signal.Signals) -> None:
        with self._lock:
            self.received.append(int(sig))
            job = self.job
        if job is None:
            return  # not launched yet: the launch is called off
        if sig in _TERMINATING:
            self.stop_job()
        else:
            pids = job.signal(sig)
            self._journal.write("run.forward", {"signal": int(sig), "name": sig.name, "pids": pids})

    def stop_job(self) -> None:
        """SIGTERM to every process of the job now; SIGKILL when the grace is over, or when asked twice."""
        with self._lock:
            job = self.job
            if job is None:
                return
            if self.forwarding:
                self.deadline = time.monotonic()
                return
            self.forwarding = True
            self.deadline = time.monotonic() + self._grace
        pids = job.signal(signal.SIGTERM)
        payload = {"signal": int(signal.SIGTERM), "name": "SIGTERM", "pids": pids, "grace_s": self._grace}
        self._journal.write("run.forward", payload)
        _say(f"stopping the job: SIGTERM to {len(pids)} process(es), SIGKILL after {self._grace:g} s")

    def launched(self, job: JobProcesses) -> bool:
        """Hand over the job; False if a signal came first (the caller must then stop it)."""
        with self._lock:
            self.job = job
            return not self.received


def _trusted(args: argparse.Namespace) -> list[Any]:
    from trainguard._cli_common import trusted_keys

    return trusted_keys(args, required=bool(args.baseline or args.input))


def _seeds(args: argparse.Namespace) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    if args.seed is not None:
        seeds["seed"] = args.seed
    if "PYTHONHASHSEED" in os.environ:
        seeds["PYTHONHASHSEED"] = os.environ["PYTHONHASHSEED"]
    return seeds


def _exit_code(info: os.waitid_result | None, on_behalf: dict[int, int], pid: int) -> tuple[int, str]:
    if info is None:
        return 128 + signal.SIGKILL, "unknown"
    if info.si_code == os.CLD_EXITED:
        return info.si_status, f"exited with status {info.si_status}"
    cause = describe_wait_status(info.si_status | (0x80 if info.si_code == os.CLD_DUMPED else 0))
    if pid in on_behalf:
        return 128 + on_behalf[pid], f"{cause} on behalf of a pending {signal_name(on_behalf[pid])}"
    return 128 + info.si_status, cause


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError(
            "no command to run: give it after --",
            hint="trainguard run [options] -- torchrun --nproc-per-node 8 train.py",
        )
    # First, before any thread exists, so that every thread and the job inherit the block.
    signal.pthread_sigmask(signal.SIG_BLOCK, CATCHABLE)
    if args.no_env_check:
        args.baseline = None  # one from $TRAINGUARD_ENV_BASELINE: the check it is for is skipped
    config = config_state(Path(args.config) if args.config is not None else None)
    trusted = _trusted(args)
    try:
        journal = open_journal(args, new_run_id)
    except ServerRefusedLaunch as exc:
        _say(exc.diagnostics())
        return EXIT_SERVER_REFUSED
    run_id = journal.run_id
    try:
        desk = _SignalDesk(journal, args.grace)
        return _run(args, command, run_id, journal, desk, config, trusted)
    finally:
        journal.close(args.flush_timeout)
        _report_delivery(journal)


def _report_delivery(journal: Journal) -> None:
    from trainguard.relay._outbox import leftover_message

    if journal.delivery is not None and journal.outbox is not None:
        message = leftover_message(journal.delivery, journal.outbox.spool_path, journal.run_id)
        _say(message or f"every event of run {journal.run_id} reached the server")


def _run(
    args: argparse.Namespace,
    command: list[str],
    run_id: str,
    journal: Journal,
    desk: _SignalDesk,
    config: dict[str, str] | None,
    trusted: list[Any],
) -> int:
    try:
        environment = check_environment(
            skip=args.no_env_check,
            python=args.python,
            baseline_path=args.baseline,
            trusted=trusted,
            command=command,
        )
        inputs = check_inputs([Path(p) for p in args.input], trusted)
    except Refused as exc:
        journal.write("run.refused", {"command": command, "reason": exc.message})
        raise
    journal.open()  # a ledger that cannot be written stops the run here (exit 3), before any launch
    attestation = build_attestation(
        command=command,
        code=code_state(Path.cwd()),
        environment=environment.summary,
        config=config,
        seeds=_seeds(args),
        inputs=inputs,
        environ=os.environ,
        run_id=run_id,
    )
    key = journal.signing_key()
    if key is None:
        _say("no ledger key on this host: the run attestation goes to the server unsigned")
    journal.write_now("run.attest", sign_attestation(attestation, key) if key else unsigned(attestation))
    if desk.received:
        _say("a signal came before the launch: not launching")
        return 128 + desk.received[0]
    directory = tempfile.mkdtemp(prefix="trainguard-run-")  # mode 0700: only this user reaches the socket
    try:
        return _launch(args, command, run_id, journal, desk, environment.digest, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _launch(
    args: argparse.Namespace,
    command: list[str],
    run_id: str,
    journal: Journal,
    desk: _SignalDesk,
    digest: str | None,
    directory: str,
) -> int:
    path = str(Path(directory) / "heartbeat.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel names each datagram's sender
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    sock.setblocking(False)
    env = {name: value for name, value in os.environ.items() if name not in SERVER_VARIABLES}
    env[ENV_RUN_ID] = run_id
    events_sock = None
    if journal.outbox is not None:
        # The job's events come here: the token stays in this process.
        events_sock = event_socket(str(Path(directory) / "events.sock"))
        env[ENV_EVENTS] = events_sock.getsockname()
    env[ENV_SOCKET] = path
    env.pop(ENV_ENV_DIGEST, None)  # a digest from an outer run must not pass for this one's
    if digest is not None:
        env[ENV_ENV_DIGEST] = digest
    if args.seed is not None:
        env[ENV_SEED] = str(args.seed)
    started = time.monotonic()
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True)
    except OSError as exc:
        journal.write("run.exit", {"pid": None, "cause": f"could not start: {exc.strerror or exc}"})
        sock.close()
        if events_sock is not None:
            events_sock.close()
        raise UsageError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    job = JobProcesses(child.pid)
    journal.write("run.start", {"pid": child.pid, "command": command, "heartbeat": path})
    events = JobEvents(events_sock, journal, job) if events_sock is not None else None
    if events is not None:
        events.start()
    watcher = Watcher(
        sock,
        journal,
        timeout=args.heartbeat_timeout,
        job=job,
        forwarded=lambda: desk.forwarding,
        stop_job=desk.stop_job,
    )
    watcher.start()
    if not desk.launched(job):
        desk.stop_job()  # a signal arrived while launching: stop what was started
    try:
        info = _wait(child, desk, job, journal)
        status, cause = _exit_code(info, watcher.on_behalf, child.pid)
        journal.write(
            "run.exit",
            {
                "pid": child.pid,
                "cause": cause,
                "exit_code": status,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        _say(f"job {cause}")
        _leftovers(job, journal)
    finally:
        watcher.stop()
        child.wait()
        sock.close()
        if events is not None:
            events.stop()
            journal.drain()  # the count of refused job events is final only once the queue is written
        if events_sock is not None:
            events_sock.close()
    journal.write(
        "run.end",
        {
            "exit_code": status,
            "ranks": watcher.ranks_seen(),
            "ranks_lost": watcher.lost,
            "datagrams": watcher.received,
            "datagrams_rejected": watcher.rejected,
            "signals_received": desk.received,
            **(
                {
                    "job_events": events.received,
                    "job_events_refused": events.refused + journal.job_events_refused,
                }
                if events is not None
                else {}
            ),
        },
    )
    return status


def _wait(
    child: subprocess.Popen[bytes], desk: _SignalDesk, job: JobProcesses, journal: Journal
) -> os.waitid_result | None:
    """Wait for the job's first process to exit, without reaping it (the watcher may read its status in
    /proc meanwhile); SIGKILL the job when the grace after a forwarded signal is over."""
    pidfd = os.pidfd_open(child.pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    killed = False
    try:
        while not poller.poll(int(_TICK_S * 1000)):
            if not killed and desk.deadline is not None and time.monotonic() >= desk.deadline:
                killed = True
                pids = job.signal(signal.SIGKILL)
                journal.write("run.kill", {"signal": int(signal.SIGKILL), "pids": pids, "why": "grace over"})
                _say(f"grace over: SIGKILL to {len(pids)} process(es)")
        return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
    finally:
        os.close(pidfd)


def _leftovers(job: JobProcesses, journal: Journal) -> None:
    """Processes of the job still alive after its first process exited: a moment to go, then SIGKILL."""
    deadline = time.monotonic() + _LEFTOVER_WAIT_S
    while (pids := [pid for pid in job.alive() if pid != job.root]) and time.monotonic() < deadline:
        time.sleep(_TICK_S)
    if pids:
        from trainguard.monitor._signals import read_cmdline

        journal.write("run.leftovers", {"pids": pids, "cmdlines": [read_cmdline(pid) for pid in pids]})
        _say(f"{len(pids)} process(es) of the job outlived it: SIGKILL")
        job.signal(signal.SIGKILL)
