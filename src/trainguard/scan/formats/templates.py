"""Jinja chat templates that model files carry and loaders render: read token by token, never rendered.

A template rendered outside Jinja's sandbox (llama-cpp-python before 0.2.72, CVE-2024-34359) reaches
Python internals through attribute access: ``cycler.__init__.__globals__.os.popen(...)``. Every such
path needs an attribute or item whose name starts with an underscore, so a name of that kind must
be written out or built at render time. This module reports both:

- names and string literals that start with ``_`` or hold ``__``, and string escapes (``\\x5f``)
  that can spell them;
- the places where a name built at render time becomes an attribute access: the ``attr`` filter,
  the ``attribute=`` argument and first argument of the filters that look attributes up, string
  formatting (``format``, ``%``), and a subscript whose key is not a literal, a number or loop
  arithmetic.

Real chat templates (Llama, Mistral, Qwen, Gemma, Phi, DeepSeek, ChatML) use none of these. A
template that cannot be tokenised is undecided.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from trainguard.errors import UndecidableError

_BLOCK = re.compile(r"\{\{-?|\{%-?|\{#-?")
_ENDS = {"{{": "}}", "{%": "%}", "{#": "#}"}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<number>\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>\*\*|//|==|!=|<=|>=|[-+*/%~<>=|.,:;()\[\]{}!?])
    )""",
    re.VERBOSE | re.DOTALL,
)
_SAFE_ESCAPES = re.compile(r"\\[nrt'\"\\]")
# Filters and tests that look up an attribute named by their argument.
_GETATTR_FILTERS = frozenset(
    {"map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max", "attr"}
)
# ... and of those, the ones whose first positional argument is that name.
_NAME_FIRST = frozenset({"map", "selectattr", "rejectattr", "groupby", "attr"})
# Filters that take an attribute name positionally, named as a string for map() to apply.
_NAMED_BY_STRING = frozenset({"attr", "format", "groupby", "sum"})
# Statements that read further templates through the environment's loader.
_LOADING_STATEMENTS = frozenset({"include", "import", "extends", "from"})
# Names whose values are numbers: loop counters.
_LOOP_NUMBERS = frozenset({"index", "index0", "revindex", "revindex0", "length", "depth", "depth0"})


def template_problems(text: str) -> list[str]:
    """What in this template can reach Python internals (empty: nothing). Raises UndecidableError
    if it cannot be tokenised."""
    found: list[str] = []
    for expression in _expressions(text):
        tokens = list(_tokens(expression))
        found.extend(_judge(tokens))
    return sorted(set(found))


def _expressions(text: str) -> Iterator[str]:
    pos = 0
    raw = False
    while True:
        match = _BLOCK.search(text, pos)
        if match is None:
            return
        opener = match.group()[:2]
        end = text.find(_ENDS[opener], match.end())
        if end < 0:
            raise UndecidableError("a template block is not closed")
        body = text[match.end() : end].strip("-+ \t\r\n")
        pos = end + 2
        if opener == "{#":
            continue
        if opener == "{%" and body.split()[:1] == ["endraw"]:
            raw = False
            continue
        if raw:
            continue
        if opener == "{%" and body.split()[:1] == ["raw"]:
            raw = True
            continue
        yield body


def _tokens(expression: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(expression):
        if not expression[pos:].strip():
            return
        match = _TOKEN.match(expression, pos)
        if match is None or match.end() == pos:
            raise UndecidableError(
                f"a template expression does not tokenise near {expression[pos : pos + 20]!r}"
            )
        kind = match.lastgroup
        assert kind is not None
        yield kind, match.group(kind)
        pos = match.end()


def _judge(tokens: list[tuple[str, str]]) -> Iterator[str]:
    if tokens and tokens[0][0] == "name" and tokens[0][1] in _LOADING_STATEMENTS:
        yield f"the {tokens[0][1]} statement (reads other templates from the loader's files)"
    for i, (kind, value) in enumerate(tokens):
        previous = tokens[i - 1][1] if i else ""
        if kind == "name" and (value.startswith("_") or "__" in value):
            yield f"the name {value!r} (Python internals)"
        elif kind == "string":
            inner = value[1:-1]
            if inner.startswith("_") or "__" in inner or (inner and not inner.strip("_")):
                yield f"the string {value} (spells Python internals)"
            if "\\" in _SAFE_ESCAPES.sub("", inner):
                yield f"the string {value} (escapes can spell any name)"
            if "%c" in inner or re.search(r"\{[^}]*![rsa]|\{[^}]*:c\}", inner):
                yield f"the string {value} (formats characters)"
            if inner in _NAMED_BY_STRING:
                yield f"the string {value} (names a filter that looks attributes up, as map() applies it)"
        elif kind == "name" and value == "format" and previous in ("|", "."):
            yield "string formatting (format builds names at render time)"
        elif kind == "op" and value == "%" and i and tokens[i - 1][0] == "string":
            yield "string formatting (% builds names at render time)"
        elif kind == "name" and previous == "|" and value in _GETATTR_FILTERS:
            if value == "attr" or not _literal_first_argument(tokens, i + 1, value):
                yield f"the {value} filter looks up an attribute named at render time"
        elif kind == "op" and value == "[" and _is_subscript(tokens, i) and not _plain_key(tokens, i + 1):
            yield "a subscript whose key is built at render time"


def _is_subscript(tokens: list[tuple[str, str]], i: int) -> bool:
    """A `[` after a value indexes it; anywhere else it opens a list."""
    return i > 0 and (tokens[i - 1][0] in ("name", "string") or tokens[i - 1][1] in (")", "]"))


def _literal_first_argument(tokens: list[tuple[str, str]], start: int, name: str) -> bool:
    """After a filter name: every `attribute=` argument, and the first positional one of the filters
    that take an attribute name first, are string literals."""
    if start >= len(tokens) or tokens[start][1] != "(":
        return True
    arguments: list[list[tuple[str, str]]] = [[]]
    depth = 0
    for kind, value in tokens[start + 1 :]:
        if value in ("(", "[", "{"):
            depth += 1
        elif value in (")", "]", "}"):
            if depth == 0:
                break
            depth -= 1
        elif value == "," and depth == 0:
            arguments.append([])
            continue
        arguments[-1].append((kind, value))
    for index, argument in enumerate(arguments):
        if argument[:2] == [("name", "attribute"), ("op", "=")]:
            if len(argument) != 3 or argument[2][0] != "string":
                return False
        elif (
            index == 0
            and name in _NAME_FIRST
            and argument
            and (len(argument) != 1 or argument[0][0] != "string")
        ):
            return False
    return True


_KEY_OPERATORS = frozenset({"+", "-", "*", ":", "%", "//", "(", ")"})


def _plain_key(tokens: list[tuple[str, str]], start: int) -> bool:
    """The subscript's key up to its `]`: string and number literals, slices, loop arithmetic."""
    depth = 0
    for i in range(start, len(tokens)):
        value = tokens[i][1]
        if value == "[":
            depth += 1
        elif value == "]":
            if depth == 0:
                return True
            depth -= 1
        elif not _plain_key_token(tokens, i):
            return False
    return False


def _plain_key_token(tokens: list[tuple[str, str]], i: int) -> bool:
    kind, value = tokens[i]
    if kind in ("string", "number") or (kind == "op" and value in _KEY_OPERATORS):
        return True
    if kind == "name" and value == "loop":
        return True
    if value == "." and i + 1 < len(tokens):
        return tokens[i - 1][1] == "loop" and tokens[i + 1][1] in _LOOP_NUMBERS
    return kind == "name" and value in _LOOP_NUMBERS and tokens[i - 1][1] == "."
