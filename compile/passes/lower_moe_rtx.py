"""Pass ``lower_moe_rtx`` (tensorrt_rtx only): a quantized ``qcn::MoE`` (weight_format "int4")
-> its weights' DequantizeLinear nodes in the main graph + the float ``qcn::MoE``::

    MoE[int4](x, router, gu.int4, d.int4, sgu.int4, sd.int4, sg, gu.s, d.s, sgu.s, sd.s)
 -> MoE[float](x, router, DQ(gu.int4, gu.s), DQ(d.int4, d.s), DQ(sgu.int4, sgu.s), DQ(sd.int4, sd.s), sg)

with the same DequantizeLinear the int4 body applies (axis -1, block_size 128: docs/OPS.md), so
the semantics are the int4 body's exactly. Why (measured, docs/BUILD.md): TensorRT-RTX 1.7.1's
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

# weight_format -> the DequantizeLinear attributes of its function body (compile/plugins/moe/op.py)
DEQUANTIZE = {"int4": {"axis": -1, "block_size": moe_op.INT4_GROUP}}


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
        model = context.model
        key = (moe_op.DOMAIN, moe_op.OP_NAME, moe_op.overload("float"))
        if key not in model.functions:  # every MoE of the graph was quantized: the float body is needed again
            opset = model.opset_imports.get("", 23)
            model.functions[key] = ir.serde.deserialize_function(moe_op.function_proto(opset, "float"))
        return {}

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate,
                gate_up_scale, down_scale, shared_gate_up_scale, shared_down_scale):
        node = self._root
        dq = DEQUANTIZE[attr(node, "weight_format")]
        w = [op.DequantizeLinear(q, s, **dq) for q, s in ((gate_up, gate_up_scale), (down, down_scale),
                                                           (shared_gate_up, shared_gate_up_scale),
                                                           (shared_down, shared_down_scale))]
        y = op.MoE(x, router_weight, *w, shared_gate, _domain="qcn", top_k=attr(node, "top_k"),
                   norm_topk_prob=attr(node, "norm_topk_prob", 1), weight_format="float")
        y.shape, y.type = node.outputs[0].shape, node.outputs[0].type
        return self.count_rewrite(op, y, set())


__all__ = ["LowerMoeRtx", "DEQUANTIZE"]
