"""qcn::MoE: router + routed experts + gated shared expert of one sparse MoE layer.

Shapes (docs/OPS.md): N tokens (= B*T), H hidden, E experts, I expert width, Is shared width.
    x [N, H], router_weight [E, H], gate_up [E, 2I, H] (gate rows first), down [E, H, I],
    shared_gate_up [2Is, H] (gate rows first), shared_down [H, Is], shared_gate [1, H]
 -> y [N, H] = sum_k p_k * expert_k(x) + sigmoid(x . shared_gate) * shared_expert(x)
Attributes: top_k, norm_topk_prob (0/1), weight_format ("float": unquantized; the quantized
formats arrive with the quantization passes and are rejected until then).

Router as transformers' Qwen3NextTopKRouter: logits in the activation dtype, softmax over E in
fp32, top-k, renormalised when norm_topk_prob, then cast to the activation dtype.
expert(x) = down(silu(gate(x)) * up(x)). Exact ties in top-k go to the lowest expert index (ONNX
TopK's rule; docs/OPS.md). torch.topk does not promise that on CPU (it returned [2, 4] for
five equal probabilities), so the reference (reference.py, which this op calls) uses a stable sort.

The function body computes every expert for every token and weights the results with a dense
[N, E] combine matrix that is zero outside the top-k: exact, simple, and the semantics a
kernel must reproduce. It is the CPU fallback, not the fast path (the Triton kernels read only
the selected experts).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import TensorProto
from onnx.defs import OpSchema

from ..onnx_function import DOMAIN, DOMAIN_VERSION, FunctionBuilder, QcnOp, register_schema
from .reference import moe_reference

OP_NAME = "MoE"
WEIGHT_FORMATS = ("float",)
INPUTS = ["x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate"]


def _check_format(weight_format: str) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"qcn::MoE weight_format {weight_format!r} is not supported yet; valid: {WEIGHT_FORMATS}")


@torch.library.custom_op("qcn::moe", mutates_args=())
def moe(
    x: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    shared_gate_up: torch.Tensor, shared_down: torch.Tensor, shared_gate: torch.Tensor,
    top_k: int, norm_topk_prob: bool, weight_format: str,
) -> torch.Tensor:
    """The naive reference (reference.moe_reference) in the op's own precision."""
    _check_format(weight_format)
    return moe_reference(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k,
                         norm_topk_prob, compute_dtype=None)


@moe.register_fake
def _(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k, norm_topk_prob, weight_format):
    _check_format(weight_format)
    return torch.empty_like(x)


def _schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc=__doc__,
        inputs=[P(n, "T") for n in INPUTS],
        outputs=[P("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")],
        attributes=[OpSchema.Attribute("top_k", OpSchema.AttrType.INT, "experts per token"),
                    OpSchema.Attribute("norm_topk_prob", OpSchema.AttrType.INT, "renormalise the top-k probabilities"),
                    OpSchema.Attribute("weight_format", OpSchema.AttrType.STRING, "float")],
    )


register_schema(_schema())
_qcn = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _translation(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                 top_k: int, norm_topk_prob: bool, weight_format: str):
    return _qcn.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                    top_k=top_k, norm_topk_prob=int(norm_topk_prob), weight_format=weight_format)


def function_proto(opset: int) -> onnx.FunctionProto:
    f = FunctionBuilder(OP_NAME, opset)
    i64 = lambda v: f.const(v, "int64")  # noqa: E731
    T = lambda t, perm: f.op("Transpose", t, perm=perm)  # noqa: E731

    def swiglu(h):  # [..., 2W] -> [..., W], gate half first
        gate, up = f.op("Split", h, axis=-1, num_outputs=2, outputs=2)
        return f.op("Mul", f.op("Mul", gate, f.op("Sigmoid", gate)), up)

    # router: softmax in fp32, top-k, optional renormalisation, back to the activation dtype
    logits = f.op("MatMul", "x", T("router_weight", [1, 0]))
    probs = f.op("Softmax", f.op("Cast", logits, to=TensorProto.FLOAT), axis=-1)
    k = f.op("Unsqueeze", f.attr_const("top_k", onnx.AttributeProto.INT), i64([0]))
    top_p, top_i = f.op("TopK", probs, k, axis=-1, largest=1, sorted=1, outputs=2)
    norm = f.op("Cast", f.attr_const("norm_topk_prob", onnx.AttributeProto.INT), to=TensorProto.BOOL)
    denom = f.op("Where", norm, f.op("ReduceSum", top_p, i64([-1]), keepdims=1), f.const(1.0, "float32"))
    top_p = f.op("CastLike", f.op("Div", top_p, denom), "x")
    zeros = f.op("CastLike", f.op("ConstantOfShape", f.op("Shape", probs)), "x")
    combine = f.op("ScatterElements", zeros, top_i, top_p, axis=1)  # [N, E], zero outside the top-k

    # every expert on every token: [E, N, 2I] -> [E, N, I] -> [E, N, H], weighted, summed over E
    h = f.op("MatMul", f.op("Unsqueeze", "x", i64([0])), T("gate_up", [0, 2, 1]))
    expert_out = f.op("MatMul", swiglu(h), T("down", [0, 2, 1]))
    routed = f.op("ReduceSum", f.op("Mul", expert_out, f.op("Unsqueeze", T(combine, [1, 0]), i64([-1]))),
                  i64([0]), keepdims=0)

    shared = f.op("MatMul", swiglu(f.op("MatMul", "x", T("shared_gate_up", [1, 0]))), T("shared_down", [1, 0]))
    gate = f.op("Sigmoid", f.op("MatMul", "x", T("shared_gate", [1, 0])))  # [N, 1]
    f.graph_op("Add", [routed, f.op("Mul", gate, shared)], ["y"])
    return f.build(INPUTS, ["y"], ["top_k", "norm_topk_prob", "weight_format"])


OP = QcnOp(OP_NAME, torch.ops.qcn.moe.default, _schema(), _translation, function_proto)
