"""Pass ``int4_cpu_matmul`` (onnxruntime only): the INT4 projection form
``MatMul(x, DequantizeLinear(Wq INT4 [K, N] const, scale [G, N] const, axis=0, block_size=128))``
-> ``com.microsoft.MatMulNBits(x, B, scales; K, N, bits 4, block_size 128, accuracy_level)``.

ONNX Runtime would fuse the pair itself, but with the session's
``session.qdq_matmulnbits_accuracy_level`` (default 4: int8 activations); emitting the node
makes the graph say what runs, and the accuracy gate measures exactly that. The recipe's
``quantization.int4_cpu_accuracy_level`` chooses: 0 keeps fp32 activations (exact weight-only
INT4), 4 quantizes each block of activations to int8 inside the kernel (measured on qcn-pico:
the gate metrics unchanged, a 256x768 GEMV 30 us vs 77 us at level 0 vs 55 us fp32;
docs/QUANTIZATION.md).

MatMulNBits layout (new initializers): B uint8 [N, G, 64]: for output column n and block g,
the 128 values q[g*128 .. g*128+127, n] as offset-binary nibbles (q + 8; the zero point 8 is
MatMulNBits' default for 4 bits), element 2j in the low nibble; a last partial block is padded
with q = 0. scales [N, G] in the activation dtype (fp32 on this target).
Refused (left as DQ + MatMul): a non-fp32 graph, a DequantizeLinear that is not the INT4
block-128 axis-0 form with constant inputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import MatchResult

from ...plugins.moe.quant import pack_int4
from ..base import QcnRule, attr, refuse
from .int4 import GROUP, MakesInitializers
from .int4_projection import const_weight

ACCURACY_LEVELS = (0, 1, 4)


class Int4CpuMatMul(MakesInitializers, QcnRule):
    pass_name = "int4_cpu_matmul"
    root_domain = ""
    root_op = "MatMul"

    def __init__(self, accuracy_level: int = 0, add=None):
        super().__init__()
        if accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"MatMulNBits accuracy_level {accuracy_level}; valid: {list(ACCURACY_LEVELS)}")
        self.accuracy_level, self.add = accuracy_level, add

    def pattern(self, op, x, wq, scale):
        return op.MatMul(x, op.DequantizeLinear(wq, scale, _allow_other_attributes=True))

    def check(self, context, x, wq, scale):
        if const_weight(wq) is None or wq.dtype != ir.DataType.INT4:
            return MatchResult().fail("not an INT4 weight")   # no candidate
        return super().check(context, x=x, wq=wq, scale=scale)

    def check_node(self, context, x, wq, scale):
        self._graph = context.graph_or_function
        dq = context.root.inputs[1].producer()
        if attr(dq, "axis", 1) != 0 or attr(dq, "block_size", 0) != GROUP or len(dq.inputs) > 2:
            return refuse("DequantizeLinear is not the INT4 form (axis 0, block_size 128, no zero point)")
        # x of a node an earlier rewrite built may carry no type yet; the DQ output type is the scale's
        if x.dtype not in (None, ir.DataType.FLOAT) or const_weight(scale) is None or scale.dtype != ir.DataType.FLOAT:
            return refuse("MatMulNBits form is for fp32 activations with constant fp32 scales")
        if wq.shape is None or len(wq.shape) != 2:
            return refuse("weight is not 2-D")
        context.model.opset_imports.setdefault("com.microsoft", 1)
        return {}

    def rewrite(self, op, x, wq, scale):
        k, n = wq.shape
        g = -(-k // GROUP)
        q = torch.from_numpy(np.asarray(wq.const_value.numpy()).astype(np.int8))        # [K, N]
        qt = torch.zeros(n, g * GROUP, dtype=torch.int8)
        qt[:, :k] = q.T
        b = (pack_int4(qt).numpy() ^ np.uint8(0x88)).reshape(n, g, GROUP // 2)           # offset-binary nibbles
        s = np.ascontiguousarray(np.asarray(scale.const_value.numpy(), dtype=np.float32).T)  # [N, G]
        bv = self._init(op, ir.Tensor(b, name=f"{wq.name}.nbits"))
        sv = self._init(op, ir.Tensor(s, name=f"{scale.name}.nbits"))
        y = op.MatMulNBits(x, bv, sv, _domain="com.microsoft", _version=1, K=k, N=n, bits=4, block_size=GROUP,
                           accuracy_level=self.accuracy_level)
        return self.count_rewrite(op, y, set())


__all__ = ["ACCURACY_LEVELS", "Int4CpuMatMul"]
