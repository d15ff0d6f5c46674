"""FP8 activations for weights that already are FP8 (contract 2, the official FP8 release):
``MatMul(x, DequantizeLinear(W_fp8 const, s const))`` -- what the export emits when it keeps
the checkpoint's FP8 bytes (compile/export/fp8.py) -- becomes

    MatMul(DequantizeLinear(QuantizeLinear(x, s_x, 0), s_x, 0), DequantizeLinear(W_fp8, s))

with the weight side untouched (no re-quantization: its bytes stay the checkpoint's) and
``s_x`` the static per-tensor scale calibrated for ``x`` (key: the FP8 weight's initializer
name), exactly as fp8_projection.py does for float weights. Runs when ``quantization.weights:
fp8``. Refused: a DequantizeLinear whose input is not a float8e4m3fn constant, the MatMul
producing a graph output (lm_head), no calibrated range.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from ..base import ContextRule, refuse
from ..plan import ALL_MODULES, PassSpec
from . import fp8
from .fp8_projection import FLOATS, quantized_output, torch_dtype

PASS = "fp8_activations"


def _dq_weight(w: ir.Value) -> ir.Value | None:
    """The fp8 constant behind ``w = DequantizeLinear(W_fp8, s)`` (None otherwise)."""
    p = w.producer()
    if p is None or (p.op_type, p.domain) != ("DequantizeLinear", ""):
        return None
    q = p.inputs[0]
    if q is None or q.const_value is None or not q.is_initializer() or q.dtype != ir.DataType.FLOAT8E4M3FN:
        return None
    return q


class Fp8Activations(ContextRule):
    root_domain, root_op = "", "MatMul"
    graph_only = True

    pass_name = PASS

    def pattern(self, op, x, w):
        return op.MatMul(x, w)

    def candidate(self, context, x, w, **_) -> bool:
        p = w.producer()
        if p is None or (p.op_type, p.domain) != ("DequantizeLinear", ""):
            return False  # a float weight: fp8_projection's business
        xp = x.producer()
        return xp is None or xp.op_type != "DequantizeLinear"  # activations already Q/DQ'd: done

    def check_node(self, context, x, w, **_):
        q = _dq_weight(w)
        if q is None:
            return refuse(f"{w.name!r} is a DequantizeLinear of something other than a float8e4m3fn constant")
        if x.dtype not in FLOATS:
            return refuse(f"input {x.name!r} is {x.dtype}, not a float activation")
        why = quantized_output(context.root)
        if why:
            return refuse(why)
        rng = self.ctx.ranges.get(q.name)
        if rng is None:
            return refuse(f"no calibrated range for the input of {q.name!r}")
        amax = rng.value(self.ctx.quant.calibration)
        if not (math.isfinite(amax) and amax > 0):
            return refuse(f"calibrated |x| range of the input of {q.name!r} is {amax} (need finite > 0)")
        return {}

    def rewrite(self, op, x, w, **_):
        q = _dq_weight(w)
        ctx = self.ctx
        sx = fp8.activation_scale(ctx.ranges[q.name].value(ctx.quant.calibration), torch_dtype(x.dtype))
        x_scale = ctx.weights.add(op, f"{q.name}.input_scale", sx)
        x_zero = ctx.weights.add(op, f"{q.name}.input_zero", torch.zeros((), dtype=fp8.FP8))
        xd = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zero), x_scale, x_zero)
        return self.count_rewrite(op, op.MatMul(xd, w), set())


def calibration_targets(model: ir.Model) -> dict[str, str]:
    """{FP8 weight name: input tensor name} of every MatMul this rule may rewrite."""
    out = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2 and node.inputs[1] is not None:
            q = _dq_weight(node.inputs[1])
            if q is not None and quantized_output(node) is None:
                out[q.name] = node.inputs[0].name
    return out


SPEC = PassSpec(
    PASS, Fp8Activations, ALL_MODULES, ("", "MatMul"),
    "MatMul(x, DQ(W fp8 const)) (the official FP8 release) -> Q/DQ(x, static scale) in front; weights untouched",
    wanted=lambda q: None if q.weights == "fp8" else f"quantization.weights is {q.weights!r}",
    calibrate=calibration_targets,
)
