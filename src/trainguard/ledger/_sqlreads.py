"""The reads that the SQLite and PostgreSQL stores share: the same SQL, streamed in bounded chunks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["STREAM_CHUNK", "SqlReads"]

# Rows per query when streaming: bounded memory however long the log grows.
STREAM_CHUNK = 4096


def _as_bytes(data: object) -> bytes:
    # SQLite columns take any type: a row rewritten as text (SQL's replace() returns text), a number or
    # NULL is still checked, by bytes that cannot match its leaf hash unless the content is unchanged.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass")
    return repr(data).encode("ascii", "backslashreplace")


class SqlReads:
    """Reads over the entries, checkpoints, cosignatures and meta tables.

    A store supplies `_rows(sql, params)`, which runs one query written with ``?`` placeholders under its
    own lock and error translation and returns every row.
    """

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def entries(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        while start < end:
            rows = self._rows(
                "SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx LIMIT ?",
                (start, end, STREAM_CHUNK),
            )
            for idx, data in rows:
                yield int(idx), _as_bytes(data)
            if len(rows) < STREAM_CHUNK:
                return
            start = int(rows[-1][0]) + 1

    def checkpoints(self, max_size: int | None = None) -> Iterator[tuple[int, str]]:
        start = 0
        end = (1 << 62) if max_size is None else max_size
        while True:
            rows = self._rows(
                "SELECT size, note FROM checkpoints WHERE size >= ? AND size <= ? ORDER BY size LIMIT ?",
                (start, end, STREAM_CHUNK),
            )
            for size, note in rows:
                yield int(size), str(note)
            if len(rows) < STREAM_CHUNK:
                return
            start = int(rows[-1][0]) + 1

    def checkpoint(self, size: int) -> str | None:
        rows = self._rows("SELECT note FROM checkpoints WHERE size = ?", (size,))
        return str(rows[0][0]) if rows else None

    def latest_checkpoint(self) -> tuple[int, str] | None:
        rows = self._rows("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def cosignatures(self, size: int) -> list[tuple[str, str]]:
        rows = self._rows("SELECT witness, line FROM cosignatures WHERE size = ? ORDER BY witness", (size,))
        return [(str(w), str(line)) for w, line in rows]

    def meta(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._rows("SELECT key, value FROM meta")}
