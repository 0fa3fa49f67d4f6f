"""The client side of C2SP tlog-witness: submit a signed checkpoint and get it cosigned.

`add_checkpoint` is one request. `witness_checkpoint` is the whole exchange: it retries once with the
witness's own size after a 409, and turns the witness's answers into verdicts. A witness that has cosigned
a larger tree than the log now holds is evidence of a rollback; a consistency proof the witness rejects,
or a different root at the same size, is evidence of a fork. Both raise VerificationFailed.
"""

from __future__ import annotations

import base64
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger._keys import VerifierKey
from trainguard.ledger._note import Checkpoint, Note, verify_cosignature
from trainguard.ledger._witness import SIZE_CONTENT_TYPE

__all__ = [
    "WitnessConflict",
    "WitnessRefused",
    "WitnessUnreachable",
    "add_checkpoint",
    "witness_checkpoint",
]

_MAX_RESPONSE_BYTES = 64 * 1024
_MAX_ATTEMPTS = 3  # the first try, the retry at the witness's size, one more if another client raced us


class WitnessUnreachable(UsageError):
    """The witness could not be reached or did not answer in HTTP."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the witness at {url}: {reason}",
            hint="check the witness URL and that the witness is running",
        )
        self.url = url


class WitnessRefused(VerificationFailed):
    """The witness answered with an error status; `status` is the HTTP status code."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        super().__init__(f"the witness at {url} refused the checkpoint ({status}): {detail}")
        self.url = url
        self.status = status
        self.detail = detail


class WitnessConflict(WitnessRefused):
    """409: the old size sent is not what the witness last cosigned; `witness_size` is what it did cosign."""

    def __init__(self, url: str, witness_size: int) -> None:
        super().__init__(url, 409, f"the witness has cosigned size {witness_size}")
        self.witness_size = witness_size


def _endpoint(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        # urllib would also open file:// and ftp:// URLs; a witness speaks HTTP only.
        raise UsageError(f"the witness URL {url!r} is not an http:// or https:// URL")
    url = url.rstrip("/")
    return url if url.endswith("/add-checkpoint") else url + "/add-checkpoint"


def _read_bounded(response: http.client.HTTPResponse | urllib.error.HTTPError) -> bytes:
    return bytes(response.read(_MAX_RESPONSE_BYTES + 1))


def add_checkpoint(url: str, note: str, old_size: int, proof: Sequence[bytes], timeout: float = 10) -> str:
    """POST one add-checkpoint request; returns the response's signature lines.

    Raises WitnessConflict (409, with the witness's size), WitnessRefused (other statuses) or
    WitnessUnreachable (network errors, timeouts, garbage instead of HTTP).
    """
    if old_size < 0:
        raise ValueError("old size cannot be negative")
    lines = [f"old {old_size}\n"] + [base64.b64encode(node).decode("ascii") + "\n" for node in proof]
    body = ("".join(lines) + "\n" + note).encode("utf-8")
    endpoint = _endpoint(url)
    request = urllib.request.Request(endpoint, data=body, method="POST")
    request.add_header("Content-Type", "text/plain; charset=utf-8")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            data = _read_bounded(response)
    except urllib.error.HTTPError as error:
        status = error.code
        data = _read_bounded(error)
        if status == 409:
            raise WitnessConflict(
                url, _parse_size(url, error.headers.get("Content-Type", ""), data)
            ) from None
        detail = data[:300].decode("utf-8", errors="replace").strip() or str(error.reason)
        raise WitnessRefused(url, status, detail) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WitnessUnreachable(url, str(reason)) from None
    if status != 200:
        raise WitnessRefused(url, status, "unexpected status")
    if len(data) > _MAX_RESPONSE_BYTES:
        raise WitnessRefused(url, status, "the response is too large")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise WitnessRefused(url, status, "the response is not UTF-8") from None
    if not text.endswith("\n") or not all(line.startswith("\u2014 ") for line in text[:-1].split("\n")):
        raise WitnessRefused(url, status, "the response is not a list of signature lines")
    return text


def _parse_size(url: str, content_type: str, data: bytes) -> int:
    text = data.decode("ascii", errors="replace")
    if content_type.split(";")[0].strip() != SIZE_CONTENT_TYPE or not text.endswith("\n"):
        raise WitnessRefused(url, 409, "conflict without a size (wrong Content-Type or body)")
    digits = text[:-1]
    if (
        not digits.isascii()
        or not digits.isdigit()
        or len(digits) > 19
        or (digits != "0" and digits[0] == "0")
    ):
        raise WitnessRefused(url, 409, "conflict with a malformed size")
    return int(digits)


def witness_checkpoint(
    url: str,
    note: str,
    latest: Checkpoint,
    proof_from: Callable[[int], list[bytes]],
    witness_key: VerifierKey,
    known_size: int = 0,
    timeout: float = 10,
) -> tuple[str, int]:
    """Have the witness at `url` cosign `note` (whose checkpoint is `latest`); returns (line, timestamp).

    `known_size` is the size this witness last cosigned as far as the caller knows (0: unknown);
    `proof_from(n)` returns the consistency proof from size n to `latest.size`. The returned cosignature
    line is verified with `witness_key` before it is returned.
    """
    if Note.parse(note).text.encode("utf-8") != latest.body():
        raise UsageError("the note to be witnessed is not the checkpoint given as the latest")
    old = known_size if 0 <= known_size <= latest.size else 0
    for _ in range(_MAX_ATTEMPTS):
        proof = proof_from(old) if 0 < old < latest.size else []
        try:
            lines = add_checkpoint(url, note, old, proof, timeout=timeout)
            break
        except WitnessConflict as conflict:
            witness_size = conflict.witness_size
            if witness_size > latest.size:
                raise VerificationFailed(
                    f"rollback: the witness has cosigned size {witness_size} for origin {latest.origin}, "
                    f"the log now has only {latest.size} entries",
                    index=latest.size,
                    hint=f"the witness at {url} saw a longer log; entries were removed or replaced",
                ) from None
            if witness_size == old == latest.size:
                raise VerificationFailed(
                    f"fork: the witness at {url} has cosigned a different root at size {witness_size} "
                    f"for origin {latest.origin}",
                    hint="the log's history was rewritten after the witness cosigned it",
                ) from None
            old = witness_size
        except WitnessRefused as refused:
            if refused.status == 422:
                raise VerificationFailed(
                    f"fork: the witness at {url} has cosigned size {old} for origin {latest.origin}, and the "
                    f"log's consistency proof from that size to {latest.size} does not match it",
                    hint="the log's history was rewritten after the witness cosigned it",
                ) from None
            raise
    else:
        raise WitnessRefused(url, 409, "the witness's size kept changing; another client is submitting")
    mine = [line + "\n" for line in lines[:-1].split("\n") if line.startswith(f"\u2014 {witness_key.name} ")]
    if not mine:
        raise VerificationFailed(f"the witness at {url} returned no cosignature by {witness_key.ident}")
    for line in mine:
        try:
            timestamp = verify_cosignature(latest.body().decode("utf-8") + "\n" + line, witness_key)
        except VerificationFailed:
            continue
        return line, timestamp
    raise VerificationFailed(f"the witness at {url} returned no valid cosignature by {witness_key.ident}")
