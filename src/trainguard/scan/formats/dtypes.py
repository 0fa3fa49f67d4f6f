"""Element sizes of NumPy and PyTorch types, as written in pickles and headers."""

from __future__ import annotations

import re

from trainguard._pickle.values import Call, Global, Value, const_tuple

_NUMPY_TYPESTR = re.compile(r"^([<>|=]?)([?bBhHiIlLqQpPefdgFDGSUVOMmaciufc])(\d*)(\[[A-Za-z0-9]+\])?$")
_DEFAULT_SIZES = {
    "?": 1,
    "b": 1,
    "B": 1,
    "h": 2,
    "H": 2,
    "i": 4,
    "I": 4,
    "l": 8,
    "L": 8,
    "q": 8,
    "Q": 8,
    "p": 8,
    "P": 8,
    "e": 2,
    "f": 4,
    "d": 8,
    "g": 16,
    "F": 8,
    "D": 16,
    "G": 32,
    "O": 8,
}

TORCH_STORAGE_ELEMENT_SIZE: dict[str, int] = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}


# Type names numpy.dtype() also accepts in a header's descr.
_NUMPY_NAMES = {
    "object": (8, True),
    "O": (8, True),
    "bool": (1, False),
    "float64": (8, False),
    "float32": (4, False),
    "float16": (2, False),
    "int64": (8, False),
    "int32": (4, False),
    "int16": (2, False),
    "int8": (1, False),
    "uint64": (8, False),
    "uint32": (4, False),
    "uint16": (2, False),
    "uint8": (1, False),
    "complex64": (8, False),
    "complex128": (16, False),
}


def numpy_typestr(text: str, *, npy_header: bool) -> tuple[int, bool] | None:
    """(itemsize, holds Python objects) for a simple type string like '<f4', or None if unknown.

    In .npy headers 'U5' counts characters (4 bytes each); in pickled dtypes it counts bytes.
    """
    if text in _NUMPY_NAMES:
        return _NUMPY_NAMES[text]
    match = _NUMPY_TYPESTR.match(text)
    if match is None:
        return None
    kind, digits = match.group(2), match.group(3)
    if kind == "O":
        return 8, True
    if digits:
        size = int(digits)
        if kind == "U" and npy_header:
            size *= 4
        if kind in "iufcb" and size not in (1, 2, 4, 8, 16, 32):
            return None
        return size, False
    if kind in _DEFAULT_SIZES:
        return _DEFAULT_SIZES[kind], False
    return None


def pickled_numpy_dtype(value: Value) -> tuple[int, bool] | None:
    """(itemsize, hasobject) of a `numpy.dtype(...)` call rebuilt by BUILD, or None if not determinable."""
    if not (isinstance(value, Call) and isinstance(value.func, Global)):
        return None
    if value.func.qualname != "numpy.dtype":
        return None
    args = const_tuple(value.args)
    if not args or not isinstance(args[0], str):
        return None
    info = numpy_typestr(args[0], npy_header=False)
    if info is None or len(value.states) > 1:
        return None
    if value.states:
        state = const_tuple(value.states[0])
        if state is None or len(state) < 8:
            return None
        version, names, fields, elsize, flags = state[0], state[3], state[4], state[5], state[7]
        if names is not None or fields is not None:
            return None  # structured dtypes are not analysed
        if not isinstance(elsize, int) or isinstance(elsize, bool) or not isinstance(flags, int):
            return None
        if not isinstance(version, int) or isinstance(version, bool):
            return None
        # Like NumPy's __setstate__: only flexible types (bytes, str, void) take their size from
        # the state, and whether the dtype holds objects comes from the flags alone.
        size = info[0]
        if args[0].lstrip("<>|=")[:1] in ("S", "U", "V") and elsize != -1:
            if elsize < 0:
                return None
            size = elsize
        # Whether it holds objects comes from the state's flags (NPY_ITEM_REFCOUNT); below state
        # version 3 NumPy rebuilds them, and any non-zero value, or an object type, means objects
        # (_descr_find_object).
        holds_objects = (bool(flags) or info[1]) if version < 3 else bool(flags & 1)
        info = (size, holds_objects)
    return info


def storage_element_size(storage_type: Value) -> int | None:
    if isinstance(storage_type, Global) and storage_type.module in ("torch", "torch.cuda", "torch.storage"):
        return TORCH_STORAGE_ELEMENT_SIZE.get(storage_type.name)
    return None
