"""qcn::MoE: router + routed experts + gated shared expert of one sparse MoE layer.

Shapes (docs/OPS.md): N tokens (= B*T), H hidden, E experts, I expert width, Is shared width.
    x [N, H], router_weight [E, H], gate_up [E, 2I, H] (gate rows first), down [E, H, I],
    shared_gate_up [2Is, H] (gate rows first), shared_down [H, Is], shared_gate [1, H]
 -> y [N, H] = sum_k p_k * expert_k(x) + sigmoid(x . shared_gate) * shared_expert(x)
Attributes: top_k, norm_topk_prob (0/1), weight_format ("float": unquantized, as exported;
"int4": made by the INT4 pass; "fp8": made by the fp8_experts pass; docs/OPS.md).

Weight formats are ONNX function overloads (IR v10): a node with weight_format F has
``overload`` F ("" for "float", as exported) and the model carries one body per format it uses,
so float and quantized MoE layers can share a graph (``quantization.keep``). A quantized body
dequantizes its weights to the activation dtype and then is the float body:
  "int4"  gate_up, down, shared_gate_up, shared_down are INT4 [.., R, K] (symmetric, no zero
          point) with the optional inputs gate_up_scale .. shared_down_scale [.., R, ceil(K/128)]
          in the activation dtype: W[.., r, k] = q[.., r, k] * scale[.., r, k // 128]
          (DequantizeLinear axis=-1, block_size=128; a final partial group allowed).
  "fp8"   gate_up, down, shared_gate_up, shared_down are float8e4m3fn [.., R, K] with the
          optional inputs gate_up_scale .. shared_down_scale [.., R, G] fp32, G = 1 (one scale per
          output row: the MoE kernels' FP8 format) or ceil(K/128) (1x128 blocks along K):
          W[.., r, k] = float(q[.., r, k]) * scale[.., r, k // B], B = K if G == 1 else 128,
          computed in fp32, then cast to the activation dtype (reference.dequantize_fp8_blocks).

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
from .reference import FP8_BLOCK, moe_reference

OP_NAME = "MoE"
WEIGHT_FORMATS = ("float", "int4", "fp8")
INPUTS = ["x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate"]
QUANTIZED = ["gate_up", "down", "shared_gate_up", "shared_down"]
SCALE_INPUTS = [f"{n}_scale" for n in QUANTIZED]
INT4_GROUP = 128


def overload(weight_format: str) -> str:
    """The function overload a node of ``weight_format`` calls ("" = the exported float body)."""
    return "" if weight_format == "float" else weight_format


def _check_format(weight_format: str) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"qcn::MoE weight_format {weight_format!r} is not supported yet; valid: {WEIGHT_FORMATS}")


def _check_torch_format(weight_format: str) -> None:
    _check_format(weight_format)
    if weight_format != "float":
        raise ValueError(f"qcn::MoE weight_format {weight_format!r}: the torch op (export) takes float weights; "
                         "quantized formats are made by the passes stage")


@torch.library.custom_op("qcn::moe", mutates_args=())
def moe(
    x: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    shared_gate_up: torch.Tensor, shared_down: torch.Tensor, shared_gate: torch.Tensor,
    top_k: int, norm_topk_prob: bool, weight_format: str,
) -> torch.Tensor:
    """The naive reference (reference.moe_reference) in the op's own precision."""
    _check_torch_format(weight_format)
    return moe_reference(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k,
                         norm_topk_prob, compute_dtype=None)


@moe.register_fake
def _(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k, norm_topk_prob, weight_format):
    _check_torch_format(weight_format)
    return torch.empty_like(x)


def _schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc=__doc__,
        inputs=[P(n, "W" if n in QUANTIZED else "T") for n in INPUTS]
        + [P(n, "S", param_option=OpSchema.FormalParameterOption.Optional) for n in SCALE_INPUTS],
        outputs=[P("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("S", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "weight scales: the activation dtype (int4), fp32 (fp8)"),
                          ("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int4)",
                                 "tensor(float8e4m3fn)"], "expert weights (the activation dtype when float)")],
        attributes=[OpSchema.Attribute("top_k", OpSchema.AttrType.INT, "experts per token"),
                    OpSchema.Attribute("norm_topk_prob", OpSchema.AttrType.INT, "renormalise the top-k probabilities"),
                    OpSchema.Attribute("weight_format", OpSchema.AttrType.STRING, "/".join(WEIGHT_FORMATS))],
    )


register_schema(_schema())
_qcn = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _translation(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                 top_k: int, norm_topk_prob: bool, weight_format: str):
    return _qcn.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                    top_k=top_k, norm_topk_prob=int(norm_topk_prob), weight_format=weight_format)


def _dequantize_int4(f: FunctionBuilder, name: str) -> str:
    return f.op("DequantizeLinear", name, f"{name}_scale", axis=-1, block_size=INT4_GROUP, hint=f"{name}_dq")


def _dequantize_fp8(f: FunctionBuilder, name: str) -> str:
    """q fp8 [..., R, K], scale fp32 [..., R, G] -> q * scale[..., k // B] in the activation dtype
    (B = K when G == 1, else 128), computed in fp32."""
    q, scale = name, f"{name}_scale"
    K, G = f.dim(q, -1), f.dim(scale, -1)
    B = f.op("Where", f.op("Equal", G, f.const([1], "int64")), K, f.const([FP8_BLOCK], "int64"))
    lead = f.op("Shape", scale, end=-1)
    se = f.op("Expand", f.op("Unsqueeze", scale, f.const([-1], "int64")), f.op("Concat", lead, G, B, axis=0))
    se = f.op("Reshape", se, f.op("Concat", lead, f.op("Mul", G, B), axis=0))
    se = f.op("Slice", se, f.const([0], "int64"), K, f.const([-1], "int64"))
    return f.op("CastLike", f.op("Mul", f.op("Cast", q, to=TensorProto.FLOAT), se), "x", hint=f"{name}_dq")


DEQUANTIZE = {"int4": _dequantize_int4, "fp8": _dequantize_fp8}   # weight_format -> (builder, input name) -> the weight in the act dtype


def function_proto(opset: int, weight_format: str = "float") -> onnx.FunctionProto:
    """The body of qcn::MoE for one weight format (the overload :func:`overload` names)."""
    _check_format(weight_format)
    f = FunctionBuilder(OP_NAME, opset)
    i64 = lambda v: f.const(v, "int64")  # noqa: E731
    T = lambda t, perm: f.op("Transpose", t, perm=perm)  # noqa: E731
    w = {n: n for n in QUANTIZED}
    if weight_format != "float":
        w = {n: DEQUANTIZE[weight_format](f, n) for n in QUANTIZED}

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
    h = f.op("MatMul", f.op("Unsqueeze", "x", i64([0])), T(w["gate_up"], [0, 2, 1]))
    expert_out = f.op("MatMul", swiglu(h), T(w["down"], [0, 2, 1]))
    routed = f.op("ReduceSum", f.op("Mul", expert_out, f.op("Unsqueeze", T(combine, [1, 0]), i64([-1]))),
                  i64([0]), keepdims=0)

    shared = f.op("MatMul", swiglu(f.op("MatMul", "x", T(w["shared_gate_up"], [1, 0]))), T(w["shared_down"], [1, 0]))
    gate = f.op("Sigmoid", f.op("MatMul", "x", T("shared_gate", [1, 0])))  # [N, 1]
    f.graph_op("Add", [routed, f.op("Mul", gate, shared)], ["y"])
    inputs = INPUTS if weight_format == "float" else INPUTS + SCALE_INPUTS
    proto = f.build(inputs, ["y"], ["top_k", "norm_topk_prob", "weight_format"])
    proto.overload = overload(weight_format)
    return proto


OP = QcnOp(OP_NAME, torch.ops.qcn.moe.default, _schema(), _translation, function_proto)
