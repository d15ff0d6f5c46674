"""FP8 W8A8 projections (contract 2): ``MatMul(x, W)`` with a constant ``W [K, N]`` becomes

    MatMul(DequantizeLinear(QuantizeLinear(x, s_x, 0), s_x, 0), DequantizeLinear(W_fp8, s_w, axis, block_size))

``W_fp8`` float8_e4m3fn [K, N]; ``s_w`` [N] (``quantization.fp8_granularity: channel``, axis=1) or
[ceil(K/128), N] (``block128``: 1x128 blocks along K, axis=0, block_size=128); ``s_x`` a static
per-tensor scalar from calibration (the range of ``x`` over the calibration text, ``max`` or
``percentile``), zero points float8 0. Scales in the activation dtype. This is the explicit
Q/DQ form TensorRT turns into an FP8 GEMM (docs/QUANTIZATION.md); ONNX Runtime runs it as
written on any CPU.

Not rewritten (refused, with the reason in the report): a MatMul whose weight is not a 2-D float
constant (activations x activations, weights already quantized: see fp8_activations.py), the
MatMul producing a graph output (lm_head: ``logits`` stays in the activation dtype), one without
a calibrated range. The router, the shared-expert gate and the experts are inside ``qcn::MoE``
(its weight_format, not this rule), embeddings are a Gather, norms are elementwise: none is a
MatMul of the graph.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch
from qcn.artifact import DTYPES, from_onnx

from ..base import ContextRule, refuse
from ..plan import ALL_MODULES, PassSpec
from . import fp8

PASS = "fp8_projection"
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def torch_dtype(dtype: ir.DataType) -> torch.dtype:
    return getattr(torch, DTYPES[from_onnx(int(dtype))].torch)


def quantized_output(node: ir.Node) -> str | None:
    """Why a MatMul's output must stay in the activation dtype (None: it may be quantized)."""
    out = node.outputs[0]
    if out.is_graph_output():
        return f"produces graph output {out.name!r} (lm_head stays in the activation dtype)"
    return None


def _quantized(w: ir.Value) -> bool:
    p = w.producer()
    return p is not None and p.op_type == "DequantizeLinear" and p.domain == ""


class Fp8Projection(ContextRule):
    root_domain, root_op = "", "MatMul"
    graph_only = True

    pass_name = PASS

    def pattern(self, op, x, w):
        return op.MatMul(x, w)

    def candidate(self, context, x, w, **_) -> bool:
        return not _quantized(w)  # a weight already behind DequantizeLinear: fp8_activations' business

    def check_node(self, context, x, w, **_):
        if w.const_value is None or not w.is_initializer():
            return refuse(f"weight {w.name!r} is not a constant initializer")
        if w.dtype not in FLOATS or w.shape is None or len(w.shape) != 2:
            return refuse(f"weight {w.name!r}: {w.dtype} rank {None if w.shape is None else len(w.shape)} "
                          "(need a 2-D float [K, N])")
        if x.dtype not in FLOATS:
            return refuse(f"input {x.name!r} is {x.dtype}, not a float activation")
        why = quantized_output(context.root)
        if why:
            return refuse(why)
        rng = self.ctx.ranges.get(w.name)
        if rng is None:
            return refuse(f"no calibrated range for the input of {w.name!r}")
        amax = rng.value(self.ctx.quant.calibration)
        if not (math.isfinite(amax) and amax > 0):
            return refuse(f"calibrated |x| range of the input of {w.name!r} is {amax} (need finite > 0)")
        return {}

    def rewrite(self, op, x, w, **_):
        q, ctx = self.ctx.quant, self.ctx
        act = torch_dtype(x.dtype)
        wq, sw = fp8.quantize_weight(ctx.weights.torch(w), q.fp8_granularity, act)
        sx = fp8.activation_scale(ctx.ranges[w.name].value(q.calibration), act)
        x_scale = ctx.weights.add(op, f"{w.name}.input_scale", sx)
        x_zero = ctx.weights.add(op, f"{w.name}.input_zero", torch.zeros((), dtype=fp8.FP8))
        xd = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zero), x_scale, x_zero)
        blocks = {"axis": 0, "block_size": fp8.BLOCK} if q.fp8_granularity == "block128" else {"axis": 1}
        wd = op.DequantizeLinear(ctx.weights.add(op, f"{w.name}.fp8", wq), ctx.weights.add(op, f"{w.name}.fp8_scale", sw),
                                 **blocks)
        return self.count_rewrite(op, op.MatMul(xd, wd), set())


def calibration_targets(model: ir.Model) -> dict[str, str]:
    """{weight name: input tensor name} of every MatMul this rule may rewrite (ranges to collect)."""
    out = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2:
            x, w = node.inputs
            if w is not None and w.const_value is not None and w.is_initializer() and quantized_output(node) is None:
                out[w.name] = x.name
    return out


SPEC = PassSpec(
    PASS, Fp8Projection, ALL_MODULES, ("", "MatMul"),
    "MatMul(x, W) -> FP8 W8A8: Q/DQ(x, static scale) x DQ(W fp8, per-channel | 1x128 scales)",
    wanted=lambda q: None if q.weights == "fp8" else f"quantization.weights is {q.weights!r}",
    provides=(("weights", "fp8"),),
    calibrate=calibration_targets,
)
