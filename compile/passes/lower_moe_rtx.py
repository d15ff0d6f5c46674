"""Pass ``lower_moe_rtx`` (tensorrt_rtx only): a quantized ``qcn::MoE`` (weight_format "int4" or
"fp8") -> its weights' DequantizeLinear nodes in the main graph + the float ``qcn::MoE``::

    MoE[int4](x, router, gu.int4, d.int4, sgu.int4, sd.int4, sg, gu.s, d.s, sgu.s, sd.s)
 -> MoE[float](x, router, DQ(gu.int4, gu.s), DQ(d.int4, d.s), DQ(sgu.int4, sgu.s), DQ(sd.int4, sd.s), sg)

with the DequantizeLinear of the format's body (docs/OPS.md): int4 axis -1, block_size 128; fp8
(scale [..., R, G] fp32) axis -1, block_size K when G == 1 (one scale per row) else 128, and
``output_dtype`` the activation dtype when that is not fp32 (the fp8 body computes q * scale in
fp32, then casts). The fp8 body itself cannot be built: it Casts the FP8 weights, and TensorRT-RTX
lets only a DequantizeLinear read an FP8 tensor (docs/BUILD.md). Why (measured, docs/BUILD.md): TensorRT-RTX 1.7.1's
parser ignores function overloads (it inlines the first qcn::MoE function it finds, whatever
the node's overload) and cannot inline a function body holding a DequantizeLinear more than
once (the second instance's Dequantize layer name collides: "ILayer::setName: Failed attempt to
rename a layer ... [Dequantize] ... already in use"). In the main graph each DQ has its own
name; the builder keeps the INT4 weights as INT4 constants and fuses them into its GEMMs.

Refused: a MoE whose weight_format has no entry in :data:`DEQUANTIZE` (the float MoE is not
matched at all: it has seven inputs).
"""

from __future__ import annotations

import onnx_ir as ir

from ..plugins.moe import op as moe_op
from .base import QcnRule, attr, refuse



def _int4(q: ir.Value, scale: ir.Value, act: ir.DataType) -> dict | str:
    return {"axis": -1, "block_size": moe_op.INT4_GROUP}


def _fp8(q: ir.Value, scale: ir.Value, act: ir.DataType) -> dict | str:
    K = q.shape[-1] if q.shape is not None else None
    G = scale.shape[-1] if scale.shape is not None else None
    if not isinstance(K, int) or not isinstance(G, int):
        return f"{q.name}: the reduction dim K and the scale groups G must be static (got {q.shape}, {scale.shape})"
    out = {"axis": -1, "block_size": K if G == 1 else moe_op.FP8_BLOCK}
    if act != ir.DataType.FLOAT:
        out["output_dtype"] = act.value
    return out


# weight_format -> (weight, scale, activation dtype) -> the DequantizeLinear attributes equal to its
# function body (compile/plugins/moe/op.py), or why there are none
DEQUANTIZE = {"int4": _int4, "fp8": _fp8}
WEIGHTS = ("gate_up", "down", "shared_gate_up", "shared_down")


class LowerMoeRtx(QcnRule):
    pass_name = "lower_moe_rtx"
    root_op = "MoE"

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                      gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale, _domain="qcn")

    def check_node(self, context, **values):
        fmt = attr(context.root, "weight_format", "float")
        if fmt not in DEQUANTIZE:
            return refuse(f"weight_format {fmt!r}: no DequantizeLinear form known for it (known: {sorted(DEQUANTIZE)})")
        act = values["router_weight"].dtype  # the router stays in the activation dtype (x's may be unknown here)
        if act is None:
            return refuse("the router weight's dtype is unknown, so the activation dtype is")
        self._dq = {}
        for name in WEIGHTS:
            got = DEQUANTIZE[fmt](values[name], values[name + "_scale"], act)
            if isinstance(got, str):
                return refuse(got)
            self._dq[name] = got
        model = context.model
        key = (moe_op.DOMAIN, moe_op.OP_NAME, moe_op.overload("float"))
        if key not in model.functions:  # every MoE of the graph was quantized: the float body is needed again
            opset = model.opset_imports.get("", 23)
            model.functions[key] = ir.serde.deserialize_function(moe_op.function_proto(opset, "float"))
        return {}

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale):
        node = self._root
        w = [op.DequantizeLinear(q, s, **self._dq[name]) for name, q, s in (
            ("gate_up", gate_up, gate_up_scale), ("down", down, down_scale),
            ("shared_gate_up", shared_gate_up, shared_gate_up_scale), ("shared_down", shared_down, shared_down_scale))]
        y = op.MoE(x, router_weight, *w, shared_gate, _domain="qcn", top_k=attr(node, "top_k"),
                   norm_topk_prob=attr(node, "norm_topk_prob", 1), weight_format="float")
        y.shape, y.type = node.outputs[0].shape, node.outputs[0].type
        return self.count_rewrite(op, y, set())


__all__ = ["LowerMoeRtx", "DEQUANTIZE"]
