"""weights.bin: the one external-data file of an artifact's ONNX initializers, streamed.

`WeightsWriter` is the streaming discipline of every stage that writes weights -- the export
today, the passes stage when it rewrites weights (quantization) -- so that peak memory is set
by the largest tensor, never by the model:

    with WeightsWriter(out_dir / "weights.bin") as w:
        for spec in specs:
            loc = w.write(spec.name, chunks_of(spec))  # chunks written as produced, then dropped
            value.const_value = loc.ir_tensor(value, base_dir=out_dir)

A tensor is given as an iterable of C-contiguous chunks (optionally paired with the names of
what each was computed from) whose bytes, concatenated, are the tensor (a stacked expert tensor is written expert by expert, never materialised whole); each
tensor starts at the next 64-byte-aligned offset (mmap-friendly, what ONNX Runtime and
TensorRT map). Floating-point chunks are checked for NaN/Inf as they stream past (a
`NonFiniteWeightError` names the tensor and its sources) unless `allow_nonfinite`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CheckpointError

__all__ = ["ALIGNMENT", "ExternalLocation", "NonFiniteWeightError", "WeightsWriter"]

ALIGNMENT = 64
_CHECK_ELEMENTS = 1 << 22  # NaN/Inf checked in slices of this many elements (bounded temporaries)


class NonFiniteWeightError(CheckpointError):
    """A weight holds NaN or Inf values (the artifact's logits would be NaN)."""


@dataclass(frozen=True)
class ExternalLocation:
    """Where one tensor's bytes live: `location` (relative to the model directory), offset, length."""

    location: str
    offset: int
    length: int

    def ir_tensor(self, value, base_dir: Path | str):
        """An `onnx_ir.ExternalTensor` for the initializer `value` (an `onnx_ir.Value`) at this location."""
        import onnx_ir as ir

        return ir.ExternalTensor(self.location, self.offset, self.length, value.dtype, shape=value.shape,
                                 name=value.name, base_dir=str(base_dir))


def _nonfinite(chunk: torch.Tensor) -> tuple[int, int, int] | None:
    """(NaN count, Inf count, first flat index) of a floating chunk, None when all finite.

    The common case costs one reduction (min and max propagate NaN, and are +-Inf exactly when
    an Inf is present; ~4x faster than isfinite on bf16); only a bad chunk is scanned, in slices
    so the temporaries stay small."""
    if not chunk.numel():
        return None
    lo, hi = torch.aminmax(chunk)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return None
    flat, nan, inf, first = chunk.reshape(-1), 0, 0, None
    for start in range(0, flat.numel(), _CHECK_ELEMENTS):
        part = flat[start:start + _CHECK_ELEMENTS]
        bad = ~torch.isfinite(part)
        if first is None and bad.any():
            first = start + int(bad.nonzero()[0, 0])
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf, first


class WeightsWriter:
    """Appends tensors to one external-data file; `write` returns each tensor's location.

    Reusable by any stage that writes ONNX weights (see the module docstring). Open the file
    in a fresh (temporary) directory: it is created, never appended to."""

    def __init__(self, path: Path | str, *, allow_nonfinite: bool = False):
        self.path = Path(path)
        self.allow_nonfinite = allow_nonfinite
        self._f = open(self.path, "xb")
        self._end = 0
        self.locations: dict[str, ExternalLocation] = {}
        self.nonfinite: dict[str, tuple[int, int]] = {}  # name -> (NaN, Inf) counts, when allowed

    @property
    def bytes_written(self) -> int:
        """Tensor bytes written (alignment padding not counted)."""
        return sum(loc.length for loc in self.locations.values())

    def write(self, name: str, chunks: torch.Tensor | Iterable[torch.Tensor | tuple[Sequence[str], torch.Tensor]]
              ) -> ExternalLocation:
        """Write `name` from `chunks` and return its location. `chunks`: one tensor, or an
        iterable (consumed lazily, in order) of contiguous chunks, each a tensor or a
        (sources, tensor) pair naming what the chunk was computed from, for error messages."""
        if name in self.locations:
            raise ValueError(f"weight {name} was already written to {self.path}")
        if isinstance(chunks, torch.Tensor):
            chunks = (chunks,)
        pad = -self._end % ALIGNMENT
        if pad:
            self._f.write(b"\0" * pad)
            self._end += pad
        offset, nan, inf = self._end, 0, 0
        for i, item in enumerate(chunks):
            sources, chunk = item if isinstance(item, tuple) else (None, item)
            if not chunk.is_contiguous():
                raise ValueError(f"weight {name}: chunk {i} is not contiguous")
            if chunk.is_floating_point() and chunk.element_size() > 1:
                bad = _nonfinite(chunk)
                if bad is not None:
                    if not self.allow_nonfinite:
                        raise self._error(name, i, chunk, bad, sources)
                    nan, inf = nan + bad[0], inf + bad[1]
            if chunk.numel():
                self._end += self._f.write(memoryview(chunk.view(torch.uint8).numpy()).cast("B"))
            del item, chunk
        if nan or inf:
            self.nonfinite[name] = (nan, inf)
        loc = ExternalLocation(self.path.name, offset, self._end - offset)
        self.locations[name] = loc
        return loc

    def _error(self, name, i, chunk, bad, sources) -> NonFiniteWeightError:
        nan, inf, first = bad
        index = [int(x) for x in torch.unravel_index(torch.tensor(first), chunk.shape)]
        part = f"the part computed from {', '.join(sources)}" if sources else f"chunk {i}"
        return NonFiniteWeightError(
            f"weight {name}: {nan} NaN and {inf} Inf values in {part}, the first at index {index}; the exported "
            "model would compute NaN logits. Fix the checkpoint, or set `export.allow_nonfinite: true` in the "
            "recipe to export it anyway")

    def flush(self) -> None:
        """Make everything written so far visible to readers of the file (checkers, loaders)."""
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> WeightsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
