"""Raw pickle streams: one or several pickles, joblib files and the legacy PyTorch stream format."""

from __future__ import annotations

import struct
from collections.abc import Callable

from trainguard._pickle.machine import Event, Machine, MachineResult
from trainguard._pickle.reader import LimitError, PickleSyntaxError
from trainguard._pickle.values import Call, Dct, Global, Opaque, PersRef, Seq, Value, const_tuple
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.dtypes import pickled_numpy_dtype, storage_element_size
from trainguard.scan.policy import is_importable_name, module_can_be_found

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_JOBLIB_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"


def run_pickle(
    scan: Scan,
    art: Artifact,
    start: int,
    *,
    strict: bool = True,
    joblib: bool = True,
    prefix: str = "",
    judge: bool = True,
) -> MachineResult:
    """Run one pickle from absolute offset `start` and turn its events into findings.

    With strict=False the bytes are only possibly a pickle (another interpretation of a file):
    imports that `__import__` would reject are dropped, since the load would stop there.
    With judge=False the caller judges the events of the returned result itself.
    """
    arrays = _JoblibArrays(scan, art, prefix) if joblib else None
    hook = arrays.on_build if arrays is not None else None
    result = Machine(
        art.data, start, art.end, limits=scan.limits.pickle, build_hook=hook, ops_spent=scan.ops_spent
    ).run()
    scan.ops_spent += result.ops
    if judge:
        judge_events(scan, art, result, strict=strict, prefix=prefix)
    if arrays is not None and arrays.fired:
        # joblib.load skips the bytes after each array header; every other unpickler reads them
        # as opcodes. Judge that reading too, or a payload hides in the "array data".
        plain = Machine(art.data, start, art.end, limits=scan.limits.pickle, ops_spent=scan.ops_spent).run()
        scan.ops_spent += plain.ops
        judge_events(scan, art, plain, strict=False, prefix=f"{prefix}{_PLAIN_READING}")
        limit_reached(scan, art, plain, f"{prefix}{_PLAIN_READING}")
    return result


_PLAIN_READING = "read by any unpickler but joblib.load: "


def judge_events(scan: Scan, art: Artifact, result: MachineResult, *, strict: bool, prefix: str) -> None:
    seen: set[tuple[str, str, str]] = set()
    for event in result.events:
        if not strict and not _can_run_code(event):
            continue
        key = (event.kind, event.qualname, event.detail if event.kind != "import" else "")
        if key in seen:
            continue  # one finding per distinct import or anomaly per pickle
        seen.add(key)
        finding = scan.policy.judge(event, art.location, prefix=prefix)
        if finding is not None:
            offset = event.pos - art.start
            scan.add(finding.rule, finding.severity, finding.message, art.location, offset)


# In a reading that is merely possible (array bytes, another format's header read as opcodes), only
# what could run code counts: an import Python can perform, or a write on an imported object. The
# rest (a STACK_GLOBAL of non-strings, a call of a non-callable, EXT with an empty registry) makes the
# real unpickler raise, and random bytes produce it all the time.
_POSSIBLE_READING_KINDS = ("import", "global-attribute-write", "global-mutation")


def _can_run_code(event: Event) -> bool:
    return (
        event.kind in _POSSIBLE_READING_KINDS
        and is_importable_name(event.module, event.name)
        and module_can_be_found(event.module)
    )


class _JoblibArrays:
    """joblib writes each array's bytes straight into the pickle stream after its wrapper's BUILD.

    joblib.load skips them (or, for object arrays, unpickles them as a nested pickle); follow it.
    """

    def __init__(self, scan: Scan, art: Artifact, prefix: str) -> None:
        self.scan = scan
        self.art = art
        self.prefix = prefix
        self.fired = False

    def on_build(self, machine: Machine, target: Call, state: Value) -> None:
        func = target.func
        if not (isinstance(func, Global) and func.qualname == _JOBLIB_WRAPPER):
            return
        self.scan.label("joblib")
        self.fired = True
        layout = _wrapper_layout(target)
        if layout is None:
            raise PickleSyntaxError("joblib array header whose layout cannot be determined", machine.pos)
        if machine.frame_end is not None and machine.pos < machine.frame_end:
            # joblib reads the array from the file, whose position inside a FRAME is the frame's end,
            # then unpickles the rest of the frame: a reading this scanner does not follow. joblib
            # itself ends the frame at each array header.
            raise PickleSyntaxError(
                "joblib array header inside a FRAME that goes on after it (joblib would read the array "
                "from the frame's end)",
                machine.pos,
            )
        count, itemsize, hasobject, aligned = layout
        if hasobject:
            nested = run_pickle(self.scan, self.art, machine.pos, prefix=self.prefix)
            if nested.error is not None:
                raise nested.error
            machine.pos = nested.end
        else:
            pos = machine.pos
            if aligned:
                if pos >= machine.end:
                    raise PickleSyntaxError("joblib array padding runs past the end", pos)
                pos += 1 + machine.data[pos : pos + 1][0]
            nbytes = count * itemsize
            if nbytes < 0 or nbytes > machine.end - pos:
                raise PickleSyntaxError(f"joblib array of {nbytes} bytes runs past the end", pos)
            machine.pos = pos + nbytes
        machine.stack[-1] = Opaque("a joblib array")


def _wrapper_layout(wrapper: Call) -> tuple[int, int, bool, bool] | None:
    """(element count, itemsize, hasobject, padded) from a NumpyArrayWrapper's state."""
    if wrapper.op not in ("NEWOBJ", "NEWOBJ_EX") or len(wrapper.states) != 1:
        return None
    state = wrapper.states[0]
    if not isinstance(state, Dct) or state.dropped:
        return None
    shape = const_tuple(state.get("shape"))
    if shape is None or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        return None
    dtype = pickled_numpy_dtype(state.get("dtype"))
    if dtype is None:
        return None
    count = 1
    for n in shape:
        assert isinstance(n, int)
        count *= n
    padded = state.has("numpy_array_alignment_bytes") and state.get("numpy_array_alignment_bytes") is not None
    return count, dtype[0], dtype[1], padded


def scan_pickle_file(scan: Scan, art: Artifact) -> bool:
    """Scan a raw pickle stream; False if the bytes are not a pickle at all."""
    first = run_pickle(scan, art, art.start, judge=False)
    proven = first.error is None or art.head(1) == b"\x80"
    # Text or binary data that merely starts with an opcode: pickle.load would stop at the
    # first import of a name Python cannot import, so only importable names count. A reading
    # stopped by one of our limits proves nothing either way: pickle.load would read on.
    if (
        not proven
        and not isinstance(first.error, LimitError)
        and not any(e.kind == "import" and is_importable_name(e.module, e.name) for e in first.events)
    ):
        return False
    judge_events(scan, art, first, strict=proven, prefix="")
    scan.label("pickle")
    if first.error is not None:
        _broken(scan, art, first)
        return True
    if _is_legacy_magic(first.value):
        scan.label("pytorch-legacy")
        _scan_torch_legacy_stream(scan, art, first.end)
        return True
    _scan_following_pickles(scan, art, first.end)
    return True


def _broken(scan: Scan, art: Artifact, result: MachineResult, prefix: str = "") -> None:
    error = result.error
    assert error is not None
    if isinstance(error, LimitError):
        _over_limit(scan, art, error, prefix)
        return
    scan.problem(
        "malformed-pickle",
        f"{art.location}: {prefix}pickle stops with an error ({error.reason}); everything before it was "
        "checked",
        art.location,
        error.offset - art.start,
    )


def _over_limit(scan: Scan, art: Artifact, error: LimitError, prefix: str) -> None:
    """A reading stopped by one of our limits: a real unpickler reads on, so it is undecided."""
    scan.problem(
        "LimitExceeded",
        f"{art.location}: {prefix}pickle reading stopped at a limit ({error.reason}); a real unpickler "
        "reads on, and what follows was not checked",
        art.location,
        error.offset - art.start,
    )


def limit_reached(
    scan: Scan, art: Artifact, result: MachineResult, prefix: str, *, container: bool = False
) -> None:
    """Where a reading's other errors are dropped (it is merely possible), its limits are not."""
    error = result.error
    if not isinstance(error, LimitError):
        return
    if container and error.offset == art.start + 1 and art.data[art.start : art.start + 1] == b"P":
        # A container (a ZIP's "PK") read as a persistent id: with no persistent_load, pickle.load stops
        # right after that first line, however long. Only there: torch's legacy loader has one.
        return
    _over_limit(scan, art, error, prefix)


def _scan_following_pickles(scan: Scan, art: Artifact, pos: int) -> None:
    """pickle.load called again on the same file reads the next pickle; scan every one."""
    while pos < art.end:
        result = run_pickle(scan, art, pos, strict=False)
        if isinstance(result.error, LimitError):
            _over_limit(scan, art, result.error, "the pickle after the last complete one: ")
            return
        if result.error is not None:
            if result.ops > 1:
                scan.add(
                    "trailing-data",
                    Severity.LOW,
                    f"{art.end - pos} bytes after the last complete pickle are not a pickle",
                    art.location,
                    pos - art.start,
                )
            return
        pos = result.end


def _is_legacy_magic(value: Value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == TORCH_LEGACY_MAGIC


def _scan_torch_legacy_stream(scan: Scan, art: Artifact, pos: int) -> None:
    """torch.save(..., _use_new_zipfile_serialization=False): five pickles, then raw storages."""
    results: list[MachineResult] = []
    for _ in range(4):  # protocol version, sys_info, the object, the storage keys
        result = run_pickle(scan, art, pos)
        if result.error is not None:
            _broken(scan, art, result)
            return
        results.append(result)
        pos = result.end
    sizes = _legacy_storage_sizes(results[2].persistent_ids)
    keys = results[3].value
    if sizes is None or not isinstance(keys, Seq) or not keys.complete:
        scan.problem("malformed-legacy", "legacy PyTorch storage table cannot be read", art.location, pos)
        return
    for key in keys.items:
        elsize = sizes.get(key) if isinstance(key, str) else None
        if elsize is None or pos + 8 > art.end:
            scan.problem("malformed-legacy", f"legacy PyTorch storage {key!r} is not described", art.location)
            return
        (count,) = struct.unpack("<q", art.data[pos : pos + 8])
        nbytes = count * elsize
        if count < 0 or nbytes > art.end - pos - 8:
            scan.problem(
                "malformed-legacy", f"legacy PyTorch storage {key!r} runs past the end", art.location
            )
            return
        pos += 8 + nbytes
    if pos < art.end:
        scan.add(
            "trailing-data",
            Severity.MEDIUM,
            f"{art.end - pos} bytes after the last storage that torch.load never reads",
            art.location,
            pos - art.start,
        )
        _scan_following_pickles(scan, art, pos)


def _legacy_storage_sizes(pids: list[PersRef]) -> dict[str, int] | None:
    sizes: dict[str, int] = {}
    for ref in pids:
        items = const_tuple(ref.pid)
        if not items or items[0] != "storage" or len(items) < 5:
            if items and items[0] == "module":
                continue
            return None
        elsize = storage_element_size(items[1])
        if elsize is None or not isinstance(items[2], str):
            return None
        sizes[items[2]] = elsize
    return sizes


def scan_torch_legacy_tar(scan: Scan, members: dict[str, Artifact]) -> None:
    """The pre-1.0 tar format: 'pickle' is the object, 'storages' and 'tensors' mix pickles with raw data."""
    scan.label("pytorch-legacy-tar")
    main = members["pickle"]
    result = run_pickle(scan, main, main.start)
    if result.error is not None:
        _broken(scan, main, result)
    if "storages" in members:
        _legacy_records(scan, members["storages"], _storage_record)
    if "tensors" in members:
        _legacy_records(scan, members["tensors"], _tensor_record)


def _storage_record(art: Artifact, header: Value, pos: int) -> int | None:
    items = const_tuple(header)
    if items is None or len(items) != 3:
        return None
    elsize = storage_element_size(items[2])
    if elsize is None or pos + 8 > art.end:
        return None
    (count,) = struct.unpack("<q", art.data[pos : pos + 8])
    return pos + 8 + count * elsize if count >= 0 else None


def _tensor_record(art: Artifact, header: Value, pos: int) -> int | None:
    if pos + 8 > art.end:
        return None
    (ndim,) = struct.unpack("<i", art.data[pos : pos + 4])
    return pos + 8 + 16 * ndim + 8 if ndim >= 0 else None


RecordReader = Callable[[Artifact, Value, int], "int | None"]


def _legacy_records(scan: Scan, art: Artifact, record: RecordReader) -> None:
    count_result = run_pickle(scan, art, art.start)
    count = count_result.value
    if count_result.error is not None or not isinstance(count, int) or count < 0:
        scan.problem("malformed-legacy", "legacy PyTorch record count cannot be read", art.location)
        return
    pos = count_result.end
    for _ in range(count):
        header = run_pickle(scan, art, pos)
        next_pos = None if header.error is not None else record(art, header.value, header.end)
        if next_pos is None or next_pos > art.end:
            scan.problem(
                "malformed-legacy", "legacy PyTorch record cannot be read", art.location, pos - art.start
            )
            return
        pos = next_pos
    if pos < art.end:
        _scan_following_pickles(scan, art, pos)
