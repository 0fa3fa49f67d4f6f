"""TorchScript archives: genuine ones (scripted, traced, quantized) are clean; code that reaches files,
native libraries or Python is a finding; code that cannot be read is undecided.

torch.jit.load runs an archive's code at load time (a class's __setstate__), so the hostile samples
here are a genuine archive whose code was edited, the way an attacker would. One test proves with
the real torch.jit.load that such code runs at load (it only writes a marker file in tmp_path)."""

from __future__ import annotations

import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from trainguard.findings import Verdict
from trainguard.scan import scan_path

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.scale = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x).relu()
        if bool(y.sum() > 0):
            return y * self.scale
        return torch.nn.functional.softmax(y, dim=-1)


class _WithState(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> list[torch.Tensor]:
        return [self.w]

    @torch.jit.export
    def __setstate__(self, state: list[torch.Tensor]) -> None:
        self.w = state[0]


def _save(module: object, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent releases
        torch.jit.save(module, str(path))
    return path


def _scripted(tmp_path: Path, module: torch.nn.Module | None = None, name: str = "net.pt") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _save(torch.jit.script(module or _Net()), tmp_path / name)


def _verdict(path: Path) -> tuple[Verdict, str]:
    (result,) = scan_path([path]).results
    said = " | ".join(
        [*(f"{f.rule}: {f.message}" for f in result.findings), *(p.message for p in result.problems)]
    )
    return result.verdict, said


def _edited(
    source: Path, target: Path, edit: dict[str, bytes | None], add: dict[str, bytes] | None = None
) -> Path:
    """A copy of the archive with members replaced (or removed, for None) and others added."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in edit.items():
                if info.filename.endswith(suffix):
                    data = new  # type: ignore[assignment]
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return target


def _member_with(path: Path, needle: bytes) -> tuple[str, bytes]:
    """The code member (its name, its text) that holds `needle`."""
    with zipfile.ZipFile(path) as zf:
        found = [(n, zf.read(n)) for n in zf.namelist() if n.endswith(".py") and needle in zf.read(n)]
    assert len(found) == 1, [n for n, _ in found]
    return found[0]


def _with_line(tmp_path: Path, line: str, name: str) -> Path:
    """The stateful module, its __setstate__ given one more line (what an attacker edits in)."""
    genuine = _scripted(tmp_path, _WithState(), "state.pt")
    marker = b"    self.w = state[0]\n"
    member, code = _member_with(genuine, marker)
    code = code.replace(marker, marker + f"    {line}\n".encode())
    return _edited(genuine, tmp_path / name, {member: code})


# --- genuine archives ----------------------------------------------------------------------


def test_a_scripted_module_is_clean(tmp_path: Path) -> None:
    assert _verdict(_scripted(tmp_path)) == (Verdict.CLEAN, "")


def test_a_scripted_module_with_its_own_state_methods_is_clean(tmp_path: Path) -> None:
    assert _verdict(_scripted(tmp_path, _WithState())) == (Verdict.CLEAN, "")


def test_a_traced_module_is_clean(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.LayerNorm(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _save(torch.jit.trace(net, torch.ones(1, 3)), tmp_path / "traced.pt")
    assert _verdict(path) == (Verdict.CLEAN, "")


def test_a_dynamically_quantized_module_is_clean(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)
        path = _save(torch.jit.script(quantized), tmp_path / "quantized.pt")
    verdict, said = _verdict(path)
    assert verdict == Verdict.CLEAN, said


# --- hostile code ----------------------------------------------------------------------------


def test_code_runs_at_load_under_the_real_torch_jit_load(tmp_path: Path) -> None:
    witness = tmp_path / "written-at-load"
    path = _with_line(tmp_path, f'torch.save(self.w, "{witness}")', "hostile.pt")
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.jit.load({str(path)!r})"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert witness.exists(), "torch.jit.load did not run __setstate__: the sample proves nothing"
    verdict, said = _verdict(path)
    assert verdict == Verdict.FINDINGS
    assert "torchscript-file-access" in said and "torch.save" in said


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ('ops.aten.save(self.w, "/tmp/x")', "torchscript-file-access"),
        ('torch.ops.aten.save(self.w, "/tmp/x")', "torchscript-file-access"),
        ('self.w = torch.from_file("/etc/passwd", True, 8)', "torchscript-file-access"),
        ('self.w = torch.ops.aten.from_file.default("/etc/passwd", True, 8)', "torchscript-file-access"),
        ("self.w = torch.ops.evil_lib.run(self.w)", "torchscript-custom-operator"),
        ("self.w = ops.c10d.barrier(self.w)", "torchscript-custom-operator"),
        ("self.w = ops.debugprims.load_tensor(self.w)", "torchscript-custom-operator"),
        ("thing = torch.classes.evil_lib.Thing()", "torchscript-custom-class"),
        ('__import__("os").system("echo TRAINGUARD-MARKER")', "torchscript-code"),
        ('eval("1")', "torchscript-code"),
        ("import os", "torchscript-code"),
    ],
)
def test_code_that_reaches_outside_tensor_maths_is_a_finding(tmp_path: Path, line: str, rule: str) -> None:
    verdict, said = _verdict(_with_line(tmp_path, line, "edited.pt"))
    assert verdict == Verdict.FINDINGS, said
    assert rule in said


def test_code_that_does_not_parse_is_undecided(tmp_path: Path) -> None:
    verdict, said = _verdict(_with_line(tmp_path, "def (:", "broken.pt"))
    assert verdict == Verdict.UNDECIDED
    assert "does not parse" in said


def test_a_code_file_outside_torch_namespace_cannot_allow_a_global(tmp_path: Path) -> None:
    # code/os.py defining `system`: were its classes allowed by file name, os.system would pass.
    genuine = _scripted(tmp_path)
    root = genuine.stem
    data = b"\x80\x02cos\nsystem\nq\x00."
    path = _edited(
        genuine, tmp_path / "os.pt", {"/data.pkl": data}, {f"{root}/code/os.py": b"class system:\n  pass\n"}
    )
    verdict, said = _verdict(path)
    assert verdict != Verdict.CLEAN, said


def test_a_pickle_class_the_code_does_not_define_is_a_finding(tmp_path: Path) -> None:
    genuine = _scripted(tmp_path)
    with zipfile.ZipFile(genuine) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        data = zf.read(name)
    assert b"\n_Net\n" in data
    path = _edited(
        genuine,
        tmp_path / "other.pt",
        {"/data.pkl": data.replace(b"\n_Net\n", b"\nOther\n")},
    )
    verdict, said = _verdict(path)
    assert verdict == Verdict.FINDINGS
    assert ".Other" in said and "__torch__" in said


def test_the_code_classes_are_allowed_only_inside_their_archive(tmp_path: Path) -> None:
    # The same GLOBAL in a plain pickle next to the archive is a finding as before.
    path = tmp_path / "plain.pkl"
    path.write_bytes(b"\x80\x02c__torch__\n_Net\nq\x00.")
    assert _verdict(path)[0] == Verdict.FINDINGS
