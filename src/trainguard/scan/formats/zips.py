"""ZIP archives: PyTorch checkpoints, NumPy .npz and anything else zipped, member by member."""

from __future__ import annotations

import itertools
import re
import zlib
from collections import Counter

from trainguard._pickle.values import const_tuple
from trainguard.errors import MalformedArtifact, UndecidableError
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.containers import Analyse, inflate_member
from trainguard.scan.formats.dtypes import storage_element_size
from trainguard.scan.formats.keras import is_keras_archive, scan_keras_config
from trainguard.scan.formats.pickles import run_pickle
from trainguard.scan.formats.torchscript import analyse_code
from trainguard.scan.formats.zipread import ZipDirectory, ZipEntry, read_directory


def scan_zip(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    scan.label("zip")
    directory = read_directory(art, scan.limits.max_members)
    _structure_findings(scan, art, directory)
    if directory.prefix:
        scan.add(
            "data-before-archive",
            Severity.HIGH,
            f"{directory.prefix} bytes precede the ZIP archive; loaders that read from the start "
            "(torch.load's legacy path, pickle.load) see them instead of the archive",
            art.location,
            0,
        )
        analyse(scan, art.child(0, directory.prefix, "<data before archive>"))
    entries = [e for e in directory.entries if not e.name.endswith("/")]
    torch_root = _torch_root(entries)
    storages: dict[str, tuple[int, int]] = {}
    skip: set[int] = set()
    policy = scan.policy
    try:
        if torch_root is not None:
            scan.label("pytorch")
            if _is_torchscript(entries, torch_root):
                skip = _scan_torchscript_code(scan, art, entries, torch_root)
            storages, done = _scan_torch(scan, art, entries, torch_root)
            skip |= done
        if torch_root is None and is_keras_archive({e.name for e in entries}):
            skip = _scan_keras(scan, art, entries)
        _scan_members(scan, art, analyse, entries, torch_root, storages, skip)
    finally:
        scan.policy = policy


def _scan_members(
    scan: Scan,
    art: Artifact,
    analyse: Analyse,
    entries: list[ZipEntry],
    torch_root: str | None,
    storages: dict[str, tuple[int, int]],
    skip: set[int],
) -> None:
    for index, entry in enumerate(entries):
        if index in skip:
            continue
        rel = entry.name[len(torch_root) + 1 :] if torch_root is not None else None
        if rel is not None and rel.startswith("data/") and rel[5:] in storages:
            _check_storage(scan, art, entry, storages[rel[5:]])
            continue
        member = _member(scan, art, entry)
        if _INERT_RECORD.match(member.data[member.start : member.end]):
            continue
        analyse(scan, member)
    if torch_root is not None:
        present = {e.name for e in entries}
        missing = sorted(k for k in storages if f"{torch_root}/data/{k}" not in present)
        if missing:
            scan.add(
                "missing-storage",
                Severity.MEDIUM,
                f"data.pkl refers to {len(missing)} tensor storage(s) absent from the archive "
                f"(first: data/{missing[0]}); torch.load fails on this file",
                art.location,
            )


# PyTorch's small records (version, byteorder, serialization id...) hold decimal digits or a byte
# order. Bytes of exactly these forms are inert under every unpickler (digits 3-9 are not opcodes;
# "little" and "big" underflow at once), so validating the content replaces a full analysis.
_INERT_RECORD = re.compile(rb"\A(?:[0-9]{1,64}\n?|little|big)\Z")


def _structure_findings(scan: Scan, art: Artifact, directory: ZipDirectory) -> None:
    counts = Counter(e.name for e in directory.entries)
    for name, n in counts.items():
        if n > 1:
            scan.add(
                "zip-duplicate-name",
                Severity.HIGH,
                f"member {name!r} appears {n} times; readers disagree on which copy they load",
                art.location,
            )
    spans = sorted((e.header_offset, e.data_offset + e.compressed_size, e.name) for e in directory.entries)
    for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
        if begin < end:
            raise UndecidableError(
                f"{art.location}: members {name!r} and {other!r} overlap (a decompression-bomb construction)"
            )
    for entry in directory.entries:
        if entry.local_name != entry.name:
            scan.add(
                "zip-name-mismatch",
                Severity.MEDIUM,
                f"member {entry.name!r} is called {entry.local_name!r} in its local header",
                art.location,
                entry.header_offset,
            )
        if entry.data_offset + entry.compressed_size > art.size:
            raise MalformedArtifact(f"{art.location}!/{entry.name}: member runs past the end of the archive")


def _torch_root(entries: list[ZipEntry]) -> str | None:
    """PyTorch reads `<first entry's top folder>/data.pkl`, like its own reader does."""
    if not entries:
        return None
    root = entries[0].name.split("/", 1)[0]
    names = {e.name for e in entries}
    return root if f"{root}/data.pkl" in names else None


def _member(scan: Scan, art: Artifact, entry: ZipEntry) -> Artifact:
    if entry.encrypted:
        # Undecided unless the bytes are readable anyway: the flag alone encrypts nothing.
        scan.problem(
            "UnsupportedFormat",
            f"{art.location}!/{entry.name}: member is marked encrypted; read as plain data only",
            art.location,
            entry.header_offset,
        )
    if entry.method == 0:
        if entry.compressed_size != entry.size:
            raise MalformedArtifact(f"{art.location}!/{entry.name}: stored member with two different sizes")
        child = art.child(entry.data_offset, entry.data_offset + entry.size, entry.name)
    else:
        child = inflate_member(scan, art, entry.data_offset, entry.compressed_size, entry.method, entry.name)
    if zlib.crc32(child.data[child.start : child.end]) != entry.crc:
        # zipfile refuses such a member, miniz (torch.load) reads it: a known scanner bypass.
        scan.add(
            "zip-crc-mismatch",
            Severity.MEDIUM,
            f"member {entry.name!r} does not match its CRC-32; some readers refuse it, torch.load does not",
            art.location,
            entry.header_offset,
        )
    return child


def _scan_torch(
    scan: Scan, art: Artifact, entries: list[ZipEntry], root: str
) -> tuple[dict[str, tuple[int, int]], set[int]]:
    """Scan data.pkl with PyTorch's persistent ids; return storage sizes by key and the indexes done."""
    storages: dict[str, tuple[int, int]] = {}
    done: set[int] = set()
    for index, entry in enumerate(entries):
        if entry.name != f"{root}/data.pkl":
            continue
        done.add(index)
        member = _member(scan, art, entry)
        scan.label("pickle")
        result = run_pickle(scan, member, member.start)
        if result.error is not None:
            scan.problem(
                "malformed-pickle",
                f"{member.location}: pickle stops ({result.error.reason})",
                member.location,
                result.error.offset - member.start,
            )
        for ref in result.persistent_ids:
            items = const_tuple(ref.pid)
            valid = items is not None and len(items) == 5 and items[0] == "storage"
            elsize = storage_element_size(items[1]) if items is not None and valid else None
            if (
                items is None
                or not valid
                or elsize is None
                or not isinstance(items[2], str)
                or not isinstance(items[4], int)
            ):
                scan.add(
                    "unexpected-persistent-id",
                    Severity.HIGH,
                    "data.pkl asks torch.load's persistent_load for something other than a storage",
                    member.location,
                    ref.pos - member.start,
                )
                continue
            storages[items[2]] = (elsize, items[4])
    return storages, done


def _is_torchscript(entries: list[ZipEntry], root: str) -> bool:
    """What torch.load hands to torch.jit.load: a constants.pkl record (its own test), or code/."""
    return any(e.name == f"{root}/constants.pkl" or e.name.startswith(f"{root}/code/") for e in entries)


def _scan_torchscript_code(scan: Scan, art: Artifact, entries: list[ZipEntry], root: str) -> set[int]:
    """Analyse the archive's code; allow the classes it defines in its pickles. Returns the code members."""
    scan.label("torchscript")
    code_members = {
        index: entry
        for index, entry in enumerate(entries)
        if entry.name.startswith(f"{root}/code/") and entry.name.endswith(".py")
    }
    code = analyse_code(scan, ((e.name, _member(scan, art, e)) for e in code_members.values()), root)
    scan.policy = scan.policy.extended(code.allowed())
    return set(code_members)


_HDF5 = b"\x89HDF\r\n\x1a\n"


def _scan_keras(scan: Scan, art: Artifact, entries: list[ZipEntry]) -> set[int]:
    """The config Keras deserialises; its weights file, read by Keras as datasets only. Returns the
    members done. A weights file that is not plain HDF5 from its first byte is analysed as usual."""
    done: set[int] = set()
    for index, entry in enumerate(entries):
        if entry.name == "config.json":
            scan_keras_config(scan, _member(scan, art, entry))
            done.add(index)
        elif entry.name == "model.weights.h5":
            member = _member(scan, art, entry)
            if member.head(len(_HDF5)) == _HDF5:
                scan.label("keras-weights")
                done.add(index)
    return done


def _check_storage(scan: Scan, art: Artifact, entry: ZipEntry, spec: tuple[int, int]) -> None:
    if entry.method != 0 or entry.encrypted:
        scan.add(
            "storage-compressed",
            Severity.MEDIUM,
            f"tensor storage {entry.name!r} is compressed or encrypted; torch.save never writes that",
            art.location,
            entry.header_offset,
        )
        return
    elsize, numel = spec
    if entry.size < elsize * numel:
        scan.add(
            "storage-size-mismatch",
            Severity.MEDIUM,
            f"tensor storage {entry.name!r} holds {entry.size} bytes, data.pkl promises {elsize * numel}",
            art.location,
            entry.header_offset,
        )
