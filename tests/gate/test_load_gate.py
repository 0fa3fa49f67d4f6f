"""The load gate: only signed, unchanged, clean bytes are loaded, and exactly those bytes.

Real files, real keys, real torch/numpy/safetensors; nothing is mocked. The swap test wraps the real
verification so that it replaces the file on disk at the one moment an attacker would want to; the
counting tests wrap the real hashing to show what is read, and how often.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trainguard.gate import _load
from trainguard.gate._load import LoadRefused, install_load_gate, load, load_gate
from trainguard.gate._save import save
from trainguard.provenance import PrivateKey, PublicKey, sign_path
from trainguard.provenance import _manifest as manifest_module
from trainguard.provenance._hashing import hash_files as hash_files_from_disk

torch = pytest.importorskip("torch")
numpy = pytest.importorskip("numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The verification cache lives in a fresh TRAINGUARD_HOME; no trust policy leaks in."""
    home = tmp_path / "tg-home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    monkeypatch.delenv("TRAINGUARD_TRUST_POLICY", raising=False)
    _load._MEMO.clear()
    return home


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey.generate("ed25519")


@pytest.fixture(scope="module")
def stranger() -> PrivateKey:
    return PrivateKey.generate("ecdsa-p256")


@pytest.fixture
def trusted(key: PrivateKey) -> list[PublicKey]:
    return [key.public()]


def _state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(7)
    return {"w": torch.randn(64, 32, generator=generator), "b": torch.arange(32), "step": 3}


def _signed_torch_file(tmp_path: Path, key: PrivateKey, name: str = "model.pt") -> Path:
    path = tmp_path / name
    torch.save(_state(), path)
    sign_path(path, key)
    return path


def _assert_state_equal(got: dict[str, Any]) -> None:
    want = _state()
    assert set(got) == set(want)
    assert torch.equal(got["w"], want["w"])
    assert torch.equal(got["b"], want["b"])
    assert got["step"] == 3


def _rewrite_same_size(path: Path) -> None:
    """Change the content in place, keeping the size (and restoring the mtime)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-30] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


# --- trainguard.load ---


def test_save_then_load_returns_the_same_state(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = tmp_path / "ckpt.pt"
    save(_state(), path, key=key)
    _assert_state_equal(load(path, trusted=trusted))


def test_load_reads_safetensors_and_numpy_by_content(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    st_path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({"w": torch.ones(3, 4)}, st_path)
    sign_path(st_path, key)
    assert torch.equal(load(st_path, trusted=trusted)["w"], torch.ones(3, 4))

    np_path = tmp_path / "array.npy"
    numpy.save(np_path, numpy.arange(10))
    sign_path(np_path, key)
    assert numpy.array_equal(load(np_path, trusted=trusted), numpy.arange(10))

    npz_path = tmp_path / "arrays.npz"
    numpy.savez(npz_path, a=numpy.arange(4), b=numpy.eye(2))
    sign_path(npz_path, key)
    with load(npz_path, trusted=trusted) as archive:
        assert numpy.array_equal(archive["b"], numpy.eye(2))


def test_load_a_file_covered_by_its_directory_signature(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(_state(), folder / "model.pt")
    (folder / "config.json").write_text("{}")
    sign_path(folder, key)
    _assert_state_equal(load(folder / "model.pt", trusted=trusted))
    (folder / "config.json").write_text('{"evil": 1}')
    with pytest.raises(LoadRefused, match=r"config\.json"):
        load(folder / "model.pt", trusted=trusted)


def test_a_directory_swapped_for_an_older_signed_one_is_refused(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    # Each copy verifies as itself; step2000/ replaced by a copy of step1000/ must not.
    older, newer = tmp_path / "step1000", tmp_path / "step2000"
    for folder, scale in ((older, 1.0), (newer, 2.0)):
        folder.mkdir()
        torch.save({"w": torch.full((4,), scale)}, folder / "model.pt")
        sign_path(folder, key)
    assert load(newer / "model.pt", trusted=trusted)["w"][0] == 2.0
    shutil.rmtree(newer)
    shutil.copytree(older, newer)
    _load._MEMO.clear()
    with pytest.raises(LoadRefused, match="signed as 'step1000', checked as 'step2000'"):
        load(newer / "model.pt", trusted=trusted)
    shutil.rmtree(newer)
    newer.symlink_to(older, target_is_directory=True)
    with pytest.raises(LoadRefused, match="signed as 'step1000'") as refused:
        load(newer / "model.pt", trusted=trusted)
    assert "symlink" in str(refused.value.hint)


def test_trust_policy_from_the_environment(
    tmp_path: Path, key: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _signed_torch_file(tmp_path, key)
    key.public().save(tmp_path / "team.pub")
    policy = tmp_path / "trust.toml"
    policy.write_text('[[trust.key]]\nname = "team"\npath = "team.pub"\n')
    _assert_state_equal(load(path, trust_policy=policy))
    monkeypatch.setenv("TRAINGUARD_TRUST_POLICY", str(policy))
    _assert_state_equal(load(path))


def test_refuses_without_trusted_keys(tmp_path: Path, key: PrivateKey) -> None:
    path = _signed_torch_file(tmp_path, key)
    with pytest.raises(LoadRefused, match="no trusted keys") as caught:
        load(path)
    assert "trust_policy" in caught.value.diagnostics()


def test_refuses_an_unsigned_file(tmp_path: Path, trusted: list[PublicKey]) -> None:
    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    with pytest.raises(LoadRefused, match="not signed") as caught:
        load(path, trusted=trusted)
    assert str(path) in caught.value.message
    assert "trainguard sign" in caught.value.diagnostics()


def test_a_missing_file_is_named_as_missing_and_the_fix_shows_in_a_traceback(
    tmp_path: Path, trusted: list[PublicKey]
) -> None:
    with pytest.raises(LoadRefused, match="it does not exist"):
        load(tmp_path / "nowhere.pt", trusted=trusted)
    # Uncaught, as in a training script: the traceback's last line carries the hint.
    script = f"import torch, trainguard\ntrainguard.load({str(tmp_path / 'model.pt')!r}, trusted=[])\n"
    torch.save(_state(), tmp_path / "model.pt")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "LoadRefused: refused to load: no trusted keys" in done.stderr
    assert "hint: " in done.stderr.splitlines()[-1]


def test_refuses_a_file_signed_by_an_untrusted_key(
    tmp_path: Path, stranger: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = _signed_torch_file(tmp_path, stranger)
    with pytest.raises(LoadRefused) as caught:
        load(path, trusted=trusted)
    assert str(path) in caught.value.message
    assert stranger.public().key_id in caught.value.diagnostics()


def test_refuses_a_byte_flipped_after_signing(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = _signed_torch_file(tmp_path, key)
    load(path, trusted=trusted)  # warms the cache
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LoadRefused, match="modified") as caught:
        load(path, trusted=trusted)
    assert "do not match the signed digest" in caught.value.message


def test_refuses_same_size_rewrite_with_old_mtime_and_warm_cache(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = _signed_torch_file(tmp_path, key)
    load(path, trusted=trusted)
    _rewrite_same_size(path)  # the ctime still moves, so the cache cannot vouch for it
    with pytest.raises(LoadRefused):
        load(path, trusted=trusted)


def test_swap_between_verification_and_read_is_caught(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TOCTOU: the file is replaced right after its signature checked out. The bytes loaded are re-hashed,
    so the replacement is refused instead of loaded."""
    path = _signed_torch_file(tmp_path, key)
    (tmp_path / "attacker").mkdir()
    evil = tmp_path / "attacker" / "model.pt"  # torch names the archive's records after the file
    torch.save({"w": torch.zeros(64, 32), "b": torch.arange(32), "step": 4}, evil)
    assert evil.stat().st_size == path.stat().st_size
    real_verify = _load._verify

    def verify_then_swap(*args: Any, **kwargs: Any) -> Any:
        result = real_verify(*args, **kwargs)
        evil.replace(path)
        return result

    monkeypatch.setattr(_load, "_verify", verify_then_swap)
    with pytest.raises(LoadRefused, match="replaced after the signature was checked"):
        load(path, trusted=trusted)


class _Hashing:
    """Counts what is hashed: files hashed from disk (by name) and byte strings checked before loading."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.from_disk: list[str] = []
        self.in_memory = 0
        real_match = _load._digests_match

        def hash_files(files: Any, **kwargs: Any) -> Any:
            self.from_disk.extend(Path(item.location).name for item in files)
            return hash_files_from_disk(files, **kwargs)

        def digests_match(*args: Any) -> bool:
            self.in_memory += 1
            return bool(real_match(*args))

        monkeypatch.setattr(manifest_module, "hash_files", hash_files)
        monkeypatch.setattr(_load, "_digests_match", digests_match)

    def reset(self) -> None:
        self.from_disk.clear()
        self.in_memory = 0


def test_cold_load_hashes_the_file_once_from_the_bytes_it_loads(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _signed_torch_file(tmp_path, key)
    hashing = _Hashing(monkeypatch)
    _assert_state_equal(load(path, trusted=trusted))
    assert hashing.from_disk == []
    assert hashing.in_memory == 1


def _signed_directory(tmp_path: Path, key: PrivateKey) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("a.pt", "b.pt", "c.pt"):
        torch.save(_state(), folder / name)
    (folder / "config.json").write_text("{}")
    sign_path(folder, key)
    return folder


def test_loading_every_file_of_a_directory_hashes_each_file_once(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _signed_directory(tmp_path, key)
    monkeypatch.setattr(_load, "_RACY_NS", 50_000_000)  # remember files older than 50 ms
    time.sleep(0.1)
    hashing = _Hashing(monkeypatch)
    _assert_state_equal(load(folder / "a.pt", trusted=trusted))
    assert sorted(hashing.from_disk) == ["b.pt", "c.pt", "config.json"]  # a.pt only from its bytes
    assert hashing.in_memory == 1
    hashing.reset()
    _assert_state_equal(load(folder / "b.pt", trusted=trusted))
    _assert_state_equal(load(folder / "c.pt", trusted=trusted))
    _assert_state_equal(load(folder / "a.pt", trusted=trusted))
    assert hashing.from_disk == []
    assert hashing.in_memory == 3  # what is loaded is always checked


def test_the_memo_notices_a_member_rewritten_in_place(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _signed_directory(tmp_path, key)
    monkeypatch.setattr(_load, "_RACY_NS", 50_000_000)
    time.sleep(0.1)
    load(folder / "a.pt", trusted=trusted)
    load(folder / "b.pt", trusted=trusted)
    _rewrite_same_size(folder / "b.pt")  # size and mtime restored; the ctime moves
    with pytest.raises(LoadRefused, match=r"modified: b\.pt"):
        load(folder / "a.pt", trusted=trusted)
    with pytest.raises(LoadRefused, match="do not match the signed digest"):
        load(folder / "b.pt", trusted=trusted)


def test_recent_files_are_hashed_again_rather_than_remembered(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file changed within the clock tick of its last stat may keep its ctime: it is never remembered."""
    folder = _signed_directory(tmp_path, key)  # just written: within the 2 s window
    hashing = _Hashing(monkeypatch)
    load(folder / "a.pt", trusted=trusted)
    hashing.reset()
    load(folder / "b.pt", trusted=trusted)
    assert sorted(hashing.from_disk) == ["a.pt", "c.pt", "config.json"]


def test_a_new_signature_file_is_checked_again(
    tmp_path: Path, key: PrivateKey, stranger: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = _signed_torch_file(tmp_path, key)
    load(path, trusted=trusted)
    Path(f"{path}.trainguard.sig").unlink()
    sign_path(path, stranger)  # a new signature file, by another key only
    with pytest.raises(LoadRefused, match="no trusted key"):
        load(path, trusted=trusted)
    load(path, trusted=[stranger.public()])
    sign_path(path, key)  # both keys now
    load(path, trusted=trusted)
    with pytest.raises(LoadRefused, match="no trusted key"):
        load(path, trusted=[PrivateKey.generate("ed25519").public()])


def _malicious_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"echo pwned > {marker}",))

    return pickle.dumps({"w": Payload()}, protocol=2)


def test_refuses_a_malicious_pickle_even_when_signed_by_a_trusted_key(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(_malicious_pickle(marker))
    sign_path(path, key)
    with pytest.raises(LoadRefused, match="scan found") as caught:
        load(path, trusted=trusted)
    assert "signature does not make it safe" in caught.value.diagnostics()
    assert not marker.exists()


def test_load_rejects_options_that_would_skip_the_checks(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = _signed_torch_file(tmp_path, key)
    with pytest.raises(Exception, match="weights_only"):
        load(path, trusted=trusted, weights_only=False)


# --- the gate in front of the frameworks ---


def test_gated_torch_load(tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]) -> None:
    signed = _signed_torch_file(tmp_path, key)
    unsigned = tmp_path / "unsigned.pt"
    torch.save(_state(), unsigned)
    with load_gate(trusted=trusted):
        _assert_state_equal(torch.load(signed, weights_only=False, map_location="cpu"))
        _assert_state_equal(torch.load(str(signed)))
        with pytest.raises(LoadRefused, match="not signed"):
            torch.load(unsigned)
        with pytest.raises(LoadRefused, match="not a path"), signed.open("rb") as handle:
            torch.load(handle)
        with pytest.raises(LoadRefused, match="not a path"):
            torch.load(io.BytesIO(signed.read_bytes()))
    _assert_state_equal(torch.load(unsigned))  # the gate is gone


def test_gated_torch_load_refuses_a_signed_malicious_pickle(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(_malicious_pickle(marker))
    sign_path(path, key)
    with load_gate(trusted=trusted), pytest.raises(LoadRefused, match="scan found"):
        torch.load(path, weights_only=False)
    assert not marker.exists()


def test_gated_numpy_load(tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]) -> None:
    signed = tmp_path / "array.npy"
    numpy.save(signed, numpy.arange(12).reshape(3, 4))
    sign_path(signed, key)
    unsigned = tmp_path / "other.npy"
    numpy.save(unsigned, numpy.arange(3))
    with load_gate(trusted=trusted):
        assert numpy.array_equal(numpy.load(signed), numpy.arange(12).reshape(3, 4))
        assert numpy.array_equal(numpy.load(signed, mmap_mode="r"), numpy.arange(12).reshape(3, 4))
        with pytest.raises(LoadRefused, match="not signed"):
            numpy.load(unsigned)
        with pytest.raises(LoadRefused, match="not a path"), signed.open("rb") as handle:
            numpy.load(handle)


def test_gated_numpy_load_refuses_an_object_array_even_when_signed(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]
) -> None:
    path = tmp_path / "objects.npy"
    numpy.save(path, numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
    sign_path(path, key)
    with load_gate(trusted=trusted), pytest.raises((LoadRefused, ValueError)):
        numpy.load(path, allow_pickle=True)


def test_gated_safetensors(tmp_path: Path, key: PrivateKey, trusted: list[PublicKey]) -> None:
    import safetensors

    signed = tmp_path / "model.safetensors"
    safetensors_torch.save_file({"w": torch.full((2, 3), 5.0)}, signed)
    sign_path(signed, key)
    unsigned = tmp_path / "other.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(1)}, unsigned)
    with load_gate(trusted=trusted):
        assert torch.equal(safetensors_torch.load_file(signed)["w"], torch.full((2, 3), 5.0))
        with safetensors.safe_open(signed, framework="pt") as handle:
            assert list(handle.keys()) == ["w"]
            assert torch.equal(handle.get_tensor("w"), torch.full((2, 3), 5.0))
        with pytest.raises(LoadRefused, match="not signed"):
            safetensors_torch.load_file(unsigned)
        with pytest.raises(LoadRefused, match="not signed"):
            safetensors.safe_open(str(unsigned), framework="pt")
        data = bytearray(signed.read_bytes())
        data[-1] ^= 0x01
        signed.write_bytes(bytes(data))
        with pytest.raises(LoadRefused, match="modified"):
            safetensors.safe_open(signed, framework="pt")


def test_uninstall_restores_every_original(trusted: list[PublicKey]) -> None:
    import safetensors

    originals = (torch.load, numpy.load, safetensors_torch.load_file, safetensors.safe_open)
    uninstall = install_load_gate(trusted=trusted)
    try:
        assert torch.load is not originals[0]
        assert numpy.load is not originals[1]
        assert safetensors_torch.load_file is not originals[2]
        assert safetensors.safe_open is not originals[3]
        inner = install_load_gate(trusted=trusted)
        inner()
    finally:
        uninstall()
    assert (torch.load, numpy.load, safetensors_torch.load_file, safetensors.safe_open) == originals
    uninstall()  # a second call changes nothing
    assert torch.load is originals[0]


def test_install_without_trusted_keys_is_refused() -> None:
    original = torch.load
    with pytest.raises(LoadRefused, match="no trusted keys"):
        install_load_gate()
    assert torch.load is original


def test_from_pretrained_is_gated_on_local_signed_directories(
    tmp_path: Path, key: PrivateKey, trusted: list[PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline: the model is built here from a config, and nothing may be fetched from the Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # in case it was imported before
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    folder = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(folder)
    with load_gate(trusted=trusted):
        with pytest.raises(LoadRefused, match="not signed"):
            transformers.BertModel.from_pretrained(folder)
        sign_path(folder, key)
        assert transformers.BertModel.from_pretrained(folder).config.hidden_size == 8
        (folder / "config.json").write_text(
            (folder / "config.json").read_text().replace('"hidden_size": 8', '"hidden_size": 16')
        )
        with pytest.raises(LoadRefused, match=r"config\.json"):
            transformers.BertModel.from_pretrained(folder)
        with pytest.raises(LoadRefused, match="local"):
            transformers.BertModel.from_pretrained("bert-base-uncased")


def test_importing_the_gate_does_not_import_torch() -> None:
    code = (
        "import sys, trainguard, trainguard.gate, trainguard.gate._load, trainguard.gate._save; "
        "bad = sorted({'torch', 'numpy', 'safetensors', 'transformers'} & set(sys.modules)); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
