"""GGUF models: genuine files written by the real `gguf` library are clean, whatever realistic chat
template they carry; a template that can reach Python internals when a loader renders it is a
critical finding, under any key; metadata that cannot be read is undecided, never skipped."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path

TEMPLATES = Path(__file__).parent.parent / "corpus" / "templates"
MARKER = "echo TRAINGUARD-MARKER"

# What was used against llama-cpp-python (CVE-2024-34359), and the same moved one step away.
HOSTILE = {
    "globals": "{{ cycler.__init__.__globals__.os.popen('" + MARKER + "').read() }}",
    "self": "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('" + MARKER + "') }}",
    "attr-filter": "{{ lipsum|attr('__globals__') }}",
    "built-name": "{% set u = 'tool_calls'[4] %}{{ lipsum|attr(u*2 ~ 'globals' ~ u*2) }}",
    "built-subscript": "{% set u = 'tool_calls'[4] %}{{ lipsum[u*2 ~ 'globals' ~ u*2] }}",
    "escapes": r"{{ lipsum['\x5f\x5fglobals\x5f\x5f'] }}",
    "format": "{{ '%c%c'|format(95, 95) }}",
    "map-attribute": "{% set n = 'x' %}{{ messages|map(attribute=n)|list }}",
    "str-format": "{{ '{0.__class__}'.format(messages) }}",
    "include": "{% include 'other.jinja' %}",
    "map-attr-filter": "{% set n = 'x' %}{{ [lipsum]|map('attr', n)|list }}",
    "map-groupby": "{% set n = 'x' %}{{ [[lipsum]]|map('groupby', n)|list }}",
}


def _gguf_file(path: Path, template: str, key: str = "tokenizer.chat_template") -> Path:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>", "hello", "world"])
    writer.add_token_scores([0.0, 0.0, -1.0, -2.0])
    if key == "tokenizer.chat_template":
        writer.add_chat_template(template)
    else:
        writer.add_string(key, template)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _result(path: Path) -> tuple[Verdict, str]:
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    said = " | ".join(
        [*(f"{f.rule}: {f.message}" for f in result.findings), *(p.message for p in result.problems)]
    )
    return result.verdict, said


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.jinja")))
def test_a_genuine_gguf_with_a_real_chat_template_is_clean(tmp_path: Path, template: str) -> None:
    path = _gguf_file(tmp_path / "model.gguf", (TEMPLATES / template).read_text())
    assert _result(path) == (Verdict.CLEAN, "")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_template_that_reaches_python_internals_is_critical(tmp_path: Path, name: str) -> None:
    path = _gguf_file(tmp_path / "model.gguf", HOSTILE[name])
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS, said
    assert "template-injection" in said and "tokenizer.chat_template" in said


@pytest.mark.parametrize("key", ["tokenizer.chat_template.tool_use", "general.description"])
def test_a_template_under_another_key_is_checked_too(tmp_path: Path, key: str) -> None:
    path = _gguf_file(tmp_path / "model.gguf", HOSTILE["globals"], key=key)
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS, said
    assert key in said


def _hand_built(version: int, entries: list[bytes], count: int | None = None) -> bytes:
    wide = "Q" if version >= 2 else "I"
    n = len(entries) if count is None else count
    return b"GGUF" + struct.pack(f"<I{wide}{wide}", version, 0, n) + b"".join(entries)


def _string_entry(key: bytes, value: bytes, wide: str = "Q") -> bytes:
    return (
        struct.pack(f"<{wide}", len(key))
        + key
        + struct.pack("<I", 8)
        + struct.pack(f"<{wide}", len(value))
        + value
    )


def test_version_one_with_32_bit_lengths_is_read(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(
        _hand_built(1, [_string_entry(b"tokenizer.chat_template", HOSTILE["globals"].encode(), "I")])
    )
    assert _result(path)[0] == Verdict.FINDINGS


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        (
            "truncated",
            _hand_built(3, [_string_entry(b"tokenizer.chat_template", b"{{ x }}")])[:-3],
            "past the end",
        ),
        (
            "unknown-type",
            _hand_built(3, [struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99)]),
            "unknown type",
        ),
        ("many-entries", _hand_built(3, [], count=1 << 40), "metadata entries"),
        (
            "huge-array",
            _hand_built(3, [struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 1 << 60)]),
            "longer",
        ),
        ("version-9", _hand_built(9, []), "version 9"),
        (
            "unclosed-template",
            _hand_built(3, [_string_entry(b"tokenizer.chat_template", b"{{ x ")]),
            "not closed",
        ),
    ],
)
def test_metadata_that_cannot_be_read_is_undecided(tmp_path: Path, name: str, data: bytes, says: str) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    verdict, said = _result(path)
    assert verdict == Verdict.UNDECIDED, said
    assert says in said
