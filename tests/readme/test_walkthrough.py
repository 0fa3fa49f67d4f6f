"""The README, followed from a fresh clone: its two commands, then every example in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.readme.walkthrough import REPO, RUN_LANGS, SHOWN_LANGS, blocks, commands


def test_blocks_and_their_directives_are_read_as_written() -> None:
    text = (
        "intro\n"
        "```sh\nmake demo\n```\n"
        "<!-- walkthrough: skip needs a server -->\n"
        "```sh\ntrainguard witness serve\n```\n"
        "<!-- walkthrough: file trust.toml -->\n"
        "```toml\n[[trust.key]]\n```\n"
    )
    found = blocks(text)
    assert [(b.line, b.lang, b.directive) for b in found] == [
        (2, "sh", None),
        (6, "sh", ("skip", "needs a server")),
        (10, "toml", ("file", "trust.toml")),
    ]
    assert found[2].code == "[[trust.key]]\n"


def test_shell_commands_join_continued_lines_and_drop_comments() -> None:
    code = (
        "# a comment\ntrainguard run --seed 1 \\\n    -- python train.py\n\ntrainguard verify x  # (exit 1)\n"
    )
    assert commands(code) == [
        "trainguard run --seed 1      -- python train.py",
        "trainguard verify x  # (exit 1)",
    ]


def test_every_readme_block_is_run_or_says_why_not() -> None:
    for block in blocks((REPO / "README.md").read_text()):
        if block.directive is not None and block.directive[0] == "skip":
            assert block.directive[1].strip(), f"README line {block.line}: a skip without a reason"
        elif block.lang not in RUN_LANGS + SHOWN_LANGS:
            raise AssertionError(
                f"README line {block.line}: a {block.lang or 'plain'} block is never checked"
            )


def test_the_readme_holds_from_a_fresh_clone(tmp_path: Path) -> None:
    # Minutes: `make demo` builds a new venv (torch from the local wheels in CI), then every example runs.
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "readme" / "walkthrough.py"), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert "walkthrough: the README held" in done.stdout
