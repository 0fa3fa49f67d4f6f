"""The trainguard error tree and the exit codes every command shares.

TrainguardError                  root; diagnostics() says what to do next
├── UsageError                   bad flags, bad policy file, missing path (exit 2)
│   └── PolicyError              a policy file that cannot be read or is malformed
│   └── KeyFileError             a key file that is missing, malformed or readable by others
├── MissingExtraError            an optional dependency is not installed (exit 2)
├── VerificationFailed           evidence does not verify: tampering or a wrong key (exit 1)
├── IntegrityError               a training job failed an in-job integrity check (exit 1)
├── StoreError                   the ledger store cannot be opened or written (exit 3)
└── UndecidableError             the input could not be fully analysed (exit 3, fail closed)
    ├── LimitExceeded            a size, depth, count or ratio limit was reached
    ├── MalformedArtifact        truncated or structurally invalid bytes
    └── UnsupportedFormat        a format or feature we cannot analyse
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes are API: scripts and CI gates depend on them."""

    CLEAN = 0
    FINDINGS = 1
    USAGE = 2
    UNDECIDED = 3


class TrainguardError(Exception):
    """Root of every error trainguard raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """A message for a person: what went wrong and, where known, what to do."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def __str__(self) -> str:
        # A traceback shows str(exc): the fix must be in it, not only in an attribute nobody prints.
        return self.diagnostics()


class UsageError(TrainguardError):
    """The command line or its configuration cannot be used as given."""

    exit_code = ExitCode.USAGE


class PolicyError(UsageError):
    """A policy file that cannot be read or does not follow the schema."""


class KeyFileError(UsageError):
    """A key file that is missing, malformed, of the wrong kind or readable by other users."""


class MissingExtraError(TrainguardError):
    """An optional dependency needed for this operation is not installed."""

    exit_code = ExitCode.USAGE

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed",
            hint=f"pip install 'trainguard[{extra}]'",
        )
        self.package = package
        self.extra = extra


class VerificationFailed(TrainguardError):
    """Signed or hashed evidence does not check out; `index` names the first bad ledger entry, if known."""

    exit_code = ExitCode.FINDINGS

    def __init__(self, message: str, *, index: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.index = index


class IntegrityError(TrainguardError):
    """A training job failed an integrity check: every rank raises it at the same step.

    `check` names the check (e.g. "fingerprint"), `ranks` the ranks at fault (empty when no rank could
    be singled out), `step` the optimizer step the check ran after.
    """

    exit_code = ExitCode.FINDINGS

    def __init__(
        self, message: str, *, check: str, ranks: tuple[int, ...], step: int, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.check = check
        self.ranks = ranks
        self.step = step


class StoreError(TrainguardError):
    """The ledger's database cannot be reached, opened or written; nothing is reported as verified."""

    exit_code = ExitCode.UNDECIDED


class NoLedgerError(StoreError):
    """Nothing is there yet: the ledger's file, schema or tables do not exist (and were not to be made)."""


class UndecidableError(TrainguardError):
    """The input could not be analysed completely; the verdict fails closed."""

    exit_code = ExitCode.UNDECIDED

    def __init__(self, message: str, *, offset: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.offset = offset


class LimitExceeded(UndecidableError):
    """A resource limit was reached before the analysis could finish."""


class MalformedArtifact(UndecidableError):
    """The bytes are truncated or violate the format's structure."""


class UnsupportedFormat(UndecidableError):
    """A format, compression method or feature that cannot be analysed."""
