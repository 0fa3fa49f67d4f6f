"""What `trainguard keygen`, `trainguard ledger ...` and `trainguard witness serve` do."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from trainguard.errors import ExitCode, KeyFileError, UsageError, VerificationFailed
from trainguard.ledger._events import new_event
from trainguard.ledger._keys import ALG_COSIGNATURE_V1, ALG_ED25519, SigningKey, VerifierKey
from trainguard.ledger._ledger import Ledger, default_key_path
from trainguard.ledger._merkle import leaf_hash, verify_consistency, verify_inclusion
from trainguard.ledger._note import Checkpoint, open_checkpoint
from trainguard.ledger._verify import LedgerExport, VerifyReport, verify_ledger
from trainguard.ledger._witness_client import witness_checkpoint

EXPORT_FORMAT = "trainguard-ledger-export"
EXPORT_VERSION = 1
_MAX_PAYLOAD_BYTES = 1 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _verifier_arg(value: str, alg: int, what: str) -> VerifierKey:
    """A verifier key given as its text or as a file holding it."""
    path = Path(value)
    if "+" not in value or path.is_file():
        return VerifierKey.load(path, alg=alg)
    try:
        return VerifierKey.from_text(value, alg=alg)
    except KeyFileError as exc:
        raise KeyFileError(f"{what}: {exc.message}", hint=exc.hint) from None


def _trusted_key(args: argparse.Namespace) -> tuple[VerifierKey | None, str]:
    """The ledger key to verify against, and where it came from; None: the one recorded in the store."""
    if args.public_key:
        return _verifier_arg(args.public_key, ALG_ED25519, "--public-key"), "--public-key"
    default_public = default_key_path().with_suffix(".pub")
    if args.store is None and default_public.is_file():
        return VerifierKey.load(default_public, alg=ALG_ED25519), str(default_public)
    return None, ""


def _open(args: argparse.Namespace, *, key: SigningKey | None = None, create: bool = False) -> Ledger:
    """The ledger of --store (default: the default one). Only appends create it: a command that reads
    a ledger that does not exist says so, and leaves no key or database behind."""
    return Ledger.open(args.store, key=key, create=create)


# keygen


def cmd_keygen(args: argparse.Namespace) -> int:
    if not args.name:
        raise UsageError("a ledger or witness key needs --name (for a ledger key, the ledger's origin)")
    alg = ALG_COSIGNATURE_V1 if args.witness else ALG_ED25519
    try:
        key = SigningKey.generate(args.name, alg=alg)
    except ValueError as exc:
        raise UsageError(f"cannot make a key named {args.name!r}: {exc}") from None
    public_path = args.out.with_name(args.out.name + ".pub")
    if public_path.exists():
        raise KeyFileError(f"{public_path} already exists; keys are never overwritten")
    key.save(args.out)
    key.verifier().save(public_path)
    print(key.verifier().text())
    print(f"private key: {args.out} (mode 0600); public key: {public_path}", file=sys.stderr)
    return int(ExitCode.CLEAN)


# append


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    if args.payload_file is not None:
        where = "stdin" if str(args.payload_file) == "-" else str(args.payload_file)
        try:
            if str(args.payload_file) == "-":
                text = sys.stdin.read(_MAX_PAYLOAD_BYTES + 1)
            else:
                with args.payload_file.open(encoding="utf-8") as handle:
                    text = handle.read(_MAX_PAYLOAD_BYTES + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the payload from {where}: {exc}") from None
    elif args.payload is not None:
        where, text = "--payload", args.payload
    else:
        return {}
    if len(text) > _MAX_PAYLOAD_BYTES:
        raise UsageError(f"the payload from {where} is over {_MAX_PAYLOAD_BYTES} bytes")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"the payload from {where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"the payload from {where} must be a JSON object, not {type(value).__name__}")
    return value


def cmd_append(args: argparse.Namespace) -> int:
    key = SigningKey.load(args.key, alg=ALG_ED25519) if args.key is not None else None
    event = new_event(args.event_type, _payload(args), run_id=args.run_id, rank=args.rank)
    with _open(args, key=key, create=True) as ledger:
        index = ledger.append(event)
        print(f"{index}")
        print(f"appended entry {index} to {ledger.location} ({ledger.origin})", file=sys.stderr)
    return int(ExitCode.CLEAN)


# head


def _witness(ledger: Ledger, args: argparse.Namespace, checkpoint: Checkpoint, note: str) -> str:
    """Have the witness cosign the latest checkpoint; returns the note with the cosignature."""
    if not args.witness_key:
        raise UsageError("--witness needs --witness-key, the witness's verifier key")
    witness_key = _verifier_arg(args.witness_key, ALG_COSIGNATURE_V1, "--witness-key")
    known = 0
    for size, _ in ledger.store.checkpoints():
        if size < checkpoint.size and any(
            name == witness_key.ident for name, _ in ledger.store.cosignatures(size)
        ):
            known = size
    line, _ = witness_checkpoint(
        args.witness,
        note,
        checkpoint,
        lambda old: ledger.consistency_proof(old, checkpoint.size),
        witness_key,
        known_size=known,
    )
    ledger.add_cosignature(checkpoint.size, witness_key.ident, line)
    return note + line


def cmd_head(args: argparse.Namespace) -> int:
    key, _ = _trusted_key(args)
    with _open(args) as ledger:
        checkpoint, note = ledger.head()
        if key is not None:
            checkpoint = open_checkpoint(note, key)
        if args.witness:
            note = _witness(ledger, args, checkpoint, note)
        sys.stdout.write(note)
    return int(ExitCode.CLEAN)


# verify


def _read_checkpoint(path: Path, key: VerifierKey) -> Checkpoint:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    try:
        return open_checkpoint(data, key)
    except VerificationFailed as exc:
        raise VerificationFailed(f"checkpoint {path}: {exc.message}", hint=exc.hint) from None


def _read_export(path: Path) -> tuple[dict[str, Any], LedgerExport]:
    """The export's header, its checkpoint notes, and its entries streamed from the file.

    An export holds a header line, then every checkpoint, then every entry: the notes are read at once and
    the entries as the verifier consumes them, so memory stays bounded.
    """
    try:
        handle: TextIO = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read export {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(handle.readline() or "null")
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{path} is not a trainguard ledger export")
    if header.get("version") != EXPORT_VERSION:
        raise UsageError(f"{path}: export version {header.get('version')!r} is not supported")
    notes: list[str] = []
    number = 1
    first: tuple[int, bytes] | None = None
    for line in handle:
        number += 1
        record = _export_record(path, number, line)
        if isinstance(record, str):
            notes.append(record)
        else:
            first = record
            break

    def entries() -> Iterator[tuple[int, bytes]]:
        if first is None:
            return
        yield first
        for count, line in enumerate(handle, number + 1):
            record = _export_record(path, count, line)
            if isinstance(record, str):
                raise VerificationFailed(f"{path} line {count}: a checkpoint after the entries")
            yield record
        handle.close()

    return header, LedgerExport(entries=entries(), notes=notes, origin=header.get("origin"))


def _export_record(path: Path, number: int, line: str) -> str | tuple[int, bytes]:
    """A checkpoint note, or (index, entry bytes), from one export line."""
    try:
        record = json.loads(line)
    except ValueError:
        raise VerificationFailed(f"{path} line {number} is not JSON") from None
    if isinstance(record, dict) and isinstance(record.get("checkpoint"), str):
        return str(record["checkpoint"])
    if isinstance(record, dict) and isinstance(record.get("entry"), str) and type(record.get("index")) is int:
        return int(record["index"]), str(record["entry"]).encode("utf-8")
    raise VerificationFailed(f"{path} line {number} is neither an entry nor a checkpoint")


def _report_text(report: VerifyReport, where: str, origin: str, key: VerifierKey, key_source: str) -> str:
    lines = []
    if report.ok:
        root = _b64(report.root) if report.root is not None else "-"
        lines.append(
            f"{where} ({origin}): verified {report.entries_checked} entries, "
            f"{report.checkpoints_checked} checkpoints, {report.nodes_checked} stored hashes; "
            f"size {report.size}, root {root}"
        )
    else:
        lines.append(f"{where} ({origin}): VERIFICATION FAILED")
        if report.first_bad_index is not None:
            lines.append(f"  first bad index: {report.first_bad_index}")
        lines.extend(f"  - {problem}" for problem in report.problems)
    lines.append(f"  key: {key.ident} ({key_source})")
    return "\n".join(lines) + "\n"


def cmd_verify(args: argparse.Namespace) -> int:
    key, key_source = _trusted_key(args)
    warnings: list[str] = []
    if args.export is not None:
        header, export = _read_export(args.export)
        if key is None:
            key = _verifier_arg(str(header.get("verifier", "")), ALG_ED25519, "the export's key")
            key_source = "written in the export itself"
            warnings.append(
                "verified against the key written in the export; pass --public-key with a copy kept "
                "elsewhere to detect a replaced key"
            )
        trusted = _read_checkpoint(args.checkpoint, key) if args.checkpoint else None
        report = verify_ledger(export, key, trusted)
        where, origin = str(args.export), str(header.get("origin"))
    else:
        with _open(args) as ledger:
            if key is None:
                key, key_source = ledger.verifier, "recorded in the store itself"
                warnings.append(
                    "verified against the key recorded in the store; pass --public-key with a copy kept "
                    "elsewhere to detect a replaced key"
                )
            trusted = _read_checkpoint(args.checkpoint, key) if args.checkpoint else None
            report = verify_ledger(ledger.store, key, trusted)
            where, origin = ledger.location, ledger.origin
            if report.ok and args.witness:
                checkpoint, note = ledger.head()
                try:
                    cosigned = _witness(ledger, args, checkpoint, note)
                except VerificationFailed as exc:
                    report = _failed(report, f"witness {args.witness}: {exc.message}", exc.index)
                else:
                    witness_line = cosigned[len(note) :].strip()
                    warnings.append(f"witness {args.witness} cosigned size {checkpoint.size}: {witness_line}")
    for warning in warnings:
        print(f"trainguard: {warning}", file=sys.stderr)
    if args.format == "json":
        document = {
            "schema_version": "1",
            "ok": report.ok,
            "location": where,
            "origin": origin,
            "key": key.ident,
            "size": report.size,
            "root": _b64(report.root) if report.root is not None else None,
            "first_bad_index": report.first_bad_index,
            "problems": report.problems,
            "entries_checked": report.entries_checked,
            "checkpoints_checked": report.checkpoints_checked,
        }
        print(json.dumps(document, indent=2))
    else:
        sys.stdout.write(_report_text(report, where, origin, key, key_source))
    return int(ExitCode.CLEAN if report.ok else ExitCode.FINDINGS)


def _failed(report: VerifyReport, problem: str, index: int | None) -> VerifyReport:
    first = report.first_bad_index
    if index is not None and (first is None or index < first):
        first = index
    return dataclasses.replace(report, ok=False, problems=[*report.problems, problem], first_bad_index=first)


# prove


def cmd_prove(args: argparse.Namespace) -> int:
    key, _ = _trusted_key(args)
    with _open(args) as ledger:
        size = ledger.size if args.size is None else args.size
        checkpoint, note = ledger.checkpoint(size) if size else (None, "")
        if checkpoint is not None and key is not None:
            checkpoint = open_checkpoint(note, key)
        root = ledger.root(size)
        document: dict[str, Any] = {"origin": ledger.origin, "size": size, "root": _b64(root)}
        if args.consistency is not None:
            old = args.consistency
            if old > size:
                raise UsageError(f"--consistency {old} is beyond the tree size {size}")
            proof = ledger.consistency_proof(old, size)
            old_root = ledger.root(old)
            verify_consistency(old, size, old_root, root, proof)
            document.update(old_size=old, old_root=_b64(old_root), consistency=[_b64(h) for h in proof])
        elif args.index is not None:
            if args.index >= size:
                raise UsageError(f"entry {args.index} is not in the tree of size {size}")
            data = next(iter(ledger.store.entries(args.index, args.index + 1)), None)
            if data is None:
                raise VerificationFailed(f"entry {args.index} is missing from the store", index=args.index)
            leaf = leaf_hash(data[1])
            proof = ledger.inclusion_proof(args.index, size)
            verify_inclusion(leaf, args.index, size, proof, root)
            document.update(
                index=args.index,
                entry=data[1].decode("utf-8"),
                leaf_hash=_b64(leaf),
                inclusion=[_b64(h) for h in proof],
            )
        else:
            raise UsageError("give an INDEX to prove, or --consistency OLD_SIZE")
        if checkpoint is not None and checkpoint.root != root:
            raise VerificationFailed(
                f"the stored nodes give root {_b64(root)} at size {size}, the signed checkpoint says "
                f"{_b64(checkpoint.root)}",
                hint="run 'trainguard ledger verify'",
            )
        document["checkpoint"] = note
        print(json.dumps(document, indent=2))
    return int(ExitCode.CLEAN)


# show and export


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as ledger:
        if args.index is not None:
            if not 0 <= args.index < ledger.size:
                raise UsageError(
                    f"ledger {ledger.location} has {ledger.size} entries (0..{ledger.size - 1}); "
                    f"no entry {args.index}"
                )
            start, end = args.index, args.index + 1
        else:
            start, end = args.start, args.end
        for index, event in ledger.entries(start, end):
            if args.event_type is not None and event.type != args.event_type:
                continue
            record = json.loads(event.canonical())
            sys.stdout.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")
    return int(ExitCode.CLEAN)


def cmd_export(args: argparse.Namespace) -> int:
    with _open(args) as ledger:
        size = ledger.size
        header = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "origin": ledger.origin,
            "verifier": ledger.verifier.text(),
            "size": size,
        }

        def write(out: TextIO) -> None:
            out.write(json.dumps(header) + "\n")
            for checkpoint_size, note in ledger.checkpoints():
                if checkpoint_size <= size:
                    out.write(json.dumps({"checkpoint": note}) + "\n")
            for index, data in ledger.store.entries(0, size):
                record = {"index": index, "entry": data.decode("utf-8")}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")

        if str(args.out) == "-":
            write(sys.stdout)
            return int(ExitCode.CLEAN)
        # Written beside the target and renamed: an interrupted export never leaves half a file.
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("w", encoding="utf-8") as out:
                write(out)
            tmp.replace(args.out)
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    print(f"exported {size} entries to {args.out}", file=sys.stderr)
    return int(ExitCode.CLEAN)


# tiles


def cmd_tiles(args: argparse.Namespace) -> int:
    from trainguard.ledger._tiles import export_tiles

    with _open(args) as ledger:
        done = export_tiles(ledger, args.out)
    print(
        f"wrote {_count(done.tiles_written, 'tile')} and {_count(done.bundles_written, 'entry bundle')} "
        f"to {args.out} ({done.kept} already there and unchanged); checkpoint size {done.size}"
    )
    return int(ExitCode.CLEAN)


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")


# witness


def cmd_witness_serve(args: argparse.Namespace) -> int:
    import logging

    from trainguard.ledger._witness import logger, serve

    # A witness's every decision is evidence: log it with a timestamp, whatever -v says.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s witness %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    host, _, port_text = args.listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--listen {args.listen!r} is not HOST:PORT") from None
    key = SigningKey.load(args.key, alg=ALG_COSIGNATURE_V1)
    logs = {k.name: k for k in (_verifier_arg(v, ALG_ED25519, "--log") for v in args.log)}
    announce = lambda bound: print(f"port {bound}", flush=True)  # noqa: E731 - the bound port, for scripts
    serve(host or "127.0.0.1", port, key, logs, args.state, ready=announce)
    return int(ExitCode.CLEAN)


__all__ = [
    "cmd_append",
    "cmd_export",
    "cmd_head",
    "cmd_keygen",
    "cmd_prove",
    "cmd_show",
    "cmd_tiles",
    "cmd_verify",
    "cmd_witness_serve",
]
