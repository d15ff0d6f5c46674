"""The engine's layer list, read from the builder's own report, and what precision its GEMMs run in.

No engine can be deserialized without a GPU, so ``IEngineInspector`` cannot be used here. The
builder logs the same inspector text itself, once, at VERBOSE severity, when the config's
profiling verbosity is DETAILED (Polygraphy's default): a message starting ``Layers:`` with one
line per engine layer::

    Name: node_of_y_myl0_2, LayerType: gemm, Inputs: [ { Name: ..., Dimensions: [-1,256], ...,
    Datatype: FP8, Format: ... }], Constants: [ { Name: wq_constantFP8_myl0, ... Datatype: FP8, ... }],
    Outputs: [ ... ], TacticName: ..., StreamId: 0, Metadata: [ONNX Layer: node_of_y]...

then ``I/O Tensors:`` and ``Engine Metadata:`` sections (measured on tensorrt_rtx 1.7.1; the
text format is TensorRT's ``LayerInformationFormat.ONELINE``). :func:`parse_layer_report` turns
it into data and :func:`gemm_precisions` counts the GEMMs by the precision they compute in:

- ``fp8``: a ``gemm`` layer whose activation input and weight constant are both FP8 (W8A8);
- ``int4_weight_only`` / ``fp8_weight_only``: a GEMM (a ``gemm`` layer, or a fused layer whose
  name ends in ``Fc``: TensorRT-RTX's ``runtime_fusion`` of dequantize + FC, e.g.
  ``__myl_ReplCastMulCastFc_myl0_1``) with an Int4 / FP8 weight constant and activations in
  the activation dtype;
- otherwise the dtype of its inputs (``float32``, ``float16``, ``bfloat16``): a GEMM on
  dequantized or unquantized weights.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

REPORT_PREFIX = "Layers:"
# inspector Datatype names -> manifest dtype names (compile/build/trt.py DTYPES uses DataType enum names)
DATATYPES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "FP8": "fp8", "Int4": "int4",
             "Int8": "int8", "Int32": "int32", "Int64": "int64", "Bool": "bool", "FP4": "fp4", "UInt8": "uint8"}

_FUSED_FC = re.compile(r"^__myl_\w*?Fc_myl\d+_\d+$")  # e.g. __myl_ReplCastMulCastFc_myl0_1
_TENSOR = re.compile(r"\{ Name: (?P<name>[^,]*), Dimensions: \[(?P<dims>[^\]]*)\].*?Datatype: (?P<dtype>\w+)")


class LayerReportError(ValueError):
    """The builder's layer report is missing or not in the format this parser knows."""


def find_layer_report(messages: Sequence[tuple[int, str]]) -> str | None:
    """The builder's ``Layers:`` message among (severity, text) logger messages, or None."""
    for _, msg in messages:
        if msg.startswith(REPORT_PREFIX):
            return msg
    return None


def _fields(line: str) -> dict[str, str]:
    """``Key: value, Key: [ ... ], ...`` split at the commas outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(line):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0 and line.startswith(" ", i + 1):
            parts.append(line[start:i])
            start = i + 2
    parts.append(line[start:])
    out = {}
    for part in parts:
        key, sep, value = part.partition(": ")
        if sep and key.isidentifier():
            out[key] = value
        elif out:  # a comma inside a value at depth 0 (a layer name with ", "): keep it with the value
            last = next(reversed(out))
            out[last] += ", " + part
    return out


def _tensors(text: str) -> list[dict]:
    return [{"name": m["name"], "shape": [int(d) for d in m["dims"].split(",") if d],
             "dtype": DATATYPES.get(m["dtype"], m["dtype"])} for m in _TENSOR.finditer(text)]


def parse_layer_report(report: str) -> list[dict]:
    """[{name, type, inputs, constants, outputs, tactic, onnx_layers}] from the ``Layers:``
    message; tensors are {name, shape, dtype}. Raises LayerReportError if it has no layer."""
    if not report.startswith(REPORT_PREFIX):
        raise LayerReportError(f"not a layer report (starts {report[:40]!r})")
    body = report[len(REPORT_PREFIX):].split("\nI/O Tensors:")[0]
    layers = []
    for line in body.splitlines():
        if not line.startswith("Name: "):
            continue
        fields = _fields(line)
        if "LayerType" not in fields:
            raise LayerReportError(f"layer line without a LayerType: {line[:120]!r}")
        layers.append({"name": fields["Name"], "type": fields["LayerType"],
                       "inputs": _tensors(fields.get("Inputs", "")),
                       "constants": _tensors(fields.get("Constants", "")),
                       "outputs": _tensors(fields.get("Outputs", "")),
                       "tactic": fields.get("TacticName", ""),
                       "onnx_layers": re.findall(r"\[ONNX Layer: ([^\]]*)\]", fields.get("Metadata", ""))})
    if not layers:
        raise LayerReportError("the layer report lists no layer")
    return layers


def is_gemm(layer: dict) -> bool:
    """A matrix multiply: a ``gemm`` layer, or a fused layer ending in an FC (``...CastFc``)."""
    return layer["type"] == "gemm" or _FUSED_FC.search(layer["name"]) is not None


def gemm_precision(layer: dict) -> str:
    """fp8 | int4_weight_only | fp8_weight_only | the input dtype (see the module docstring)."""
    ins = [t["dtype"] for t in layer["inputs"]]
    consts = [t["dtype"] for t in layer["constants"]]
    if "int4" in consts:
        return "int4_weight_only"
    if ins and ins[0] == "fp8" and "fp8" in consts + ins[1:]:
        return "fp8"
    if "fp8" in consts:
        return "fp8_weight_only"
    return ins[0] if ins else "unknown"


def gemm_precisions(layers: Sequence[dict]) -> dict[str, int]:
    """{precision: number of GEMM layers}, sorted by precision name."""
    return dict(sorted(Counter(gemm_precision(l) for l in layers if is_gemm(l)).items()))


def summary(layers: Sequence[dict]) -> dict:
    """What the build manifest records: layer count, count by layer type, GEMMs by precision."""
    return {"count": len(layers), "types": dict(sorted(Counter(l["type"] for l in layers).items())),
            "gemms": gemm_precisions(layers)}
