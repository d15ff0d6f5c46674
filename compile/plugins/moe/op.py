"""qcn::MoE: router + routed experts + gated shared expert of one sparse MoE layer.

Shapes (docs/OPS.md): N tokens (= B*T), H hidden, E experts, I expert width, Is shared width.
    x [N, H], router_weight [E, H], gate_up [E, 2I, H] (gate rows first), down [E, H, I],
    shared_gate_up [2Is, H] (gate rows first), shared_down [H, Is], shared_gate [1, H]
 -> y [N, H] = sum_k p_k * expert_k(x) + sigmoid(x . shared_gate) * shared_expert(x)
Attributes: top_k, norm_topk_prob (0/1), weight_format: "float" (every weight in the activation
dtype) or "fp8": gate_up, down, shared_gate_up, shared_down float8_e4m3fn, with four more inputs
gate_up_scale [E, 2I, G], down_scale [E, H, G'], shared_gate_up_scale [2Is, G], shared_down_scale
[H, G'] fp32, G = 1 (one scale per output row) or ceil(K/128) (1x128 blocks along the row's K):
W[..., r, k] = float(q[..., r, k]) * scale[..., r, k // B], B = K if G == 1 else 128
(reference.dequantize_fp8_blocks; docs/OPS.md). The experts compute in the activation dtype on
the dequantized weights (weight-only FP8, as the kernels do). The body is per format
(``function_proto(opset, weight_format)``): one graph carries one MoE format.

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
from .reference import FP8_BLOCK, dequantize_fp8_blocks, moe_reference

OP_NAME = "MoE"
WEIGHT_FORMATS = ("float", "fp8")
INPUTS = ["x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate"]
WEIGHTS = ["gate_up", "down", "shared_gate_up", "shared_down"]  # the quantizable ones, in input order
SCALES = [f"{w}_scale" for w in WEIGHTS]  # inputs 7..10 of an "fp8" node


def _check_format(weight_format: str, scales=None) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"qcn::MoE weight_format {weight_format!r} is not supported yet; valid: {WEIGHT_FORMATS}")
    if scales is not None and (weight_format == "fp8") != all(s is not None for s in scales):
        raise ValueError(f"qcn::MoE weight_format {weight_format!r}: the four *_scale inputs are required for fp8 "
                         "and absent otherwise")


@torch.library.custom_op("qcn::moe", mutates_args=())
def moe(
    x: torch.Tensor, router_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
    shared_gate_up: torch.Tensor, shared_down: torch.Tensor, shared_gate: torch.Tensor,
    top_k: int, norm_topk_prob: bool, weight_format: str,
    gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None,
    shared_gate_up_scale: torch.Tensor | None = None, shared_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The naive reference (reference.moe_reference) in the op's own precision; "fp8" weights
    are dequantized first (reference.dequantize_fp8_blocks) to the activation dtype."""
    scales = (gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale)
    _check_format(weight_format, scales)
    mats = [gate_up, down, shared_gate_up, shared_down]
    if weight_format == "fp8":
        mats = [dequantize_fp8_blocks(q, s).to(x.dtype) for q, s in zip(mats, scales)]
    return moe_reference(x, router_weight, mats[0], mats[1], mats[2], mats[3], shared_gate, top_k,
                         norm_topk_prob, compute_dtype=None)


@moe.register_fake
def _(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, top_k, norm_topk_prob, weight_format,
      gate_up_scale=None, down_scale=None, shared_gate_up_scale=None, shared_down_scale=None):
    _check_format(weight_format, (gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale))
    return torch.empty_like(x)


def _schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc=__doc__,
        inputs=[P(n, "W" if n in WEIGHTS else "T") for n in INPUTS]
        + [P(n, "S", param_option=OpSchema.FormalParameterOption.Optional) for n in SCALES],
        outputs=[P("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(float8e4m3fn)"],
                           "expert weights: the activation dtype (float) or float8e4m3fn (fp8)"),
                          ("S", ["tensor(float)"], "fp8 weight scales")],
        attributes=[OpSchema.Attribute("top_k", OpSchema.AttrType.INT, "experts per token"),
                    OpSchema.Attribute("norm_topk_prob", OpSchema.AttrType.INT, "renormalise the top-k probabilities"),
                    OpSchema.Attribute("weight_format", OpSchema.AttrType.STRING, "float | fp8")],
    )


register_schema(_schema())
_qcn = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _translation(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                 top_k: int, norm_topk_prob: bool, weight_format: str, gate_up_scale=None, down_scale=None,
                 shared_gate_up_scale=None, shared_down_scale=None):
    # the export emits float MoE nodes; the fp8 format is made by the passes (fp8_experts.py)
    if weight_format != "float":
        raise ValueError(f"qcn::MoE export: weight_format {weight_format!r}; the exporter emits 'float' only")
    return _qcn.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                    top_k=top_k, norm_topk_prob=int(norm_topk_prob), weight_format=weight_format)


def function_proto(opset: int, weight_format: str = "float") -> onnx.FunctionProto:
    """The body for one weight format (a model holds one qcn::MoE body, so one format)."""
    _check_format(weight_format)
    f = FunctionBuilder(OP_NAME, opset)
    i64 = lambda v: f.const(v, "int64")  # noqa: E731
    T = lambda t, perm: f.op("Transpose", t, perm=perm)  # noqa: E731
    w = {n: n for n in WEIGHTS}
    if weight_format == "fp8":
        for n, s in zip(WEIGHTS, SCALES):
            w[n] = _dequantize_fp8(f, n, s)

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
    inputs = INPUTS + (SCALES if weight_format == "fp8" else [])
    return f.build(inputs, ["y"], ["top_k", "norm_topk_prob", "weight_format"])


def _dequantize_fp8(f: FunctionBuilder, q: str, scale: str) -> str:
    """q fp8 [..., R, K], scale fp32 [..., R, G] -> q * scale[..., k // B] in the activation dtype
    (B = K when G == 1, else 128), computed in fp32."""
    K, G = f.dim(q, -1), f.dim(scale, -1)
    B = f.op("Where", f.op("Equal", G, f.const([1], "int64")), K, f.const([FP8_BLOCK], "int64"))
    lead = f.op("Shape", scale, end=-1)
    se = f.op("Expand", f.op("Unsqueeze", scale, f.const([-1], "int64")), f.op("Concat", lead, G, B, axis=0))
    se = f.op("Reshape", se, f.op("Concat", lead, f.op("Mul", G, B), axis=0))
    se = f.op("Slice", se, f.const([0], "int64"), K, f.const([-1], "int64"))
    return f.op("CastLike", f.op("Mul", f.op("Cast", q, to=TensorProto.FLOAT), se), "x")


OP = QcnOp(OP_NAME, torch.ops.qcn.moe.default, _schema(), _translation, function_proto)
