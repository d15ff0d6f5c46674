"""Shared plumbing for qcn ops: schema registration and a small FunctionProto builder.

Each op in `compile/plugins/<op>/op.py` declares one `QcnOp`: its torch custom op, its
`onnx.defs.OpSchema` (registered so the exporter and shape inference know its outputs), its
onnxscript translation (an opaque node in domain `qcn`) and a function body of standard ops
that *defines* its semantics. ONNX Runtime and TensorRT's parser inline the body when no
plugin replaces the node.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "qcn"
DOMAIN_VERSION = 1
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class QcnOp:
    """Everything the exporter needs to emit one qcn op."""

    name: str  # ONNX op_type, e.g. "GatedDeltaNet"
    torch_op: object  # torch.ops.qcn.<name>.default
    schema: onnx.defs.OpSchema
    translation: Callable  # onnxscript translation for torch.onnx.export's custom_translation_table
    function: Callable[[int], onnx.FunctionProto]  # opset -> function body


def register_schema(schema: onnx.defs.OpSchema) -> None:
    """Register `schema` once per process (re-registration is a no-op)."""
    try:
        onnx.defs.get_schema(schema.name, schema.since_version, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)


class FunctionBuilder:
    """Builds a FunctionProto node by node; `op` returns the output name(s)."""

    def __init__(self, name: str, opset: int, prefix: str = ""):
        self.name = name
        self.prefix = prefix  # subgraph bodies share the outer SSA scope: give them their own prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._ids = itertools.count()

    def _fresh(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs):
        names = [self._fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def graph_op(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        """A node whose output names are given (for function outputs and subgraph bodies)."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))

    def const(self, value, dtype=None, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        out = self._fresh(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, out)))
        return out

    def attr_const(self, attr_name: str, attr_type: int, hint: str | None = None) -> str:
        """A Constant whose value is the function attribute `attr_name` (value_int / value_float)."""
        out = self._fresh(hint or attr_name)
        node = helper.make_node("Constant", [], [out])
        field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[attr_type]
        ref = onnx.AttributeProto(name=field, ref_attr_name=attr_name, type=attr_type)
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def dim(self, tensor: str, axis: int) -> str:
        """Shape(tensor)[axis] as a 1-D int64 tensor of length 1."""
        if axis == -1:
            return self.op("Shape", tensor, start=-1, hint="dim")
        return self.op("Shape", tensor, start=axis, end=axis + 1, hint="dim")

    def build(self, inputs: list[str], outputs: list[str], attributes: list[str]) -> onnx.FunctionProto:
        return helper.make_function(
            DOMAIN, self.name, inputs, outputs, self.nodes,
            [helper.make_opsetid("", self.opset)], attributes=attributes,
        )


def subgraph(name: str, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, inputs, outputs)
