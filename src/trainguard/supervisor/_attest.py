"""The run attestation: what was launched, from which code, in which environment, by whom, signed.

Its RFC 8785 canonical JSON is signed with the ledger's Ed25519 key and recorded as a `run.attest` event
whose payload is {"attestation": ..., "signature": base64, "key": verifier key text, "key_id": ...}.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainguard.errors import UsageError
from trainguard.ledger._canonical import canonical_json
from trainguard.ledger._keys import SigningKey, VerifierKey, b64decode_strict

__all__ = [
    "build_attestation",
    "code_state",
    "config_state",
    "sign_attestation",
    "unsigned",
    "verify_attestation",
    "world_size",
]

_GIT_TIMEOUT_S = 30
_TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")
# torchrun options that take no value.
_TORCHRUN_FLAGS = frozenset(
    {"--standalone", "--no-python", "--no_python", "-m", "--module", "--run-path", "--run_path"}
)


def _git(args: Sequence[str], cwd: Path) -> bytes | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=_GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_state(cwd: Path) -> dict[str, Any]:
    """The git revision of `cwd`, the SHA-256 of its uncommitted changes (`git diff HEAD`), its top level."""
    revision = _git(["rev-parse", "HEAD"], cwd)
    root = _git(["rev-parse", "--show-toplevel"], cwd)
    diff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], cwd) if revision is not None else None
    return {
        "revision": revision.decode().strip() if revision else None,
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff is not None else None,
        "root": root.decode().strip() if root else None,
    }


def config_state(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    return {"path": os.path.realpath(path), "sha256": digest.hexdigest()}


def _option(args: Sequence[str], names: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def _launcher_args(command: Sequence[str]) -> Sequence[str] | None:
    """The arguments of a torchrun launch, up to the training script; None when it is not one."""
    name = Path(command[0]).name if command else ""
    if name == "torchrun":
        args = command[1:]
    elif re.fullmatch(r"python[0-9.]*", name) and len(command) > 2 and command[1] == "-m":
        if command[2] not in _TORCHRUN_MODULES:
            return None
        args = command[3:]
    else:
        return None
    takes_value = False
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            takes_value = "=" not in arg and arg not in _TORCHRUN_FLAGS
        elif takes_value:
            takes_value = False
        else:
            return args[:i]  # the training script: what follows are its own arguments
    return args


def world_size(command: Sequence[str], environ: Mapping[str, str]) -> int | None:
    """$WORLD_SIZE, else torchrun's --nproc-per-node x --nnodes when both are numbers, else None."""
    value = environ.get("WORLD_SIZE", "")
    if value.isdigit():
        return int(value)
    args = _launcher_args(command)
    if args is None:
        return None
    nproc = _option(args, ("--nproc-per-node", "--nproc_per_node")) or "1"
    nnodes = _option(args, ("--nnodes",)) or "1"
    low, _, high = nnodes.partition(":")
    if high and high != low:
        return None  # elastic: the size is known only once the nodes have joined
    if not (nproc.isdigit() and low.isdigit()):
        return None  # "auto", "gpu": decided by the launcher on each node
    return int(nproc) * int(low)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):
        return str(os.getuid())


def build_attestation(
    *,
    command: Sequence[str],
    code: Mapping[str, Any],
    environment: Mapping[str, Any],
    config: Mapping[str, str] | None,
    seeds: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]],
    environ: Mapping[str, str],
    run_id: str,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "command": list(command),
        "code": dict(code),
        "environment": dict(environment),
        "config": dict(config) if config is not None else None,
        "seeds": dict(seeds),
        "world_size": world_size(command, environ),
        "hosts": [socket.gethostname()],
        "user": _user(),
        "uid": os.getuid(),
        "inputs": [dict(item) for item in inputs],
    }


def sign_attestation(attestation: Mapping[str, Any], key: SigningKey) -> dict[str, Any]:
    """The `run.attest` payload: the attestation with an Ed25519 signature of its canonical JSON."""
    signature = key.sign(canonical_json(dict(attestation)))
    return {
        "attestation": dict(attestation),
        "signature": base64.b64encode(signature).decode("ascii"),
        "key": key.verifier().text(),
        "key_id": key.ident,
    }


def unsigned(attestation: Mapping[str, Any]) -> dict[str, Any]:
    """The `run.attest` payload of a host without the ledger's key (reporting to a server): the same
    fields, with no signature, so that no reader can take it for a signed one."""
    return {"attestation": dict(attestation), "signature": None, "key": None, "key_id": None}


def verify_attestation(payload: Mapping[str, Any], trusted: VerifierKey) -> bool:
    """Whether a `run.attest` payload is signed by `trusted` (e.g. the ledger's own verifier key)."""
    try:
        signature = b64decode_strict(payload["signature"])
        message = canonical_json(payload["attestation"])
    except (KeyError, TypeError, ValueError):
        return False
    return trusted.verify(message, signature)
