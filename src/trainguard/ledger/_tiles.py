"""The ledger's read path as C2SP tlog-tiles (https://c2sp.org/tlog-tiles): static files tlog clients audit.

A tree of `size` leaves is published as

    checkpoint                    the latest signed checkpoint note, byte for byte as the ledger stored it
    tile/<L>/<N>[.p/<W>]          hash tiles: the hashes of tree level 8*L, nodes 256*N .. 256*N + W - 1
    tile/entries/<N>[.p/<W>]      entry bundles: entries 256*N .. 256*N + W - 1

A full tile holds 256 hashes (or entries); the rightmost tile of a level holds the rest and is "partial",
with `.p/<W>` naming its width. `<N>` is written in groups of three digits, every group but the last
prefixed with ``x`` (1234067 -> ``x001/x234/067``), so that no folder holds more than 1000 names.

An *entry* here is exactly the leaf data that is hashed as the Merkle leaf: the RFC 8785 canonical JSON
bytes of one event, as the store keeps them, so that SHA-256(0x00 || entry) is the level-0 hash in the
tiles. A bundle writes each entry as a big-endian uint16 length and then its bytes, which caps an entry at
65535 bytes; the ledger takes events up to MAX_ENTRY_BYTES (1 MiB), so a longer one cannot be bundled and
raises EntryTooLongForBundle.

Tile hashes are the stored nodes of the tree (level 8*L of the node table), read 256 at a time: nothing
is recomputed. Every tile path names content that never changes in an append-only log, so an export
into a folder that already holds a tile checks it and leaves it; a tile that differs is tampering.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger._merkle import HASH_SIZE, leaf_hash, root_hash

if TYPE_CHECKING:
    from trainguard.ledger._ledger import Ledger

__all__ = [
    "CHECKPOINT_PATH",
    "MAX_BUNDLED_ENTRY_BYTES",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "EntryTooLongForBundle",
    "TileExport",
    "TileRef",
    "decode_bundle",
    "encode_bundle",
    "encode_index",
    "export_tiles",
    "read_entry_bundle",
    "read_tile",
    "tile_paths",
    "tiles_for",
]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_BUNDLED_ENTRY_BYTES = 0xFFFF  # the largest length a uint16 prefix can carry
CHECKPOINT_PATH = "checkpoint"


class EntryTooLongForBundle(UsageError):
    """An entry over 65535 bytes: the ledger holds it, but no tlog-tiles entry bundle can carry it."""

    def __init__(self, index: int, length: int) -> None:
        super().__init__(
            f"entry {index} is {length} bytes long; a tlog-tiles entry bundle carries entries of at most "
            f"{MAX_BUNDLED_ENTRY_BYTES} bytes",
            hint="the ledger cannot be published as tiles while it holds this entry; keep events smaller "
            "(large payloads belong in files the event names by digest)",
        )
        self.index = index
        self.length = length


@dataclasses.dataclass(frozen=True)
class TileRef:
    """One tile resource: a hash tile at `level`, or (`entries`) an entry bundle; `width` 1..256."""

    level: int
    index: int
    width: int
    entries: bool = False

    def __post_init__(self) -> None:
        if self.level < 0 or self.index < 0 or not 1 <= self.width <= TILE_WIDTH:
            raise UsageError(
                f"no such tile: level {self.level}, index {self.index}, width {self.width}",
                hint=f"level and index are >= 0, width is 1..{TILE_WIDTH}",
            )
        if self.entries and self.level != 0:
            raise UsageError("entry bundles sit at level 0 only")

    @property
    def path(self) -> str:
        """The resource's path, relative to the log's prefix."""
        where = "entries" if self.entries else str(self.level)
        partial = "" if self.width == TILE_WIDTH else f".p/{self.width}"
        return f"tile/{where}/{encode_index(self.index)}{partial}"

    @property
    def first(self) -> int:
        """The index, within its tree level, of the first hash (or entry) the tile holds."""
        return self.index * TILE_WIDTH


def encode_index(n: int) -> str:
    """`n` as tlog-tiles path elements: three-digit groups, ``x`` before all but the last."""
    if n < 0:
        raise UsageError(f"a tile index cannot be negative: {n}")
    groups = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        groups.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(groups))


def _hashes_at_level(size: int, level: int) -> int:
    """How many hashes tile level `level` has in a tree of `size` leaves (complete subtrees only)."""
    return size >> (TILE_HEIGHT * level)


def _tiles_of_row(count: int, level: int, entries: bool) -> Iterator[TileRef]:
    """The full tiles of a row of `count` hashes (or entries), then its partial tile if any."""
    full, rest = divmod(count, TILE_WIDTH)
    for index in range(full):
        yield TileRef(level, index, TILE_WIDTH, entries)
    if rest:
        yield TileRef(level, full, rest, entries)


def tiles_for(size: int) -> list[TileRef]:
    """Every hash tile (level by level, bottom up) and then every entry bundle of a tree of `size` leaves."""
    if size < 0:
        raise UsageError(f"tree size cannot be negative: {size}")
    refs: list[TileRef] = []
    level = 0
    while count := _hashes_at_level(size, level):
        refs.extend(_tiles_of_row(count, level, entries=False))
        level += 1
    refs.extend(_tiles_of_row(size, 0, entries=True))
    return refs


def tile_paths(size: int) -> list[str]:
    """Every resource a tree of `size` leaves has: its tiles, its entry bundles, and the checkpoint last."""
    return [ref.path for ref in tiles_for(size)] + [CHECKPOINT_PATH]


def _check_within(ledger: Ledger, ref: TileRef) -> None:
    size = ledger.size
    available = size if ref.entries else _hashes_at_level(size, ref.level)
    if ref.first + ref.width > available:
        raise UsageError(
            f"ledger {ledger.location} has no {ref.path}: its tree of size {size} has {available} "
            f"{'entries' if ref.entries else f'hashes at tile level {ref.level}'}"
        )


def read_tile(ledger: Ledger, level: int, index: int, width: int) -> bytes:
    """The hash tile `tile/<level>/<index>[.p/<width>]`: `width` stored 32-byte node hashes, concatenated."""
    ref = TileRef(level, index, width)
    _check_within(ledger, ref)
    return _tile_bytes(ledger, ref)


def _tile_bytes(ledger: Ledger, ref: TileRef) -> bytes:
    node_level = TILE_HEIGHT * ref.level
    keys = [(node_level, ref.first + i) for i in range(ref.width)]
    found = ledger.store.nodes(keys)  # one query; ProofError names a missing node
    return b"".join(found[key] for key in keys)


def read_entry_bundle(ledger: Ledger, index: int, width: int) -> bytes:
    """The entry bundle `tile/entries/<index>[.p/<width>]`: each entry as uint16 length + its bytes."""
    ref = TileRef(0, index, width, entries=True)
    _check_within(ledger, ref)
    return _bundle_bytes(ledger, ref)


def _bundle_entries(ledger: Ledger, ref: TileRef) -> list[bytes]:
    entries = [data for _, data in ledger.store.entries(ref.first, ref.first + ref.width)]
    if len(entries) != ref.width:
        raise VerificationFailed(
            f"ledger {ledger.location} is missing entries in [{ref.first}, {ref.first + ref.width})",
            index=ref.first + len(entries),
            hint="run 'trainguard ledger verify'",
        )
    return entries


def _bundle_bytes(ledger: Ledger, ref: TileRef) -> bytes:
    return encode_bundle(_bundle_entries(ledger, ref), first_index=ref.first)


def encode_bundle(entries: Sequence[bytes], *, first_index: int = 0) -> bytes:
    """Entries as one tlog-tiles bundle; EntryTooLongForBundle names the first one over 65535 bytes."""
    parts: list[bytes] = []
    for offset, data in enumerate(entries):
        if len(data) > MAX_BUNDLED_ENTRY_BYTES:
            raise EntryTooLongForBundle(first_index + offset, len(data))
        parts.append(len(data).to_bytes(2, "big"))
        parts.append(bytes(data))
    return b"".join(parts)


def decode_bundle(data: bytes) -> list[bytes]:
    """The entries of a bundle; UsageError when the lengths do not add up to the bundle."""
    entries: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise UsageError(f"entry bundle ends inside a length prefix at byte {pos}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if pos + length > len(data):
            raise UsageError(f"entry bundle ends inside entry {len(entries)} ({length} bytes) at byte {pos}")
        entries.append(data[pos : pos + length])
        pos += length
    return entries


# Export


@dataclasses.dataclass(frozen=True)
class TileExport:
    """What `export_tiles` did: the checkpoint size it published and how many files it wrote or kept."""

    size: int
    tiles_written: int
    bundles_written: int
    kept: int
    """Tiles and bundles already in the folder with exactly the right bytes, left as they were."""


def export_tiles(ledger: Ledger, folder: Path) -> TileExport:
    """Write the static tlog-tiles tree of the ledger's latest signed checkpoint into `folder`.

    Every file is written to a temporary name and renamed, tiles and bundles first and the checkpoint
    last, so a reader that fetches the checkpoint finds every tile it needs, and never one beyond it.
    A tile already present is compared and kept; one that differs raises VerificationFailed (tampering,
    or another log's tiles) before the checkpoint is touched. So does a folder whose checkpoint is for a
    larger tree: publishing a smaller one would roll the log back.
    """
    checkpoint, note = ledger.head()
    size = checkpoint.size
    _refuse_rollback(folder, ledger.origin, size)
    if root_hash(size, ledger.store) != checkpoint.root:
        raise VerificationFailed(
            f"ledger {ledger.location}: the stored tree nodes do not give the root signed at size {size}",
            hint="run 'trainguard ledger verify'; nothing was published",
        )
    written = {False: 0, True: 0}
    kept = 0
    for ref in tiles_for(size):
        content = _bundle_checked(ledger, ref) if ref.entries else _tile_bytes(ledger, ref)
        if _publish(folder, ref.path, content):
            written[ref.entries] += 1
        else:
            kept += 1
    _write_atomically(folder / CHECKPOINT_PATH, note.encode("utf-8"))
    return TileExport(size, written[False], written[True], kept)


def _bundle_checked(ledger: Ledger, ref: TileRef) -> bytes:
    """The bundle of `ref`, after checking each entry hashes to the leaf its level-0 tile publishes."""
    entries = _bundle_entries(ledger, ref)
    leaves = _tile_bytes(ledger, TileRef(0, ref.index, ref.width))
    for offset, data in enumerate(entries):
        if leaf_hash(data) != leaves[offset * HASH_SIZE : (offset + 1) * HASH_SIZE]:
            raise VerificationFailed(
                f"ledger {ledger.location}: entry {ref.first + offset} does not hash to its stored leaf",
                index=ref.first + offset,
                hint="run 'trainguard ledger verify'; the checkpoint was not published",
            )
    return encode_bundle(entries, first_index=ref.first)


def _refuse_rollback(folder: Path, origin: str, size: int) -> None:
    """VerificationFailed when `folder` already publishes another log, or this log at a larger size."""
    try:
        lines = (folder / CHECKPOINT_PATH).read_bytes().decode("utf-8", "replace").split("\n")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot read {folder / CHECKPOINT_PATH}: {exc.strerror or exc}") from None
    published = int(lines[1]) if len(lines) > 1 and lines[1].isascii() and lines[1].isdigit() else None
    if lines[0] != origin or published is None:
        raise VerificationFailed(
            f"{folder} already publishes a checkpoint that is not {origin!r}'s",
            hint="export each log into a folder of its own",
        )
    if published > size:
        raise VerificationFailed(
            f"{folder} already publishes {origin} at size {published}; this ledger's latest checkpoint "
            f"is size {size}: publishing it would roll the log back",
            hint="run 'trainguard ledger verify' against a checkpoint kept elsewhere",
        )


def _publish(folder: Path, relative: str, content: bytes) -> bool:
    """Write one tile unless it is there already; True when written. A differing one is tampering."""
    path = folder / relative
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        _write_atomically(path, content)
        return True
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if existing != content:
        raise VerificationFailed(
            f"{path} differs from the ledger's {relative}: published tiles never change, so either the "
            "folder or the ledger was tampered with",
            hint="compare both against a checkpoint kept elsewhere ('trainguard ledger verify "
            "--checkpoint'); the folder's checkpoint was left as it was",
        )
    return False


def _write_atomically(path: Path, content: bytes) -> None:
    """Write `content` to a temporary file beside `path`, flush it to disk, and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            out.write(content)
            out.flush()
            # Durable before visible: a crash must not leave an empty tile that the next export calls
            # tampering.
            os.fsync(out.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
