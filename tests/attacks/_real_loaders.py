"""Loads samples with the real loaders, in throwaway processes, recording every global they resolve.

Run as a script (``python -I _real_loaders.py``): it reads a JSON request on stdin and writes one
JSON line per (sample, loader) on stdout. It imports the loaders once, then forks a child for every
load, so nothing one sample does (a BUILD on a module object, a patched attribute) reaches another.

In each child an audit hook sees every ``pickle.find_class`` (the C and the pure-Python unpickler
both raise it, before they import anything). It records the name; a name outside the allowlist is
refused right there, by raising, so the import never happens and nothing of a payload runs. Process
creation, network access and library loading are refused the same way, in case any path to them
does not go through ``find_class``.

Request: ``{"samples": [path, ...], "loaders": [name, ...], "allowed": [module.name, ...],
"wildcards": [module, ...], "timeout": seconds, "memory": bytes}``.
Reply lines: ``{"sample": path, "loader": name, "resolved": [[module, name], ...],
"refused": [module, name] | null, "blocked": event | null, "outcome": "loaded" | "error" | "timeout" |
"killed", "error": text}``.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import os
import pickle
import resource
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Audit events that mean the load went on to do something only a payload does.
_FORBIDDEN_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "socket.connect",
    "socket.bind",
    "socket.getaddrinfo",
    "socket.sendto",
    "urllib.Request",
    "webbrowser.open",
)


class Refused(BaseException):
    """Raised from the audit hook: a BaseException, so a loader's `except Exception` cannot swallow it."""


def _allowed(module: str, name: str, allowed: set[str], wildcards: set[str]) -> bool:
    candidates = [(module, name)]
    # Protocols 0-2 map Python 2 names (the audit event shows the name before the mapping).
    if (module, name) in _compat_pickle.NAME_MAPPING:
        candidates.append(_compat_pickle.NAME_MAPPING[(module, name)])
    elif module in _compat_pickle.IMPORT_MAPPING:
        candidates.append((_compat_pickle.IMPORT_MAPPING[module], name))
    return any(f"{mod}.{nm}" in allowed or (mod in wildcards and "." not in nm) for mod, nm in candidates)


def _pickle_all(path: str, unpickler: Callable[[io.BufferedReader], Any]) -> None:
    """Every pickle in the file, one after another, as a loader that reads on after the first does."""
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            unpickler(f).load()


def _numpy(path: str) -> None:
    import numpy

    loaded = numpy.load(path, allow_pickle=True)
    if hasattr(loaded, "files"):  # an .npz loads its members lazily
        with loaded:
            for key in loaded.files:
                loaded[key]


def _torch(path: str) -> None:
    import torch

    torch.load(path, weights_only=False, map_location="cpu")  # trainguard: reviewed (audited sandbox)


def _joblib(path: str) -> None:
    import joblib

    joblib.load(path)  # trainguard: reviewed (audited sandbox)


LOADERS: dict[str, Callable[[str], None]] = {
    "pickle": lambda p: _pickle_all(p, pickle.Unpickler),  # trainguard: reviewed (audited sandbox)
    "pickle-py": lambda p: _pickle_all(p, pickle._Unpickler),  # type: ignore[attr-defined]
    "numpy": _numpy,
    "torch": _torch,
    "joblib": _joblib,
}


def _child(path: str, loader: str, request: dict[str, Any], out: int) -> None:
    allowed = set(request["allowed"])
    wildcards = set(request["wildcards"])
    record: dict[str, Any] = {"resolved": [], "refused": None, "blocked": None}

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "pickle.find_class":
            module, name = str(args[0]), str(args[1])
            record["resolved"].append([module, name])
            if not _allowed(module, name, allowed, wildcards):
                if record["refused"] is None:
                    record["refused"] = [module, name]
                raise Refused(f"{module}.{name}")
        elif event.startswith(_FORBIDDEN_EVENTS):
            if record["blocked"] is None:
                record["blocked"] = event
            raise Refused(event)

    memory = int(request["memory"])
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + memory, resource.RLIM_INFINITY))
    sys.addaudithook(hook)
    try:
        LOADERS[loader](path)
        record["outcome"] = "loaded"
    except BaseException as exc:  # every way a load can end is data here
        record["outcome"] = "error"
        record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    os.write(out, json.dumps(record).encode())


def _address_space() -> int:
    return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(path: str, loader: str, request: dict[str, Any]) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the throwaway child
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        try:
            _child(path, loader, request, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + float(request["timeout"])
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_end], [], [], left)
        if not ready:
            continue
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    result: dict[str, Any] = {"sample": path, "loader": loader}
    if timed_out:
        result.update(resolved=[], refused=None, blocked=None, outcome="timeout", error="")
    elif not chunks:
        result.update(resolved=[], refused=None, blocked=None, outcome="killed", error=f"status {status}")
    else:
        result.update(json.loads(b"".join(chunks)))
        result.setdefault("error", "")
    return result


def main() -> int:
    request = json.load(sys.stdin)
    # Import every loader once here, before any sample is touched, so children only fork.
    import joblib  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401

    for path in request["samples"]:
        for loader in request["loaders"]:
            print(json.dumps(_run_one(path, loader, request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
