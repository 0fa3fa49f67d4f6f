"""The allowlist policy: which imports a pickle may make. Anything else becomes a finding."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from trainguard._pickle.machine import Event
from trainguard.errors import PolicyError
from trainguard.findings import Finding, Severity
from trainguard.scan.allowlist import BUILTIN_ALLOWLIST
from trainguard.scan.denylist import is_critical

_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\.\*)?$")
_IDENTIFIER_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_importable_name(module: str, name: str) -> bool:
    """False when `__import__`/getattr would fail on these names before anything could run."""
    return bool(_IDENTIFIER_PATH.match(module) and _IDENTIFIER_PATH.match(name))


@functools.lru_cache(maxsize=4096)
def module_can_be_found(module: str) -> bool:
    """Whether `import module` could start here: its top-level name is in the standard library or
    on this interpreter's path. Searching for a top-level name runs nothing; the module is not
    imported. Used only for readings that are merely possible, where a name that cannot be
    imported means the load stops before anything runs.
    """
    root = module.split(".", 1)[0]
    if root in sys.stdlib_module_names or root in sys.builtin_module_names:
        return True
    try:
        return importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class Policy:
    """Allowed imports, each with the reason it is safe.

    Entries are exact `module.name` pairs, or `module.*` for every undotted name in exactly that
    module (a dotted name can walk attributes to anything, so a wildcard never covers one).
    """

    allowed: Mapping[str, str]
    wildcards: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def default(cls) -> Policy:
        return cls(dict(BUILTIN_ALLOWLIST))

    def extended(self, entries: Mapping[str, str]) -> Policy:
        allowed = dict(self.allowed)
        wildcards = dict(self.wildcards)
        for pattern, reason in entries.items():
            if not _PATTERN.match(pattern) or "." not in pattern:
                raise PolicyError(
                    f"invalid allow entry {pattern!r}",
                    hint="use module.name (e.g. sklearn.svm._classes.SVC) or module.*",
                )
            if pattern.endswith(".*"):
                wildcards[pattern[:-2]] = reason
            else:
                allowed[pattern] = reason
        return Policy(allowed, wildcards)

    def with_allowed(self, names: Iterable[str]) -> Policy:
        return self.extended(dict.fromkeys(names, "allowed on the command line"))

    def allows(self, module: str, name: str) -> bool:
        if f"{module}.{name}" in self.allowed:
            return True
        return module in self.wildcards and "." not in name

    def judge(self, event: Event, location: str, *, prefix: str = "") -> Finding | None:
        """The finding an event deserves under this policy, or None."""
        kind = event.kind
        if kind == "import":
            if self.allows(event.module, event.name):
                return None
            return _import_finding(event, location, prefix)
        if kind == "call":
            return None  # the import of the callable was already judged
        severity, rule, text = _STRUCTURAL[kind]
        subject = f" {event.qualname}" if event.module else ""
        message = f"{prefix}{text}{subject}: {event.detail}" if event.detail else f"{prefix}{text}{subject}"
        return Finding(rule, severity, message, location, event.pos)


_STRUCTURAL: dict[str, tuple[Severity, str, str]] = {
    "unresolved-import": (
        Severity.CRITICAL,
        "unresolved-import",
        "import whose name is computed at load time",
    ),
    "non-constant-call": (
        Severity.HIGH,
        "non-constant-call",
        "call of a callable that is not a plain import",
    ),
    "global-attribute-write": (Severity.CRITICAL, "global-attribute-write", "attribute write on import"),
    "global-mutation": (Severity.HIGH, "global-mutation", "in-place change of an imported object"),
    "extension": (Severity.HIGH, "extension-code", "import through the copyreg extension registry"),
    "container-misuse": (Severity.MEDIUM, "container-misuse", "container opcode on the wrong kind of value"),
}


def _import_finding(event: Event, location: str, prefix: str) -> Finding:
    qualname = event.qualname
    spelled = f" (written as {event.written_as})" if event.written_as else ""
    if is_critical(event.module, event.name):
        message = (
            f"{prefix}dangerous import {qualname}{spelled}: can run code or reach an importer when loaded"
        )
        return Finding("dangerous-import", Severity.CRITICAL, message, location, event.pos)
    message = (
        f"{prefix}unknown import {qualname}{spelled}: not on the allowlist; "
        f"if you trust it, allow it with --allow {qualname}"
    )
    return Finding("unknown-import", Severity.HIGH, message, location, event.pos)


def load_policy_file(path: Path) -> dict[str, str]:
    """Read `[scan.allow]` (name = "reason") from an explicitly given TOML policy file."""
    # Imported here: most scans have no policy file, and startup time counts on folder scans.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    scan = doc.get("scan", {})
    allow = scan.get("allow", {}) if isinstance(scan, dict) else None
    if isinstance(allow, list) and all(isinstance(x, str) for x in allow):
        return dict.fromkeys(allow, f"allowed by {path}")
    if isinstance(allow, dict) and all(isinstance(v, str) for v in allow.values()):
        return {str(k): str(v) for k, v in allow.items()}
    raise PolicyError(
        f'policy file {path}: [scan] allow must be a table of name = "reason" or a list of names',
        hint='example:\n[scan.allow]\n"sklearn.svm._classes.SVC" = "our baseline model"',
    )
