"""Pass ``int4_cpu_moe`` (onnxruntime only): ``qcn::MoE`` weight_format "int4" -> ONNX
Runtime's ``com.microsoft.QMoE`` for the routed experts (reads only the routed experts' INT4
weights, dequantized inside its GEMMs) plus the shared expert as INT4 projections:

    logits = MatMul(x, router_weight^T)                                   (activation dtype)
    routed = QMoE(x, logits, fc1 = gate_up, fc1_scales, , fc2 = down, fc2_scales;
                  k = top_k, activation_type "swiglu", swiglu_fusion 1, activation_alpha 1,
                  activation_beta 0, normalize_routing_weights = norm_topk_prob,
                  expert_weight_bits 4, block_size 128)
    shared = MatMul(swiglu(MatMul(x, DQ(shared_gate_up^T))), DQ(shared_down^T))
    y      = routed + Sigmoid(MatMul(x, shared_gate^T)) * shared

Why: the op's int4 function body dequantizes every expert on every step (measured on
qcn-pico's MoE shape, E 16, H 256, I 128, top-4, one token, 1 thread: int4 body 8.3 ms,
float body 0.45 ms, this form 0.12 ms; BENCHMARKS.md). Exact: the same INT4 values and
scales; the softmax over the top-k logits that QMoE takes equals the op's renormalised top-k
softmax (norm_topk_prob 1); ONNX Runtime's MatMulNBits fusion of the shared expert keeps fp32
activations when the session sets ``session.qdq_matmulnbits_accuracy_level`` 0 (int4.py).

Layout changes (new initializers): QMoE takes offset-binary nibbles (q + 8, zero point 8
implied) packed two per byte along K, gate and up rows interleaved (CPU QMoE supports only
``swiglu_fusion`` 1), [E, 2I, H/2] uint8 and scales [E, 2I, H/128]; the shared expert's
weights become [K, N] INT4 + [K/128, N] scales (DequantizeLinear axis 0: the form ORT fuses).
Refused (the function body stays): weight_format other than "int4", H or I not a multiple
of 128 (QMoE's block rule), norm_topk_prob 0 (QMoE would need the router softmax over all
experts), a non-fp32 activation dtype, weights that are not constants.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import MatchResult

from ...plugins.moe.quant import pack_int4
from ..base import QcnRule, attr, refuse
from ..cpu_moe import plus_shared_expert
from .int4 import GROUP, MakesInitializers, int4_tensor
from .int4_projection import const_weight

NAMES = ("x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate",
         "gate_up_scale", "down_scale", "shared_gate_up_scale", "shared_down_scale")


def _ints(v: ir.Value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(v.const_value.numpy()).astype(np.int8))


def _floats(v: ir.Value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(v.const_value.numpy(), dtype=np.float32).copy())


def _offset_binary(q: torch.Tensor) -> np.ndarray:
    """q int8 [.., K] in [-8, 7] -> uint8 [.., K/2]: nibbles q + 8, element 2j in the low nibble."""
    return pack_int4(q).numpy() ^ np.uint8(0x88)


def interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ..] gate rows then up rows -> rows gate0, up0, gate1, up1, .."""
    i = t.shape[1] // 2
    return torch.stack([t[:, :i], t[:, i:]], dim=2).reshape(t.shape)


class Int4CpuMoE(MakesInitializers, QcnRule):
    pass_name = "int4_cpu_moe"
    root_op = "MoE"

    def __init__(self, accuracy_level: int = 0, add=None):
        super().__init__()
        self.accuracy_level, self.add = accuracy_level, add
        self._graph = None

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, gate_up_scale,
                      down_scale, shared_gate_up_scale, shared_down_scale, _domain="qcn")

    def check(self, context, **values):
        if attr(context.root, "weight_format", "float") != "int4":
            return MatchResult().fail("not int4")   # no candidate
        return super().check(context, **values)

    def check_node(self, context, **v):
        self._graph = context.graph_or_function
        if v["x"].dtype != ir.DataType.FLOAT:
            return refuse(f"activation dtype {v['x'].dtype}: the CPU QMoE form is for fp32 graphs")
        if any(const_weight(v[n]) is None for n in NAMES[1:]):
            return refuse("weights or scales are not constant initializers")
        if not attr(context.root, "norm_topk_prob", 1):
            return refuse("norm_topk_prob 0: QMoE's softmax over the top-k logits is the renormalised form only")
        e, i2, h = v["gate_up"].shape
        i = v["down"].shape[2]
        if h % GROUP or i % GROUP:
            return refuse(f"H {h} and I {i} must be multiples of {GROUP} (QMoE's block rule)")
        context.model.opset_imports.setdefault("com.microsoft", 1)
        return {}


    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale):
        node = self._root
        fc1 = self._init(op, ir.Tensor(_offset_binary(interleave_gate_up(_ints(gate_up))), name=f"{gate_up.name}.qmoe"))
        fc1_s = self._init(op, ir.Tensor(interleave_gate_up(_floats(gate_up_scale)).numpy(), name=f"{gate_up_scale.name}.qmoe"))
        fc2 = self._init(op, ir.Tensor(_offset_binary(_ints(down)), name=f"{down.name}.qmoe"))
        fc2_s = self._init(op, ir.Tensor(_floats(down_scale).numpy(), name=f"{down_scale.name}.qmoe"))
        logits = op.MatMul(x, op.Transpose(router_weight, perm=[1, 0]))
        routed = op.QMoE(x, logits, fc1, fc1_s, None, fc2, fc2_s, _domain="com.microsoft", _version=1,
                         k=attr(node, "top_k"), activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                         activation_beta=0.0, normalize_routing_weights=1, expert_weight_bits=4, block_size=GROUP,
                         accuracy_level=self.accuracy_level)

        def kn(q: ir.Value, s: ir.Value) -> ir.Value:   # [R, K] int4 + [R, G] -> DQ of [K, R] (axis 0)
            wq = self._init(op, int4_tensor(_ints(q).T.contiguous(), f"{q.name}.kn"))
            ws = self._init(op, ir.Tensor(_floats(s).T.contiguous().numpy(), name=f"{s.name}.kn"))
            return op.DequantizeLinear(wq, ws, axis=0, block_size=GROUP)

        y = plus_shared_expert(op, x, routed, kn(shared_gate_up, shared_gate_up_scale), kn(shared_down, shared_down_scale),
                               shared_gate)
        return self.count_rewrite(op, y, set())


__all__ = ["Int4CpuMoE"]
