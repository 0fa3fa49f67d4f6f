"""The load gate: a checkpoint is loaded only if a trusted key signed it, its bytes still match the
signature, and the scan finds nothing in them.

The bytes are read into memory once; those bytes are hashed against the signed manifest, scanned, and
deserialised. The file is not hashed from disk beforehand and nothing is read from the path again, so a
file swapped on disk after the signature was checked is either caught by the hash or never read (no
time-of-check/time-of-use window). The other files of a signed directory are checked by stat against the
re-verification cache, or hashed.

Within one process, what was verified is remembered: a signature file whose bytes were already checked
against the same trusted keys is not parsed and checked again, and a member file whose stat is unchanged
since it was hashed (or loaded) is not hashed again, under the same ctime rule as the cache (see
`trainguard.gate._cache`). Loading every file of a signed directory thus hashes each file once.

`install_load_gate()` puts the same checks in front of `torch.load`, `numpy.load`,
`safetensors.torch.load_file`, `safetensors.safe_open` and transformers' `from_pretrained` (local
directories). Each framework is imported inside the function that uses it: importing this module imports
none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import mmap
import os
import sqlite3
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard.errors import TrainguardError, UsageError, VerificationFailed
from trainguard.findings import Verdict
from trainguard.gate._cache import VerifyCache
from trainguard.ledger._ledger import default_home
from trainguard.provenance import (
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    PublicKey,
    SignatureFile,
    VerifyResult,
    load_trust_policy,
    signature_path,
)
from trainguard.provenance._signature import choose_signer, read_signature_bytes, verify_tree

if TYPE_CHECKING:
    from trainguard.scan.result import FileResult

__all__ = ["LoadRefused", "install_load_gate", "load", "load_gate", "resolve_trusted"]

StrPath = str | os.PathLike[str]

_SIGN_HINT = "sign it with `trainguard sign {path}` (or trainguard.save(obj, path, key=...))"
_TRUST_HINT = (
    "pass trusted=[PublicKey.load(...)] or trust_policy=FILE, or set TRAINGUARD_TRUST_POLICY "
    "(the CLI takes --trust KEY or --trust-policy FILE)"
)


class LoadRefused(VerificationFailed):
    """A checkpoint was not loaded: `path` (None when no file was involved yet) and `reason` say which and
    why; the hint says what to do about it."""

    def __init__(self, path: StrPath | None, reason: str, *, hint: str | None = None) -> None:
        where = f"refused to load {os.fspath(path)}" if path is not None else "refused to load"
        super().__init__(f"{where}: {reason}", hint=hint)
        self.path = None if path is None else Path(path)
        self.reason = reason


def resolve_trusted(
    trusted: Sequence[PublicKey] | None = None, trust_policy: StrPath | None = None
) -> tuple[PublicKey, ...]:
    """The keys whose signatures are trusted: `trusted`, else the policy file, else the file named by
    $TRAINGUARD_TRUST_POLICY. Never an empty set: nothing is trusted by default."""
    if trusted is not None:
        keys = tuple(trusted)
    else:
        policy = trust_policy if trust_policy is not None else os.environ.get("TRAINGUARD_TRUST_POLICY")
        keys = tuple(load_trust_policy(Path(policy))) if policy else ()
    if not keys:
        raise LoadRefused(None, "no trusted keys", hint=_TRUST_HINT)
    return keys


def load(
    path: StrPath,
    *,
    trusted: Sequence[PublicKey] | None = None,
    trust_policy: StrPath | None = None,
    map_location: Any = None,
    **kwargs: Any,
) -> Any:
    """Verify, scan and load a checkpoint file; raise `LoadRefused` instead if any check fails.

    PyTorch files load with ``torch.load(weights_only=True)``, safetensors files with
    ``safetensors.torch.load`` and ``.npy``/``.npz`` files with ``numpy.load(allow_pickle=False)``, each
    from the verified bytes in memory. `kwargs` go to ``torch.load``.
    """
    for forbidden in ("weights_only", "pickle_module", "mmap"):
        if forbidden in kwargs:
            raise UsageError(
                f"trainguard.load does not take {forbidden}=: it always loads the verified bytes from memory "
                "with weights_only=True"
            )
    keys = resolve_trusted(trusted, trust_policy)
    checked = _read_verified(Path(path), keys)
    return _deserialise(checked, None, map_location, kwargs)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """Bytes of `path` that match the signed manifest and that the scan passed."""

    path: Path
    data: bytes
    scan: FileResult


@dataclasses.dataclass(frozen=True)
class _Signed:
    """What the signature of `target` says `path` must hold, after the signature and the rest of the tree
    verified; the bytes of `path` itself are still to be checked against `entry`."""

    path: Path
    target: Path
    entry: FileEntry
    shard_size: int


# A file whose ctime is this recent when it is hashed may change again within the same clock tick and
# keep its ctime; its digests are not remembered (the rule and the value of VerifyCache).
_RACY_NS = 2_000_000_000
_MAX_SIGNATURES = 64
_MAX_FILES = 65536
# SHA-256 of a signature file's bytes, and the (key id, name) of each trusted key.
_SignerKey = tuple[bytes, tuple[tuple[str, str], ...]]


class _Memo:
    """What this process has verified: trusted signatures, by the signature file's bytes and the trusted
    keys, and member digests, by the file's path and stat (`trainguard.gate._cache` explains why a stat
    that still matches, ctime included, vouches for the content). Bounded; the oldest entries go first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signers: OrderedDict[_SignerKey, tuple[Manifest, PublicKey]] = OrderedDict()
        self._files: OrderedDict[bytes, tuple[tuple[int, ...], FileEntry]] = OrderedDict()

    def clear(self) -> None:
        with self._lock:
            self._signers.clear()
            self._files.clear()

    def signer(self, key: _SignerKey) -> tuple[Manifest, PublicKey] | None:
        with self._lock:
            return self._signers.get(key)

    def add_signer(self, key: _SignerKey, value: tuple[Manifest, PublicKey]) -> None:
        with self._lock:
            self._signers[key] = value
            while len(self._signers) > _MAX_SIGNATURES:
                self._signers.popitem(last=False)

    def file(self, path: Path, st: os.stat_result) -> FileEntry | None:
        with self._lock:
            found = self._files.get(_path_key(path))
        if found is None or found[0] != _stat_key(st):
            return None
        return found[1]

    def add_file(self, path: Path, st: os.stat_result, entry: FileEntry, started_ns: int) -> None:
        if st.st_ctime_ns > started_ns - _RACY_NS or entry.size != st.st_size:
            return
        with self._lock:
            key = _path_key(path)
            self._files.pop(key, None)
            self._files[key] = (_stat_key(st), entry)
            while len(self._files) > _MAX_FILES:
                self._files.popitem(last=False)


_MEMO = _Memo()


def _path_key(path: Path) -> bytes:
    return os.fsencode(os.path.abspath(path))  # noqa: PTH100 - the lexical absolute path, as the cache


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Digests:
    """The digests known without hashing: this process's memo first, then the re-verification cache.
    New digests go to both; `started_ns` is when this verification began (for the ctime rule)."""

    def __init__(self, cache: VerifyCache | None) -> None:
        self._cache = cache
        self._started_ns = time.time_ns()

    def get(self, path: Path, st: os.stat_result) -> FileEntry | None:
        entry = _MEMO.file(path, st)
        if entry is None and self._cache is not None:
            entry = self._cache.get(path, st)
            if entry is not None:
                _MEMO.add_file(path, st, entry, self._started_ns)
        return entry

    def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None:
        _MEMO.add_file(path, st, entry, self._started_ns)
        if self._cache is not None:
            self._cache.put(path, st, entry)


def _verify(path: Path, keys: Sequence[PublicKey], digests: _Digests | None = None) -> _Signed:
    """Verify the signature that covers `path` (its own, else that of the nearest signed directory) and
    every other file under it. The content of `path` is left to `_check_bytes`, on the bytes loaded."""
    if path.is_dir():
        raise UsageError(f"{path} is a directory: load one of its files")
    target, relative = _signed_target(path)
    with contextlib.ExitStack() as stack:
        if digests is None:
            digests = _Digests(stack.enter_context(_digest_cache()))
        document, signer = _trusted_document(target, path, keys)
        entry = _entry(document, relative)
        if entry is None:
            raise LoadRefused(
                path,
                f"the signature of {target} does not cover {relative}",
                hint=_SIGN_HINT.format(path=target),
            )
        _verify_tree(target, path, document, signer, digests, defer=(entry.path,))
    return _Signed(path, target, entry, document.shard_size)


def _fix_hint(target: Path) -> str:
    return (
        f"if the change is yours, re-sign with `trainguard sign {target}`; if the signer is unknown, trust "
        "its key with --trust KEY (or trusted=[...]) only after checking whose it is"
    )


def _signed_target(path: Path) -> tuple[Path, str]:
    """The path whose signature covers `path` and the name `path` has in its manifest."""
    if signature_path(path).exists():
        return path, path.name
    # Lexical, not resolved: a symlink inside a signed directory is looked up under its own name.
    absolute = Path(os.path.abspath(path))  # noqa: PTH100 - see above
    for parent in absolute.parents:
        if (parent / SIGNATURE_NAME).is_file():
            return parent, absolute.relative_to(parent).as_posix()
    if not os.path.lexists(path):
        raise LoadRefused(path, "it does not exist", hint="check the path")
    raise LoadRefused(path, "it is not signed", hint=_SIGN_HINT.format(path=path))


def _entry(manifest: Manifest, relative: str) -> FileEntry | None:
    if manifest.kind == "file":
        return manifest.files[0] if len(manifest.files) == 1 else None
    seen = 0
    # An in-tree symlink resolves to the entry of its target (bounded: the manifest has no cycles).
    while seen <= len(manifest.links):
        for entry in manifest.files:
            if entry.path == relative:
                return entry
        link = next((lk for lk in manifest.links if lk.path == relative), None)
        if link is None:
            return None
        relative = link.target
        seen += 1
    return None


def _trusted_document(target: Path, shown: Path, keys: Sequence[PublicKey]) -> tuple[Manifest, PublicKey]:
    """The manifest in the signature file of `target` and the trusted key that signed it. The file is read
    every time; its signature is checked once per process for the same bytes and keys."""
    sig_file = signature_path(target)
    try:
        data = read_signature_bytes(sig_file)
        memo_key = (hashlib.sha256(data).digest(), tuple((key.key_id, key.name) for key in keys))
        known = _MEMO.signer(memo_key)
        if known is not None:
            return known
        document = SignatureFile.from_bytes(data, str(sig_file))
        signer = choose_signer(document, keys, str(sig_file))
    except VerificationFailed as exc:
        raise LoadRefused(shown, exc.message, hint=exc.hint or _fix_hint(target)) from exc
    _MEMO.add_signer(memo_key, (document.manifest, signer))
    return document.manifest, signer


def _verify_tree(
    target: Path,
    shown: Path,
    manifest: Manifest,
    signer: PublicKey,
    digests: _Digests,
    *,
    defer: tuple[str, ...] = (),
) -> VerifyResult:
    """verify_tree through the memo and the cache; every failure becomes a LoadRefused about `shown`."""
    try:
        result = verify_tree(
            target,
            manifest,
            signer,
            signature=signature_path(target),
            full=False,
            digest_cache=digests,
            defer=defer,
        )
    except VerificationFailed as exc:
        raise LoadRefused(shown, exc.message, hint=exc.hint or _fix_hint(target)) from exc
    except TrainguardError as exc:
        raise LoadRefused(shown, exc.message, hint=exc.hint) from exc
    if not result.ok:
        problems = "; ".join(result.diff.describe()) or "the files differ from the signed manifest"
        raise LoadRefused(shown, problems, hint=_fix_hint(target))
    return result


@contextlib.contextmanager
def _digest_cache() -> Iterator[VerifyCache | None]:
    """The re-verification cache, or None where it cannot be opened (then every file is re-hashed)."""
    try:
        cache = VerifyCache(default_home())
    except (OSError, TrainguardError, sqlite3.Error):
        yield None
        return
    with cache:
        yield cache


def _read_verified(path: Path, keys: Sequence[PublicKey]) -> _Checked:
    with _digest_cache() as cache:
        digests = _Digests(cache)
        signed = _verify(path, keys, digests)
        data, st = _read_once(path)
        _check_bytes(path, data, signed)
        if st is not None:
            # The bytes read are those of this file while it had this stat: its other readers (the
            # directory's other members) need not hash it again.
            digests.put(path, st, dataclasses.replace(signed.entry, mode=stat.S_IMODE(st.st_mode)))
    return _Checked(path, data, _scan(path, data))


def _read_once(path: Path) -> tuple[bytes, os.stat_result | None]:
    """The bytes of `path`, read through one descriptor, and its stat if it did not change while read."""
    try:
        # O_NONBLOCK: a FIFO put in place of the checkpoint must not hang the load.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise LoadRefused(path, f"cannot open it ({exc.strerror})", hint="check the path") from exc
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise LoadRefused(path, "not a regular file", hint="load the checkpoint file itself")
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            data = handle.readall()
        after = os.fstat(fd)
    except OSError as exc:
        raise LoadRefused(path, f"cannot read it ({exc.strerror})", hint="check the file") from exc
    finally:
        os.close(fd)
    unchanged = _stat_key(before) == _stat_key(after) and len(data) == after.st_size
    return data, after if unchanged else None


def _check_bytes(path: Path, data: bytes | mmap.mmap, signed: _Signed) -> None:
    """The bytes about to be loaded are the bytes that were signed: same size, same digests."""
    entry = signed.entry
    if len(data) == entry.size and _digests_match(data, entry, signed.shard_size):
        return
    raise LoadRefused(
        path,
        "its bytes do not match the signed digest (the file was modified, or replaced after the signature "
        "was checked)",
        hint=_fix_hint(signed.target),
    )


def _digests_match(data: bytes | mmap.mmap, entry: FileEntry, shard_size: int) -> bool:
    view = memoryview(data)
    try:
        count = -(-len(data) // shard_size) if shard_size > 0 else 0
        if entry.shards and len(entry.shards) == count:
            # Every signed shard digest matching is as strong as the whole-file digest, and the shards
            # hash in parallel (hashlib releases the GIL).
            def shard(index: int) -> str:
                return hashlib.sha256(view[index * shard_size : (index + 1) * shard_size]).hexdigest()

            with ThreadPoolExecutor(max_workers=min(count, os.cpu_count() or 1)) as pool:
                return list(pool.map(shard, range(count))) == list(entry.shards)
        return hashlib.sha256(view).hexdigest() == entry.digest
    finally:
        view.release()


def _scan(path: Path, data: bytes | mmap.mmap) -> FileResult:
    # Imported here: `trainguard sign` and `verify` import this package but never scan.
    from trainguard.scan.api import scan_bytes

    result = scan_bytes(data, str(path))
    if result.verdict is Verdict.FINDINGS:
        first = result.findings[0]
        more = f" (and {len(result.findings) - 1} more)" if len(result.findings) > 1 else ""
        raise LoadRefused(
            path,
            f"the scan found {first.rule}: {first.message}{more}",
            hint=f"do not load it; see `trainguard scan {path}` — a valid signature does not make it safe",
        )
    if result.verdict is Verdict.UNDECIDED:
        reason = result.problems[0].message if result.problems else "analysis incomplete"
        raise LoadRefused(path, f"the scan could not decide ({reason})", hint=f"see `trainguard scan {path}`")
    if result.verdict is Verdict.SKIPPED:
        raise LoadRefused(
            path, f"not a model format ({result.note})", hint="load .pt/.bin, .safetensors or .npy/.npz files"
        )
    return result


# --- deserialising from memory ---

# The functions the gate replaced, so that the gate itself calls the real loaders.
_originals: dict[tuple[str, str], Any] = {}


def _original(module: Any, name: str) -> Any:
    return _originals.get((module.__name__, name), getattr(module, name))


def _loader_for(checked: _Checked) -> str:
    formats = checked.scan.formats
    first = formats[0] if formats else ""
    if first == "safetensors":
        return "safetensors"
    if first == "npy":
        return "numpy"
    if first == "zip" and "pytorch" not in formats and set(formats) <= {"zip", "npy"}:
        return "numpy"  # an .npz archive
    if first in ("zip", "pickle", "pytorch-legacy"):
        return "torch"
    raise LoadRefused(
        checked.path,
        f"trainguard.load does not read {first or 'this'} files",
        hint="load .pt/.bin, .safetensors or .npy/.npz files",
    )


def _deserialise(checked: _Checked, loader: str | None, map_location: Any, kwargs: dict[str, Any]) -> Any:
    loader = loader or _loader_for(checked)
    if loader == "safetensors":
        return _load_safetensors(checked, map_location)
    if loader == "numpy":
        import numpy

        numpy_load = _original(numpy, "load")
        return numpy_load(io.BytesIO(checked.data), allow_pickle=False, **kwargs)
    import torch

    torch_load = _original(torch, "load")
    # BytesIO over bytes shares the buffer: no second copy of the checkpoint.
    return torch_load(io.BytesIO(checked.data), map_location=map_location, weights_only=True, **kwargs)


def _load_safetensors(checked: _Checked, device: Any) -> Any:
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(checked.data)
    if device is None or device == "cpu":
        return tensors
    if not isinstance(device, (str, int)) and type(device).__name__ != "device":
        raise UsageError("safetensors files take map_location as a device (str, int or torch.device)")
    return {name: tensor.to(device) for name, tensor in tensors.items()}


# --- the gate in front of the frameworks ---


def _is_path(obj: object) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _refuse_stream(obj: object, what: str) -> LoadRefused:
    return LoadRefused(
        None,
        f"{what} was given a {type(obj).__name__}, not a path: the bytes of a stream cannot be matched "
        "to a signature",
        hint="pass the path of the signed file, or use trainguard.load(path)",
    )


def _gated_torch_load(keys: tuple[PublicKey, ...]) -> Callable[..., Any]:
    def load_gated(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        # weights_only, mmap and pickle_module are the caller's wishes for an unchecked file; the gate
        # always loads the verified bytes from memory with weights_only=True.
        for ignored in ("weights_only", "mmap"):
            kwargs.pop(ignored, None)
        del pickle_module
        if not _is_path(f):
            raise _refuse_stream(f, "torch.load")
        checked = _read_verified(Path(f), keys)
        return _deserialise(checked, "torch", map_location, kwargs)

    return load_gated


def _gated_numpy_load(keys: tuple[PublicKey, ...]) -> Callable[..., Any]:
    def load_gated(file: Any, mmap_mode: Any = None, allow_pickle: bool = False, **kwargs: Any) -> Any:
        # Loaded from memory: no memory map, and never a pickle (allow_pickle is the caller's wish).
        del mmap_mode, allow_pickle
        kwargs.pop("fix_imports", None)
        if not _is_path(file):
            raise _refuse_stream(file, "numpy.load")
        checked = _read_verified(Path(file), keys)
        return _deserialise(checked, "numpy", None, kwargs)

    return load_gated


def _gated_load_file(keys: tuple[PublicKey, ...]) -> Callable[..., Any]:
    def load_file_gated(filename: Any, device: Any = "cpu") -> Any:
        if not _is_path(filename):
            raise _refuse_stream(filename, "safetensors.torch.load_file")
        checked = _read_verified(Path(filename), keys)
        return _load_safetensors(checked, device)

    return load_file_gated


def _gated_safe_open(keys: tuple[PublicKey, ...], original: Any) -> Callable[..., Any]:
    def safe_open_gated(filename: Any, framework: Any, device: Any = "cpu") -> Any:
        if not _is_path(filename):
            raise _refuse_stream(filename, "safetensors.safe_open")
        path = Path(filename)
        signed = _verify(path, keys)
        fd = _open_regular(path)
        try:
            # safe_open maps the file by name, lazily. The checks run on a map of the file we opened, and
            # safe_open opens that same file through /proc/self/fd: replacing the path (rename, swap)
            # cannot change what is loaded. Writing into the file in place while it is mapped can:
            # guarding against that needs write permission kept from the attacker, or trainguard.load.
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if os.fstat(fd).st_size else b""
            try:
                _check_bytes(path, mapped, signed)
                _scan(path, mapped)
            finally:
                if isinstance(mapped, mmap.mmap):
                    mapped.close()
            same_file = f"/proc/self/fd/{fd}" if sys.platform.startswith("linux") else str(path)
            return original(same_file, framework=framework, device=device)
        finally:
            os.close(fd)

    return safe_open_gated


def _open_regular(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise LoadRefused(path, f"cannot open it ({exc.strerror})", hint="check the path") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LoadRefused(path, "not a regular file", hint="load the checkpoint file itself")
    return fd


def _gated_from_pretrained(keys: tuple[PublicKey, ...], original: Any) -> Any:
    function = original.__func__

    def from_pretrained_gated(cls: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        where = pretrained_model_name_or_path
        if not _is_path(where) or not Path(where).is_dir():
            raise LoadRefused(
                None if not _is_path(where) else where,
                f"from_pretrained({where!r}) under the load gate takes a local, signed directory",
                hint="download the model, check it, sign the directory with `trainguard sign DIR`, and load "
                "it from there",
            )
        _verify_directory(Path(where), keys)
        return function(cls, where, *args, **kwargs)

    return classmethod(from_pretrained_gated)


def _verify_directory(directory: Path, keys: Sequence[PublicKey]) -> None:
    if not signature_path(directory).exists():
        raise LoadRefused(directory, "the directory is not signed", hint=_SIGN_HINT.format(path=directory))
    manifest, signer = _trusted_document(directory, directory, keys)
    with _digest_cache() as cache:
        _verify_tree(directory, directory, manifest, signer, _Digests(cache))


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def install_load_gate(
    *, trusted: Sequence[PublicKey] | None = None, trust_policy: StrPath | None = None
) -> Callable[[], None]:
    """Put the gate in front of the loaders of every installed framework; return the function that takes
    it away again. Code that imported a loader by name before this call (``from torch import load``)
    keeps the original: install the gate first."""
    keys = resolve_trusted(trusted, trust_policy)
    patches: list[tuple[Any, str, Any]] = []
    if _installed("torch"):
        import torch

        patches.append((torch, "load", _gated_torch_load(keys)))
    if _installed("numpy"):
        import numpy

        patches.append((numpy, "load", _gated_numpy_load(keys)))
    if _installed("safetensors"):
        import safetensors
        import safetensors.torch

        patches.append((safetensors.torch, "load_file", _gated_load_file(keys)))
        original_open = _original(safetensors, "safe_open")
        gated_open = _gated_safe_open(keys, original_open)
        patches.append((safetensors, "safe_open", gated_open))
        patches.append((safetensors.torch, "safe_open", gated_open))
    if _installed("transformers"):
        import importlib

        # Through importlib: transformers is optional and carries no type information here.
        model = importlib.import_module("transformers.modeling_utils").PreTrainedModel
        original = model.__dict__["from_pretrained"]
        patches.append((model, "from_pretrained", _gated_from_pretrained(keys, original)))
    return _apply(patches)


def _apply(patches: list[tuple[Any, str, Any]]) -> Callable[[], None]:
    saved: list[tuple[Any, str, Any, Any]] = []
    for owner, name, replacement in patches:
        # Class attributes are saved from __dict__ so that a classmethod is restored as itself.
        current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        # The first original is kept for good: the gate's own loads must reach the real loader even
        # while gates are nested or were removed out of order.
        _originals.setdefault((_owner_name(owner), name), current)
        saved.append((owner, name, current, replacement))
        setattr(owner, name, replacement)

    def uninstall() -> None:
        for owner, name, previous, replacement in reversed(saved):
            now = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            if now is replacement:
                setattr(owner, name, previous)
        saved.clear()

    return uninstall


def _owner_name(owner: Any) -> str:
    return f"{owner.__module__}.{owner.__qualname__}" if isinstance(owner, type) else str(owner.__name__)


@contextlib.contextmanager
def load_gate(
    *, trusted: Sequence[PublicKey] | None = None, trust_policy: StrPath | None = None
) -> Iterator[None]:
    """The gate for the duration of a `with` block."""
    uninstall = install_load_gate(trusted=trusted, trust_policy=trust_policy)
    try:
        yield
    finally:
        uninstall()
