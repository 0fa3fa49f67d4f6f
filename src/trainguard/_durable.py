"""Durable writes: a new or renamed name survives a crash only once its folder is synced."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["sync_folder"]


def sync_folder(folder: Path) -> None:
    """fsync `folder`, so the names created or replaced in it survive a crash. Best effort: some file
    systems cannot open or sync a folder, and the rename or link is atomic without it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
