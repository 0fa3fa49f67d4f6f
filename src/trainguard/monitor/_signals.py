"""Who sent this process a signal: the sender's pid, uid and command line, then the signal as usual.

Under `trainguard run` every process of the job starts with the catchable signals blocked (the supervisor
blocks them before it launches the job, and a block is inherited by every thread of every descendant).
`watch_signals` then takes each one with `sigwaitinfo`, which tells the sender, reports it, and delivers
it with the process's own disposition: a Python handler runs in the main thread, an ignored signal is
dropped, and a signal whose default is to terminate terminates the process exactly as it would have.
Standard library only: it runs inside rank processes.
"""

from __future__ import annotations

import _thread
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["CATCHABLE", "SignalEvent", "blocked", "read_cmdline", "signal_event", "watch_signals"]

CATCHABLE = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGQUIT,
)
_MAX_CMDLINE = 4096

log = logging.getLogger("trainguard")


@dataclasses.dataclass(frozen=True)
class SignalEvent:
    """A signal as received: its number and name, and who sent it (pid 0 and uid 0: the kernel)."""

    signal: int
    name: str
    sender_pid: int
    sender_uid: int
    sender_cmdline: str
    time: float

    def payload(self) -> dict[str, object]:
        """As JSON, for a heartbeat datagram or a ledger event."""
        return dataclasses.asdict(self)


def read_cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces; "" when it is gone or unreadable."""
    if pid <= 0:
        return ""
    try:
        with Path(f"/proc/{pid}/cmdline").open("rb") as handle:
            raw = handle.read(_MAX_CMDLINE)
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def signal_event(info: signal.struct_siginfo) -> SignalEvent:
    """The event for a signal taken by `sigwaitinfo`/`sigtimedwait`."""
    try:
        name = signal.Signals(info.si_signo).name
    except ValueError:
        name = f"signal {info.si_signo}"
    return SignalEvent(
        signal=info.si_signo,
        name=name,
        sender_pid=info.si_pid,
        sender_uid=info.si_uid,
        sender_cmdline=read_cmdline(info.si_pid),
        time=time.time(),
    )


def blocked() -> bool:
    """Whether every catchable signal is blocked in the calling thread."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return all(sig in mask for sig in CATCHABLE)


_callbacks: list[Callable[[SignalEvent], None]] = []
_lock = threading.Lock()
_thread_started = False


def watch_signals(on_signal: Callable[[SignalEvent], None]) -> bool:
    """Report every catchable signal to `on_signal`, then deliver it as the process would have.

    Returns False and does nothing unless the catchable signals are blocked in the calling thread (as
    they are in a job started by `trainguard run`). Calling it again adds another callback.
    """
    global _thread_started
    if not blocked():
        return False
    with _lock:
        _callbacks.append(on_signal)
        if not _thread_started:
            # The new thread inherits this thread's mask, so the signals stay blocked in it too.
            threading.Thread(target=_wait_loop, name="trainguard-signals", daemon=True).start()
            _thread_started = True
    return True


def _wait_loop() -> None:
    while True:
        info = signal.sigwaitinfo(CATCHABLE)
        event = signal_event(info)
        with _lock:
            callbacks = list(_callbacks)
        for callback in callbacks:
            _report(callback, event)
        _deliver(signal.Signals(info.si_signo))


def _report(callback: Callable[[SignalEvent], None], event: SignalEvent) -> None:
    try:
        callback(event)
    # A reporting failure must not stop the signal or the next one from being handled.
    except Exception:
        log.exception("trainguard: reporting %s failed", event.name)


def _deliver(sig: signal.Signals) -> None:
    handler = signal.getsignal(sig)
    if handler == signal.SIG_IGN:
        return
    if callable(handler):
        _thread.interrupt_main(sig)  # runs the Python handler in the main thread, as a signal would
        return
    # SIG_DFL (every catchable signal here terminates by default) or a handler set outside Python:
    # let the kernel deliver it to this thread alone, which is the only one not blocking it now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    try:
        os.kill(os.getpid(), sig)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
