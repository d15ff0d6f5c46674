"""The external-data initializers of an ONNX file, read straight from its protobuf, and one
memory map of each weights file that every ONNX Runtime session of an artifact shares.

Why not ``onnx.load``: the runtime-only install has no ``onnx`` package, and only four fields
of the top-level graph's initializers are needed (name, type, dims, external-data location).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcn.artifact.dtypes import DTYPES, from_onnx
from ..errors import ArtifactError

__all__ = ["ExternalTensor", "external_initializers", "graph_ops", "WeightMaps"]


def _numpy(elem_type: int) -> np.dtype | None:
    """numpy dtype of an ONNX elem type (qcn.artifact's table); None for one numpy cannot hold
    (e.g. bfloat16) or the table lacks: ONNX Runtime then loads that tensor itself."""
    try:
        d = DTYPES[from_onnx(elem_type)]
    except ArtifactError:
        return None
    return np.dtype(d.numpy) if d.numpy else None


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    data_type: int  # TensorProto.DataType
    dims: tuple[int, ...]
    location: str  # relative to the model file's directory
    offset: int
    length: int


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message; length-delimited values are
    memoryviews, varints ints, fixed-width values skipped as None."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > n:
                raise ValueError(f"field {num} of {ln} bytes runs past the end of its message")
            v, i = buf[i : i + ln], i + ln
        elif wt == 1:
            v, i = None, i + 8
        elif wt == 5:
            v, i = None, i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, v


def _tensor(buf: memoryview) -> ExternalTensor | None:
    name, dtype, dims, ext, location = "", 0, [], {}, 0
    for num, wt, v in _fields(buf):
        if num == 1:  # dims: repeated int64, packed or not
            if wt == 2:
                j = 0
                while j < len(v):
                    d, j = _varint(v, j)
                    dims.append(d)
            else:
                dims.append(v)
        elif num == 2:
            dtype = v
        elif num == 8:
            name = bytes(v).decode()
        elif num == 13:  # StringStringEntryProto {key = 1, value = 2}
            kv = {k: bytes(s).decode() for k, _, s in _fields(v)}
            ext[kv.get(1, "")] = kv.get(2, "")
        elif num == 14:
            location = v
    if location != 1 or "location" not in ext:
        return None
    return ExternalTensor(name, dtype, tuple(dims), ext["location"], int(ext.get("offset", 0)), int(ext.get("length", -1)))


def _graph_fields(model_path: Path):
    """(field number, wire type, value) of the model's top-level GraphProto; an unreadable file
    or a damaged protobuf is an :class:`ArtifactError` naming the file."""
    try:
        data = memoryview(Path(model_path).read_bytes())
    except OSError as e:
        raise ArtifactError(f"{model_path}: cannot read: {e.strerror or e}") from None
    try:
        for num, wt, graph in _fields(data):
            if num == 7 and wt == 2:  # ModelProto.graph
                yield from _fields(graph)
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{model_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def external_initializers(model_path: Path) -> list[ExternalTensor]:
    """Every initializer of the model's top-level graph whose data is in an external file."""
    out: list[ExternalTensor] = []
    for gnum, gwt, t in _graph_fields(model_path):
        if gnum == 5 and gwt == 2:  # GraphProto.initializer
            ext = _tensor(t)
            if ext is not None:
                out.append(ext)
    return out


def graph_ops(model_path: Path) -> frozenset[tuple[str, str]]:
    """The (domain, op_type) of every node of the model's top-level graph ("" is the ONNX domain)."""
    ops = set()
    for gnum, gwt, node in _graph_fields(model_path):
        if gnum == 1 and gwt == 2:  # GraphProto.node: NodeProto {op_type = 4, domain = 7}
            f = {n: bytes(v).decode() for n, w, v in _fields(node) if n in (4, 7) and w == 2}
            ops.add((f.get(7, ""), f.get(4, "")))
    return frozenset(ops)


class WeightMaps:
    """One read-only memory map per external-data file, and one numpy view per tensor, shared by
    every session that asks: the pages of a weight are mapped once however many graphs use it."""

    def __init__(self, artifact_dir: Path):
        self.artifact_dir = Path(artifact_dir)
        self._maps: dict[Path, np.memmap] = {}
        self._views: dict[tuple, np.ndarray] = {}

    def _map(self, model_path: Path, location: str) -> np.memmap:
        path = (model_path.parent / location).resolve()
        root = self.artifact_dir.resolve()
        if root not in path.parents:
            raise ArtifactError(f"{model_path}: external data {location!r} lies outside the artifact directory {root}")
        if path not in self._maps:
            try:
                self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{path}: cannot map the weights file: {e}") from None
        return self._maps[path]

    def view(self, model_path: Path, t: ExternalTensor) -> np.ndarray | None:
        """The tensor's bytes in the shared map as a numpy array, or None for a type numpy
        cannot represent (ONNX Runtime then loads that tensor itself)."""
        dt = _numpy(t.data_type)
        if dt is None:
            return None
        key = (os.path.normpath(model_path.parent / t.location), t.offset, t.data_type, t.dims)
        if key not in self._views:
            mm = self._map(model_path, t.location)
            n = math.prod(t.dims) * np.dtype(dt).itemsize
            if (t.length >= 0 and t.length != n) or t.offset + n > mm.size:
                raise ArtifactError(f"{model_path}: initializer {t.name!r} ({list(t.dims)}, {n} bytes) does not fit "
                                    f"{t.location} at offset {t.offset} (length {t.length}, file {mm.size} bytes)")
            self._views[key] = mm[t.offset : t.offset + n].view(dt).reshape(t.dims)
        return self._views[key]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._views.values())

    def close(self) -> None:
        self._views.clear()
        self._maps.clear()
