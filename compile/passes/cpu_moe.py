"""Pass ``cpu_moe``: ``qcn::MoE`` (weight_format "float") -> a routed form in standard ONNX ops that
computes only the experts some token of the call selected, for the cpu target.

The function body runs every expert on every token (E/k times the work: 4x on qcn-pico, 51x at
the real 512-expert size) and weights the results with an [N, E] combine matrix that is zero
outside the top-k. This form keeps the body's router and combine matrix and restricts the
expert axis to the experts in use:

  logits, probs, top_p, top_i, combine      as the body (fp32 softmax, TopK, renormalisation)
  used   = Unique(top_i)                    [U] sorted expert ids, U <= min(E, N*k)
  h      = Gather(gate_up, used) @ x^T      [U, 2I, N]   (weights as the left operand: no
  out    = Gather(down, used) @ swiglu(h)   [U, M, N]    transposed copies of them)
  routed = ReduceSum(out * Gather(combine, used, axis=1)^T, axis 0)^T
  y      = routed + sigmoid(x shared_gate^T) * shared(x)    as the body

The experts not in ``used`` have zero combine weights for every token, so the sum has the same
terms in the same (ascending expert) order as the body's: equal to fp32 rounding (tests compare
it with the body on odd sizes), except that a non-finite value in an unselected expert's output
no longer reaches y (0 * inf is NaN in the body). Decode (N = B tokens) reads U <= B*k experts
instead of E; prefill chunks on small models use every expert (U = E) and pay one Gather copy
of the weights.

Refused (node left alone: ONNX Runtime inlines the body) when weight_format is not "float"
(the quantized formats' scale inputs need their own routed form; docs/PASSES.md), or an
input is not float32 (the CPU export's dtype; ONNX Runtime's CPU MatMul has no bf16 kernel).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import QcnRule, attr, refuse

FORMATS = ("float",)
NAMES = ("x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate")


def _i64(op, values):
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def plus_shared_expert(op, x, routed, gate_up_kn, down_kn, shared_gate):
    """y = routed + sigmoid(x shared_gate^T) * (swiglu(x gate_up_kn) down_kn), the op body's shared
    expert; the weights as right MatMul operands [K, N] (a Transpose of the float weight, or a
    DequantizeLinear of an INT4 one). Every CPU MoE form ends with this."""
    gate, up = op.Split(op.MatMul(x, gate_up_kn), axis=-1, num_outputs=2, _outputs=2)
    shared = op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), down_kn)
    sgate = op.Sigmoid(op.MatMul(x, op.Transpose(shared_gate, perm=[1, 0])))
    return op.Add(routed, op.Mul(sgate, shared))


class CpuMoE(QcnRule):
    pass_name = "cpu_moe"
    root_op = "MoE"

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, _domain="qcn")

    def check_node(self, context, **values):
        node = context.root
        fmt = attr(node, "weight_format", "float")
        if fmt not in FORMATS:
            return refuse(f"weight_format {fmt!r} has no routed CPU form yet (supported: {list(FORMATS)}); "
                          "the function body runs")
        odd = [n for n in NAMES if values[n].dtype != ir.DataType.FLOAT]
        if odd:
            return refuse(f"inputs {odd} are not float32 (this lowering is for the CPU export's fp32 activations)")
        top_k = attr(node, "top_k")
        e = values["router_weight"].shape[0] if values["router_weight"].shape is not None else None
        if not isinstance(top_k, int) or top_k < 1 or (isinstance(e, int) and top_k > e):
            return refuse(f"top_k={top_k!r} outside 1..{e}")
        return {}

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        node = self._root
        top_k = attr(node, "top_k")
        norm = bool(attr(node, "norm_topk_prob", 1))

        # router: exactly the body's (fp32 softmax, TopK with lowest-index ties, renormalisation)
        logits = op.MatMul(x, op.Transpose(router_weight, perm=[1, 0]))
        probs = op.Softmax(op.Cast(logits, to=ir.DataType.FLOAT), axis=-1)
        top_p, top_i = op.TopK(probs, _i64(op, [top_k]), axis=-1, largest=1, sorted=1, _outputs=2)
        if norm:
            top_p = op.Div(top_p, op.ReduceSum(top_p, _i64(op, [-1]), keepdims=1))
        top_p = op.CastLike(top_p, x)
        zeros = op.CastLike(op.ConstantOfShape(op.Shape(probs)), x)
        combine = op.ScatterElements(zeros, top_i, top_p, axis=1)  # [N, E]

        # only the experts some token selected; the expert weights are the left operands (no transposed
        # weight copies), tokens run along the last axis
        used = op.Unique(op.Reshape(top_i, _i64(op, [-1])), sorted=1)  # [U]
        xt = op.Transpose(x, perm=[1, 0])                                                  # [M, N]
        h = op.MatMul(op.Gather(gate_up, used, axis=0), xt)                                # [U, 2I, N]
        gate, up = op.Split(h, axis=1, num_outputs=2, _outputs=2)
        out = op.MatMul(op.Gather(down, used, axis=0), op.Mul(op.Mul(gate, op.Sigmoid(gate)), up))  # [U, M, N]
        weights = op.Unsqueeze(op.Transpose(op.Gather(combine, used, axis=1), perm=[1, 0]), _i64(op, [1]))  # [U, 1, N]
        routed = op.Transpose(op.ReduceSum(op.Mul(out, weights), _i64(op, [0]), keepdims=0), perm=[1, 0])

        y = plus_shared_expert(op, x, routed, op.Transpose(shared_gate_up, perm=[1, 0]),
                               op.Transpose(shared_down, perm=[1, 0]), shared_gate)
        return self.count_rewrite(op, y, set())
