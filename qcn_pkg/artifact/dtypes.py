"""The dtype names of the artifact contract, and what each is called elsewhere (one table).

A manifest names dtypes by these names ("float32", "bfloat16", ...). Each row says what the
dtype is in ONNX (``TensorProto`` elem type), ONNX Runtime (``NodeArg.type``), TensorRT
(``trt.DataType`` member), numpy (None where numpy has no such type) and torch, and its size.
Nothing here imports onnx, tensorrt or torch: the runtime needs only numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArtifactError

__all__ = ["DType", "DTYPES", "dtype", "numpy_dtype", "from_onnx", "from_trt", "from_ort"]


@dataclass(frozen=True)
class DType:
    name: str  # the manifest name
    itemsize: int  # bytes per element
    onnx: int  # onnx.TensorProto elem type
    ort: str  # onnxruntime type string
    trt: str | None  # tensorrt.DataType member name (None: TensorRT has none)
    numpy: str | None  # numpy dtype name (None: numpy has none)
    torch: str  # torch dtype attribute name


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", 4, 1, "tensor(float)", "FLOAT", "float32", "float32"),
    DType("float16", 2, 10, "tensor(float16)", "HALF", "float16", "float16"),
    DType("bfloat16", 2, 16, "tensor(bfloat16)", "BF16", None, "bfloat16"),
    DType("float64", 8, 11, "tensor(double)", None, "float64", "float64"),
    DType("float8_e4m3fn", 1, 17, "tensor(float8e4m3fn)", "FP8", None, "float8_e4m3fn"),
    DType("int64", 8, 7, "tensor(int64)", "INT64", "int64", "int64"),
    DType("int32", 4, 6, "tensor(int32)", "INT32", "int32", "int32"),
    DType("int8", 1, 3, "tensor(int8)", "INT8", "int8", "int8"),
    DType("uint8", 1, 2, "tensor(uint8)", "UINT8", "uint8", "uint8"),
    DType("bool", 1, 9, "tensor(bool)", "BOOL", "bool", "bool"),
)}
_BY_ONNX = {d.onnx: d for d in DTYPES.values()}
_BY_TRT = {d.trt: d for d in DTYPES.values() if d.trt}
_BY_ORT = {d.ort: d for d in DTYPES.values()}


def dtype(name: str, where: str = "dtype") -> DType:
    """The row for a manifest dtype name; ArtifactError naming the known ones otherwise."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ArtifactError(f"{where}: unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def numpy_dtype(name: str, where: str = "dtype") -> np.dtype:
    """numpy dtype for a manifest dtype name; ArtifactError for names numpy cannot hold."""
    d = dtype(name, where)
    if d.numpy is None:
        have = [n for n, r in DTYPES.items() if r.numpy]
        raise ArtifactError(f"{where}: dtype {name!r} has no numpy equivalent in this runtime; supported: {', '.join(have)}")
    return np.dtype(d.numpy)


def _lookup(table: dict, key, what: str) -> str:
    try:
        return table[key].name
    except KeyError:
        raise ArtifactError(f"{what} {key!r} has no qcn dtype name; known: {', '.join(map(str, table))}") from None


def from_onnx(elem_type: int) -> str:
    """Manifest name of an ONNX ``TensorProto`` elem type (1 -> "float32")."""
    return _lookup(_BY_ONNX, elem_type, "ONNX elem type")


def from_trt(member: str) -> str:
    """Manifest name of a ``trt.DataType`` member name ("HALF" -> "float16")."""
    return _lookup(_BY_TRT, member, "TensorRT DataType")


def from_ort(type_str: str) -> str:
    """Manifest name of an onnxruntime type string ("tensor(float)" -> "float32")."""
    return _lookup(_BY_ORT, type_str, "onnxruntime type")
