"""Pass ``cpu_moe_ort`` (onnxruntime only): ``qcn::MoE`` weight_format "float" -> ONNX Runtime's
``com.microsoft.MoE`` for the routed experts, plus the shared expert in standard ops:

    logits = MatMul(x, router_weight^T)                                    [N, E]
    routed = MoE(x, logits, fc1 = gate_up (gate/up rows interleaved), , fc2 = down;
                 k = top_k, activation_type "swiglu", swiglu_fusion 1, activation_alpha 1,
                 activation_beta 0, normalize_routing_weights = norm_topk_prob)
    shared = MatMul(swiglu(MatMul(x, shared_gate_up^T)), shared_down^T)
    y      = routed + Sigmoid(MatMul(x, shared_gate^T)) * shared

Why: one kernel reads each routed expert's weights in place (no ``Gather`` copy, no [N, E]
combine matrix), where ``cpu_moe``'s routed form is ~25 kernels per layer; qcn-pico numbers in
BENCHMARKS.md. The float sibling of ``int4_cpu_moe`` (QMoE); the same layout rules: CPU MoE
takes only ``swiglu_fusion`` 1 (rows gate0, up0, gate1, up1, ..), weights [E, out, in].

Exact up to fp32 rounding (tests compare it with the op's function body on odd sizes): the
softmax over the top-k logits that MoE computes equals the renormalised top-k softmax
(norm_topk_prob 1). Refused (``cpu_moe`` or the function body then runs): weight_format other
than "float", norm_topk_prob 0 (MoE would need the softmax over all experts), a non-fp32
activation dtype, weights that are not constant initializers.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from .base import QcnRule, attr, refuse
from .cpu_moe import plus_shared_expert
from .quant.int4 import MakesInitializers
from .quant.int4_cpu_moe import interleave_gate_up
from .quant.int4_projection import const_weight
from .quant.weights import PassWeights

NAMES = ("x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate")


class CpuMoeOrt(MakesInitializers, QcnRule):
    pass_name = "cpu_moe_ort"
    root_op = "MoE"

    def __init__(self, add=None):
        super().__init__()
        self.add = add
        self._graph = None

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, _domain="qcn")

    def check(self, context, **values):
        if attr(context.root, "weight_format", "float") != "float":
            return MatchResult().fail("not float")   # the quantized formats have their own rules
        return super().check(context, **values)

    def check_node(self, context, **v):
        self._graph = context.graph_or_function
        odd = [n for n in NAMES if v[n].dtype != ir.DataType.FLOAT]
        if odd:
            return refuse(f"inputs {odd} are not float32 (com.microsoft.MoE here is for the CPU export's fp32 graphs)")
        if any(const_weight(v[n]) is None for n in NAMES[1:]):
            return refuse("weights are not constant initializers")
        if not attr(context.root, "norm_topk_prob", 1):
            return refuse("norm_topk_prob 0: MoE's softmax over the top-k logits is the renormalised form only")
        top_k = attr(context.root, "top_k")
        e = v["gate_up"].shape[0]
        if not isinstance(top_k, int) or not 1 <= top_k <= e:
            return refuse(f"top_k={top_k!r} outside 1..{e}")
        context.model.opset_imports.setdefault("com.microsoft", 1)
        return {}

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        node = self._root
        w = PassWeights.torch(gate_up)
        fc1 = self._init(op, ir.Tensor(interleave_gate_up(w).contiguous().numpy(), name=f"{gate_up.name}.moe"))
        logits = op.MatMul(x, op.Transpose(router_weight, perm=[1, 0]))
        routed = op.MoE(x, logits, fc1, None, down, _domain="com.microsoft", _version=1,
                        k=attr(node, "top_k"), activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                        activation_beta=0.0, normalize_routing_weights=1)
        y = plus_shared_expert(op, x, routed, op.Transpose(shared_gate_up, perm=[1, 0]),
                               op.Transpose(shared_down, perm=[1, 0]), shared_gate)
        return self.count_rewrite(op, y, set())


__all__ = ["CpuMoeOrt"]
