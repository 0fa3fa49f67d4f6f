"""Follow the README as a newcomer would: a fresh clone, its two commands, then every example in order.

    python tests/readme/walkthrough.py [--repo DIR] [--workdir DIR] [--list]

The committed HEAD of `--repo` (default: this checkout) is cloned into a new folder, and the README of
that clone is run from top to bottom in the clone's folder:

- a ``sh`` block runs command by command (a line ending in ``\\`` continues the command); each must exit
  0, unless its comment says ``(exit N)``;
- a ``python`` block runs with the clone's ``.venv/bin/python`` and must exit 0;
- ``console``, ``text`` and ``toml`` blocks show output or formats and are not run.

An HTML comment on the line before a block changes that: ``<!-- walkthrough: skip REASON -->`` (the
reason is printed), ``<!-- walkthrough: exit N -->`` (the block's expected exit status) or
``<!-- walkthrough: file NAME -->`` (the block is written to NAME, and run too if it is ``python``).

`make test` is the command that runs this walkthrough inside the test suite, so it is run as
``make -n test``: what it would do, without running it again. Commands run with the clone's
``.venv/bin`` first on PATH and HOME in a throwaway folder (so ``~/.local/share/trainguard`` is the
walkthrough's own); pip's cache stays the user's. `make demo` runs a short drill (``DRILL_FLAGS``, one
attack and the clean run): the full drill has its own tests, and the walkthrough checks that the command
works from a fresh clone. Exit 0 when the README held, 1 naming the first block
and command that did not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_LANGS = ("sh", "python")
SHOWN_LANGS = ("console", "text", "toml")
_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!-- walkthrough: (skip|exit|file) ?(.*?) -->\s*$")
_EXPECTED = re.compile(r"#.*\(exit (\d+)\)")
TIMEOUT_S = 1200  # `make demo` on a fresh machine installs torch
SHORT_DRILL = "--steps 10 --attacks ledger-row-edited"


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directive: tuple[str, str] | None


def blocks(readme: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the walkthrough directive just before each."""
    found: list[Block] = []
    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        before = lines[i - 1] if i else ""
        directive = _DIRECTIVE.match(before)
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"README line {i + 1}: a code block that never closes")
        code = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(Block(i + 1, fence.group(1), code, directive.groups() if directive else None))
        i = end + 1
    return found


def commands(code: str) -> list[str]:
    """The commands of a shell block: comment lines dropped, continued lines joined."""
    out: list[str] = []
    pending = ""
    for raw in code.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


class Failed(Exception):
    pass


class Walk:
    def __init__(self, clone: Path, home: Path) -> None:
        self.clone = clone
        venv_bin = clone / ".venv" / "bin"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")},
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "DRILL_FLAGS": os.environ.get("DRILL_FLAGS", SHORT_DRILL),
        }
        self.env.pop("VIRTUAL_ENV", None)
        self.python = venv_bin / "python"

    def run(self, block: Block) -> str:
        kind, value = block.directive or ("", "")
        if kind == "skip":
            if not value:
                raise Failed(f"README line {block.line}: a skip needs a reason")
            return f"skipped: {value}"
        if kind == "file":
            (self.clone / value).write_text(block.code)
            if block.lang != "python":
                return f"written to {value}"
        if block.lang not in RUN_LANGS:
            return "shown, not run"
        expected = int(value) if kind == "exit" else None
        if block.lang == "python":
            source = value if kind == "file" else "-"
            self._check(block, f"python {source}", [str(self.python), source], block.code, expected or 0)
            return "ran"
        for command in commands(block.code):
            wanted = expected
            if wanted is None:
                said = _EXPECTED.search(command)
                wanted = int(said.group(1)) if said else 0
            shown = command
            if command.split("#")[0].strip() == "make test":
                command = "make -n test"  # the walkthrough runs inside `make test`
            self._check(block, shown, ["bash", "-c", command], None, wanted)
        return "ran"

    def _check(self, block: Block, shown: str, argv: list[str], stdin: str | None, wanted: int) -> None:
        start = time.monotonic()
        print(f"  $ {shown}", flush=True)
        try:
            done = subprocess.run(
                argv,
                cwd=self.clone,
                env=self.env,
                input=stdin,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Failed(f"README line {block.line}: `{shown}` ran over {TIMEOUT_S} s") from None
        if done.returncode != wanted:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise Failed(
                f"README line {block.line}: `{shown}` exited {done.returncode}, the README says {wanted}\n"
                f"{tail}"
            )
        print(f"    exit {done.returncode} in {time.monotonic() - start:.1f} s", flush=True)


def walk(repo: Path, workdir: Path) -> int:
    clone = workdir / "trainguard"
    home = workdir / "home"
    home.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    readme = (clone / "README.md").read_text()
    found = blocks(readme)
    walker = Walk(clone, home)
    ran = skipped = 0
    for block in found:
        print(f"README line {block.line} ({block.lang or 'plain'}):", flush=True)
        outcome = walker.run(block)
        print(f"  {outcome}", flush=True)
        ran += outcome == "ran"
        skipped += outcome.startswith("skipped")
    shown = len(found) - ran - skipped
    print(f"walkthrough: the README held: {ran} blocks run, {skipped} skipped, {shown} shown")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository to clone (its HEAD)")
    parser.add_argument("--workdir", type=Path, help="an empty folder to work in (default: a new one)")
    parser.add_argument("--list", action="store_true", help="list the blocks and what would be done")
    args = parser.parse_args(argv)
    if args.list:
        for block in blocks((args.repo / "README.md").read_text()):
            print(block.line, block.lang or "plain", block.directive or "")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trainguard-walkthrough-"))
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        print(f"walkthrough: {args.workdir} is not empty", file=sys.stderr)
        return 2
    try:
        return walk(args.repo, workdir)
    except Failed as exc:
        print(f"walkthrough: FAILED at {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
