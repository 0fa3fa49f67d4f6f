"""Debian's chromium driven by playwright, for the tests that open pages (the `browser` marker).

Without them the browser tests skip, except under CI=true, where they fail saying what is missing: CI
installs both, so a skip there would hide a test that never ran.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def missing(what: str) -> NoReturn:
    reason = f"{what}: the browser tests need Debian's chromium at {CHROMIUM} and `pip install playwright`"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A launched chromium browser (playwright's sync API), closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed")
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing")
    with sync_playwright() as playwright:
        # Tests run as root in CI, where chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()
