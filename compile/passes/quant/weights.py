"""Initializers that passes create: ``weights.passes.bin`` (contract 1, docs/PASSES.md).

The export's ``weights.bin`` is hard-linked into the passes directory and still holds every
initializer no pass replaced; a pass that makes a new tensor (quantized weights, scales) adds it
with :meth:`PassWeights.add`, which streams its bytes into ``weights.passes.bin`` beside it
(one file for every graph, 64-byte aligned, via export's ``WeightsWriter``) and returns the
graph initializer referencing it. A tensor added under the same name by an earlier graph (the
prefill and decode graphs share weights) is written once; the later graph gets a new
initializer over the same bytes. Tiny tensors (scalars: activation scales, zero points) stay
inside the graph.

    w = ctx.weights.torch(weight_value)                  # the export's tensor (memory-mapped)
    q = ctx.weights.add(op, f"{name}.fp8", w_fp8)         # ir.Value, an initializer of this graph
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from qcn.artifact import DTYPES

from ...export.weights_file import ExternalLocation, WeightsWriter

PASSES_WEIGHTS = "weights.passes.bin"
INLINE_BYTES = 64  # tensors up to this size stay in the graph (scalars)

_BY_TORCH = {d.torch: d for d in DTYPES.values()}
_BY_ONNX = {d.onnx: d for d in DTYPES.values()}


def ir_dtype(t: torch.Tensor) -> ir.DataType:
    """The ONNX type of a torch tensor (qcn.artifact's dtype table)."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in _BY_TORCH:
        raise ValueError(f"no ONNX type for torch dtype {t.dtype}; known: {sorted(_BY_TORCH)}")
    return ir.DataType(_BY_TORCH[name].onnx)


class PassWeights:
    """The weights of the graphs of one passes directory ``out_dir``: read the export's
    initializers (:meth:`torch`), add new ones (:meth:`add`). Close it (or use ``with``) when the
    stage is done; the file exists only if something was added."""

    def __init__(self, out_dir: Path | str):
        self.out_dir = Path(out_dir)
        self._writer: WeightsWriter | None = None

    @property
    def path(self) -> Path:
        return self.out_dir / PASSES_WEIGHTS

    @property
    def written(self) -> dict[str, ExternalLocation]:
        return dict(self._writer.locations) if self._writer is not None else {}

    @staticmethod
    def torch(value: ir.Value) -> torch.Tensor:
        """The constant tensor of an initializer, as torch (external data memory-mapped, read-only
        pages; bf16 and fp8 through their bits). Reads the file itself: onnx_ir refuses files with
        several hard links, and every weights file of a passes directory is one."""
        t = value.const_value
        if t is None:
            raise ValueError(f"{value.name} is not a constant")
        d = _BY_ONNX[int(t.dtype)]
        if isinstance(t, ir.ExternalTensor):
            path = Path(t.base_dir) / t.location
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset or 0, shape=(t.length,))
            bits = torch.from_numpy(np.array(raw))  # one copy of this tensor only
        else:
            bits = torch.from_numpy(np.frombuffer(t.tobytes(), dtype=np.uint8).copy())
        return bits.view(getattr(torch, d.torch)).reshape(list(t.shape))

    def add(self, op, name: str, tensor: torch.Tensor) -> ir.Value:
        """``tensor`` as an initializer ``name`` of the graph ``op`` (a rewrite's builder) builds
        into: external in weights.passes.bin, or inline when at most INLINE_BYTES."""
        tensor = tensor.contiguous()
        dtype = ir_dtype(tensor)
        shape = ir.Shape(list(tensor.shape))
        if tensor.numel() * tensor.element_size() <= INLINE_BYTES:
            return op.initializer(ir.Tensor(_numpy_bits(tensor), dtype=dtype, shape=shape, name=name), name=name)
        if self._writer is None:
            self._writer = WeightsWriter(self.path)
        loc = self._writer.locations.get(name)
        if loc is None:
            loc = self._writer.write(name, tensor)
            self._writer.flush()  # readable by the checker / ORT while the stage still runs
        elif loc.length != tensor.numel() * tensor.element_size():
            raise ValueError(f"{name}: added twice with different sizes ({loc.length} and "
                             f"{tensor.numel() * tensor.element_size()} bytes)")
        ext = ir.ExternalTensor(loc.location, loc.offset, loc.length, dtype, shape=shape, name=name,
                                base_dir=str(self.out_dir))
        return op.initializer(ext, name=name)

    def add_tensor(self, op, tensor: ir.Tensor) -> ir.Value:
        """An ``ir.Tensor`` of any ONNX type (INT4 packed, uint8, float) as an initializer named
        ``tensor.name``: its bytes as stored (ONNX packing) into weights.passes.bin, like :meth:`add`."""
        name = tensor.name
        raw = tensor.tobytes()
        if len(raw) <= INLINE_BYTES:
            return op.initializer(tensor, name=name)
        if self._writer is None:
            self._writer = WeightsWriter(self.path)
        loc = self._writer.locations.get(name)
        if loc is None:
            loc = self._writer.write(name, torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            self._writer.flush()
        elif loc.length != len(raw):
            raise ValueError(f"{name}: added twice with different sizes ({loc.length} and {len(raw)} bytes)")
        ext = ir.ExternalTensor(loc.location, loc.offset, loc.length, tensor.dtype, shape=ir.Shape(list(tensor.shape)),
                                name=name, base_dir=str(self.out_dir))
        return op.initializer(ext, name=name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> PassWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numpy_bits(t: torch.Tensor) -> np.ndarray:
    """A numpy array onnx_ir accepts for ``t`` (bf16 / fp8 as ml_dtypes)."""
    import ml_dtypes

    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()
