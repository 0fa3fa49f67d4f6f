"""What genuine PyTorch, NumPy, safetensors, joblib and Hugging Face checkpoints import, and why each is safe.

The torch entries are a subset of what `torch.load(weights_only=True)` accepts (a test checks
this against the installed torch). Everything not listed here is a finding.
"""

from __future__ import annotations

_TORCH_STORAGE_TYPES = [
    "BFloat16Storage",
    "BoolStorage",
    "ByteStorage",
    "CharStorage",
    "ComplexDoubleStorage",
    "ComplexFloatStorage",
    "DoubleStorage",
    "FloatStorage",
    "HalfStorage",
    "IntStorage",
    "LongStorage",
    "QInt32Storage",
    "QInt8Storage",
    "QUInt2x4Storage",
    "QUInt4x2Storage",
    "QUInt8Storage",
    "ShortStorage",
]
_TORCH_TENSOR_TYPES = [
    "BFloat16Tensor",
    "BoolTensor",
    "ByteTensor",
    "CharTensor",
    "DoubleTensor",
    "FloatTensor",
    "HalfTensor",
    "IntTensor",
    "LongTensor",
    "ShortTensor",
]
_TORCH_DTYPES = [
    "bfloat16",
    "bool",
    "complex128",
    "complex32",
    "complex64",
    "float16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
]
_TORCH_QSCHEMES = [
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
]
_TORCH_REBUILDERS = [
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_device_tensor_from_numpy",
]


def _build() -> dict[str, str]:
    allowed: dict[str, str] = {
        "collections.OrderedDict": "state_dict container; constructs a plain mapping",
        "collections.Counter": "plain mapping; accepted by torch weights_only",
        "builtins.set": "set literal written by protocol 2 pickles",
        "builtins.frozenset": "frozenset literal written by protocol 2 pickles",
        "builtins.bytearray": "bytearray literal; copies bytes only",
        "builtins.bytes": "how protocols 0-2 write an empty bytes literal (bytes())",
        "builtins.complex": "complex number literal",
        "_codecs.encode": "how protocol 2 pickles spell bytes; encodes a str, calls nothing else",
        "torch.Size": "tensor shape tuple",
        "torch.Tensor": "tensor class used by _rebuild_from_type_v2",
        "torch.device": "device name for a tensor; parses a string",
        "torch.nn.parameter.Parameter": "wraps a tensor as a parameter",
        "torch.serialization._get_layout": "maps a layout name to torch.strided etc.; dictionary lookup",
        "torch._tensor._rebuild_from_type_v2": "rebuilds tensor subclasses; its callable argument is itself"
        " an import checked against this list",
        "torch.storage.TypedStorage": "storage class named by persistent ids",
        "torch.storage.UntypedStorage": "storage class named by persistent ids",
        "numpy.ndarray": "array class passed to _reconstruct",
        "numpy.dtype": "dtype from a type string; no callables",
        "numpy.core.multiarray._reconstruct": "creates an empty ndarray (NumPy 1.x name)",
        "numpy._core.multiarray._reconstruct": "creates an empty ndarray (NumPy 2.x name)",
        "numpy.core.multiarray.scalar": "NumPy scalar from a dtype and raw bytes (NumPy 1.x name)",
        "numpy._core.multiarray.scalar": "NumPy scalar from a dtype and raw bytes (NumPy 2.x name)",
        "numpy.core.numeric._frombuffer": "array from in-band bytes, dtype and shape (NumPy 1.x name, pickle"
        " protocol 5); frombuffer refuses an object dtype",
        "numpy._core.numeric._frombuffer": "array from in-band bytes, dtype and shape (NumPy 2.x name, pickle"
        " protocol 5); frombuffer refuses an object dtype",
        "datetime.datetime": "a timestamp in metadata, from numbers or its packed bytes and a tzinfo (itself"
        " an import checked against this list)",
        "datetime.date": "a date in metadata, from numbers or its packed bytes",
        "datetime.time": "a time of day in metadata, from numbers or its packed bytes and a tzinfo",
        "datetime.timedelta": "a duration in metadata, from days, seconds and microseconds",
        "datetime.timezone": "a fixed UTC offset (a timedelta) and an optional name",
        "numpy.random._pickle.__randomstate_ctor": "RNG state object from a bit generator name",
        "numpy.random._pickle.__generator_ctor": "RNG Generator from a bit generator",
        "numpy.random._pickle.__bit_generator_ctor": "bit generator looked up by name in NumPy's own table",
        "numpy.random.bit_generator.__pyx_unpickle_SeedSequence": "Cython state restore of a SeedSequence",
        "numpy.random._mt19937.MT19937": "bit generator class",
        "numpy.random._pcg64.PCG64": "bit generator class",
        "numpy.random._pcg64.PCG64DXSM": "bit generator class",
        "numpy.random._philox.Philox": "bit generator class",
        "numpy.random._sfc64.SFC64": "bit generator class",
        "numpy.random.bit_generator.SeedSequence": "seed sequence class",
        "joblib.numpy_pickle.NumpyArrayWrapper": "joblib array header; the array bytes that follow it are"
        " skipped by size, and object arrays are scanned as the nested pickle they are",
    }
    for name in _TORCH_STORAGE_TYPES:
        allowed[f"torch.{name}"] = "legacy storage type named by persistent ids"
        if not name.startswith("QU") and not name.startswith("QInt"):  # torch has no CUDA quantized ones
            allowed[f"torch.cuda.{name}"] = "legacy CUDA storage type named by persistent ids"
    for name in _TORCH_TENSOR_TYPES:
        allowed[f"torch.{name}"] = "legacy tensor type"
    for name in _TORCH_DTYPES:
        allowed[f"torch.{name}"] = "tensor dtype constant"
    for name in _TORCH_QSCHEMES:
        allowed[f"torch.{name}"] = "quantization scheme constant"
    for name in _TORCH_REBUILDERS:
        allowed[f"torch._utils.{name}"] = "rebuilds a tensor from a storage, offset, shape and stride"
    for dtype in (
        "Bool",
        "Int8",
        "UInt8",
        "Int16",
        "UInt16",
        "Int32",
        "UInt32",
        "Int64",
        "UInt64",
        "Float16",
        "Float32",
        "Float64",
        "LongDouble",
        "Complex64",
        "Complex128",
        "CLongDouble",
        "Bytes",
        "Str",
        "Void",
        "Object",
        "DateTime64",
        "TimeDelta64",
    ):
        allowed[f"numpy.dtypes.{dtype}DType"] = "NumPy 2 dtype class"
    return allowed


BUILTIN_ALLOWLIST: dict[str, str] = _build()
