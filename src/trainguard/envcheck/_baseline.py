"""The signed baseline of an environment: what `trainguard env snapshot` writes and `env verify` trusts.

The baseline is a JSON document: the layout, every file's size and SHA-256 (cached bytecode apart), links
and their targets, the distributions with their versions and entry points, the injection points that
were there when it was taken (accepted, so that verify reports only new ones), and the environment
digest. It is stored as an envelope::

    {"payloadType": "application/vnd.trainguard.env-baseline.v1+json",
     "payload": base64(canonical JSON), "signatures": [{"keyid": "sha256:...", "sig": base64}]}

The signature covers ``trainguard/env-baseline/v1\\n`` + the payload bytes, so verifying needs no
re-encoding: a 17,000-file baseline is checked and parsed in milliseconds, as quick mode needs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainguard._strictjson import loads_strict
from trainguard.errors import KeyFileError, UsageError, VerificationFailed
from trainguard.ledger._canonical import canonical_json
from trainguard.provenance import PrivateKey, PublicKey

__all__ = ["PAYLOAD_TYPE", "Baseline", "DistInfo", "environment_digest", "read_baseline", "write_baseline"]

PAYLOAD_TYPE = "application/vnd.trainguard.env-baseline.v1+json"
_SIGNED_PREFIX = b"trainguard/env-baseline/v1\n"
_MAX_BYTES = 256 << 20  # about a million files
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    version: str
    entry_points: tuple[tuple[str, str, str], ...]  # (group, name, value), sorted
    editable: bool
    anchor: str | None = None  # "sha256:<wheel digest>" when the digests came from the wheel's RECORD


@dataclasses.dataclass(frozen=True)
class Baseline:
    layout: Mapping[str, Any]  # prefix, base_prefix, version, is_venv, system_site
    roots: Mapping[str, str]  # label -> absolute path
    files: Mapping[str, tuple[int, str]]  # path -> (size, sha256 hex); cached bytecode excluded
    links: Mapping[str, str]  # path -> target
    bytecode: Mapping[str, str]  # cached .pyc path -> sha256 hex, as compiled when the baseline was taken
    distributions: Mapping[str, DistInfo]  # normalised name -> info
    injections: tuple[tuple[str, str], ...]  # (kind, path) accepted when the baseline was taken
    created: str
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", environment_digest(self.files, self.links, self.distributions))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "created": self.created,
            "layout": dict(self.layout),
            "roots": dict(self.roots),
            "files": {path: [size, digest] for path, (size, digest) in self.files.items()},
            "links": dict(self.links),
            "bytecode": dict(self.bytecode),
            "distributions": {
                key: {
                    "version": info.version,
                    "entry_points": [list(ep) for ep in info.entry_points],
                    "editable": info.editable,
                    "anchor": info.anchor,
                }
                for key, info in self.distributions.items()
            },
            "injections": [list(item) for item in self.injections],
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Baseline:
        """Validate every field; a malformed baseline is a VerificationFailed naming the field."""
        try:
            if not isinstance(doc, dict) or doc.get("version") != 1:
                raise ValueError("not a version 1 baseline")
            files = {}
            for path, value in _mapping(doc, "files").items():
                size, digest = value
                if (
                    type(size) is not int
                    or size < 0
                    or not isinstance(digest, str)
                    or not _HEX64.fullmatch(digest)
                ):
                    raise ValueError(f"files[{path!r}] is malformed")
                files[path] = (size, digest)
            bytecode = {}
            for path, digest in _mapping(doc, "bytecode").items():
                if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                    raise ValueError(f"bytecode[{path!r}] is malformed")
                bytecode[path] = digest
            links = {
                path: _str(target, f"links[{path!r}]") for path, target in _mapping(doc, "links").items()
            }
            dists = {}
            for key, info in _mapping(doc, "distributions").items():
                if not isinstance(info, dict):
                    raise ValueError(f"distributions[{key!r}] is malformed")
                points = tuple(
                    (_str(g, "entry point"), _str(n, "entry point"), _str(v, "entry point"))
                    for g, n, v in info["entry_points"]
                )
                anchor = info.get("anchor")
                dists[key] = DistInfo(
                    _str(info["version"], "version"),
                    points,
                    info["editable"] is True,
                    anchor and _str(anchor, "anchor"),
                )
            injections = tuple((_str(k, "injection"), _str(p, "injection")) for k, p in doc["injections"])
            baseline = cls(
                layout=_mapping(doc, "layout"),
                roots={
                    label: _str(path, f"roots[{label!r}]") for label, path in _mapping(doc, "roots").items()
                },
                files=files,
                links=links,
                bytecode=bytecode,
                distributions=dists,
                injections=injections,
                created=_str(doc["created"], "created"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationFailed(f"baseline {where} is malformed: {exc}") from None
        if baseline.digest != doc.get("digest"):
            raise VerificationFailed(f"baseline {where}: its digest does not match its contents")
        return baseline


def _mapping(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc[name]
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not an object")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def environment_digest(
    files: Mapping[str, tuple[int, str]], links: Mapping[str, str], distributions: Mapping[str, DistInfo]
) -> str:
    """One SHA-256 for the whole environment (paths, sizes, digests, links and distributions; not
    cached bytecode, which Python rewrites on its own), equal on every host that runs the same one."""
    doc = {
        "files": sorted([path, size, digest] for path, (size, digest) in files.items()),
        "links": sorted([path, target] for path, target in links.items()),
        "distributions": sorted([key, info.version] for key, info in distributions.items()),
    }
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_baseline(path: Path, baseline: Baseline, keys: Sequence[PrivateKey]) -> bytes:
    """The envelope bytes, written atomically to `path`; returns them."""
    from trainguard._cli_common import write_atomic

    payload = canonical_json(baseline.to_json())
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": key.key_id, "sig": base64.b64encode(key.sign(_SIGNED_PREFIX + payload)).decode()}
            for key in keys
        ],
    }
    data = json.dumps(envelope, indent=1).encode() + b"\n"
    write_atomic(path, data)
    return data


def read_baseline(path: Path, trusted: Iterable[PublicKey]) -> tuple[Baseline, PublicKey]:
    """The baseline in `path` and the trusted key that signed it.

    UsageError if it cannot be read; VerificationFailed if no trusted key signed it or it is malformed.
    """
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size  # read what is there: read(n) allocates n bytes
            data = handle.read(min(size, _MAX_BYTES) + 1)
    except OSError as exc:
        raise UsageError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_BYTES:
        raise VerificationFailed(f"baseline {path} is larger than {_MAX_BYTES >> 20} MiB")
    try:
        envelope = loads_strict(data)
        if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
            raise ValueError("not a trainguard environment baseline")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in envelope["signatures"]]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise VerificationFailed(f"baseline {path} is malformed: {exc}") from None
    keys = {key.key_id: key for key in trusted}
    if not keys:
        raise KeyFileError("no trusted keys to check the baseline with", hint="pass --trust KEY")
    message = _SIGNED_PREFIX + payload
    signer = next(
        (keys[kid] for kid, sig in signatures if kid in keys and keys[kid].verify(message, sig)), None
    )
    if signer is None:
        named = ", ".join(str(kid) for kid, _ in signatures) or "none"
        raise VerificationFailed(
            f"baseline {path} is not signed by a trusted key (signed by: {named})",
            hint="trust the key that took the baseline (--trust KEY), or take a new baseline",
        )
    try:
        doc = loads_strict(payload)
    except ValueError as exc:
        raise VerificationFailed(f"baseline {path} is malformed: {exc}") from None
    return Baseline.from_json(doc, str(path)), signer
