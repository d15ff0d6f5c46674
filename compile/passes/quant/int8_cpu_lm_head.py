"""Pass ``int8_cpu_lm_head`` (onnxruntime only; recipe ``quantization.lm_head: int8``): the
logits projection ``MatMul(x, lm_head fp32 [K, N] const)`` -> ``com.microsoft.MatMulNBits(x, B,
scales; K, N, bits 8, block_size 128, accuracy_level 4)``.

Why: on a small model the fp32 lm_head is the largest weight a decode step reads (qcn-pico:
256 x 8192 fp32 = 8.4 MB of ~20 MB per token with INT4 projections and experts). llama.cpp keeps
it at 6 bits (Q6_K) in its q4_0 files and 8 (Q8_0) in its q8_0 files; this is the 8-bit form.

Format: symmetric int8 weight-only, one fp32 scale per block of 128 input channels (K) per output
column: scale = amax|block| / 127, q = round(W / scale) in [-127, 127]. MatMulNBits layout (new
initializers): B uint8 [N, G, 128], the block's q + 128 (the zero point 128 is MatMulNBits' default
for 8 bits); a last partial block is padded with q = 0. scales fp32 [N, G].

accuracy_level 4 (int8 activations, per block, inside the kernel) is fixed: onnxruntime 1.32 has no
fast 8-bit kernel for fp32 activations (qcn-pico's lm_head, one token, one thread: 2.5 ms at level 0
vs 40 us at level 4 vs ~420 us fp32). The accuracy gate measures the result like every other
quantization.

Refused (left fp32): an lm_head that is not a 2-D fp32 constant. Not a candidate: every other MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from ..base import QcnRule, refuse
from ..plan import PassSpec
from .int4 import GROUP, MakesInitializers
from .int4_plan import LM_HEAD
from .weights import PassWeights

QMAX = 127
ZERO_POINT = 128
ACCURACY_LEVEL = 4


def quantize_int8_blocks(w: torch.Tensor, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] (in, out) -> (B uint8 [N, G, group]: q + 128, scales fp32 [N, G]); q in [-127, 127],
    scale = amax / 127 per (column, block of ``group`` rows), 1 where the block is all zero."""
    k, n = w.shape
    g = -(-k // group)
    wt = torch.zeros(n, g * group, dtype=torch.float32)
    wt[:, :k] = w.float().T
    blocks = wt.reshape(n, g, group)
    scale = blocks.abs().amax(-1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / scale[..., None]).clamp(-QMAX, QMAX).to(torch.int16)
    return (q + ZERO_POINT).to(torch.uint8).numpy(), scale.numpy().astype(np.float32)


def dequantize_int8_blocks(b: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_int8_blocks` -> fp32 [K, N] (what MatMulNBits multiplies by)."""
    n, g, group = b.shape
    w = (b.astype(np.float32) - ZERO_POINT) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, g * group)[:, :k].T)


class Int8CpuLmHead(MakesInitializers, QcnRule):
    pass_name = "int8_cpu_lm_head"
    root_domain = ""
    root_op = "MatMul"

    def __init__(self, add=None):
        super().__init__()
        self.add = add

    def pattern(self, op, x, w):
        return op.MatMul(x, w)

    def candidate(self, context, x, w):
        return w is not None and w.name == LM_HEAD and w.is_initializer()

    def check_node(self, context, x, w):
        self._graph = context.graph_or_function
        if w.const_value is None or w.dtype != ir.DataType.FLOAT or w.shape is None or len(w.shape) != 2:
            return refuse(f"{LM_HEAD} is not a 2-D fp32 constant (dtype {w.dtype}, shape {w.shape})")
        if x.dtype not in (None, ir.DataType.FLOAT):
            return refuse(f"MatMulNBits form is for fp32 activations, not {x.dtype}")
        context.model.opset_imports.setdefault("com.microsoft", 1)
        return {}

    def rewrite(self, op, x, w):
        k, n = w.shape
        b, s = quantize_int8_blocks(PassWeights.torch(w))
        bv = self._init(op, ir.Tensor(b, name=f"{w.name}.int8"))
        sv = self._init(op, ir.Tensor(s, name=f"{w.name}.int8_scale"))
        y = op.MatMulNBits(x, bv, sv, _domain="com.microsoft", _version=1, K=k, N=n, bits=8, block_size=GROUP,
                           accuracy_level=ACCURACY_LEVEL)
        return self.count_rewrite(op, y, set())


SPEC = PassSpec(
    Int8CpuLmHead.pass_name, lambda ctx: Int8CpuLmHead(add=ctx.weights.add_tensor),
    ("onnxruntime",), ("", "MatMul"),
    "MatMul(x, lm_head fp32) -> com.microsoft.MatMulNBits bits 8 g128 (int8 activations)",
    wanted=lambda q: None if q.lm_head == "int8" else f"quantization.lm_head is {q.lm_head!r}",
    provides=(("lm_head", "int8"),),
    reasons={"tensorrt": "no pass yet: the 8-bit lm_head is a form of onnxruntime's MatMulNBits",
             "tensorrt_rtx": "no pass yet: the 8-bit lm_head is a form of onnxruntime's MatMulNBits"})


__all__ = ["SPEC", "ACCURACY_LEVEL", "Int8CpuLmHead", "dequantize_int8_blocks", "quantize_int8_blocks"]
