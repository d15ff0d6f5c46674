"""Pass ``int4_experts``: ``qcn::MoE`` with float weights -> weight_format "int4" (docs/OPS.md):

    MoE(x, router, gate_up, down, shared_gate_up, shared_down, shared_gate)
 -> MoE(x, router, gate_up.int4, down.int4, shared_gate_up.int4, shared_down.int4, shared_gate,
        gate_up.int4_scale, down.int4_scale, shared_gate_up.int4_scale, shared_down.int4_scale)
    with weight_format "int4" and overload "int4" (the model gets the op's int4 body once).

The weights come from a plan: gate_up initializer name -> :class:`MoeInt4` (RTN, or AWQ on
the down projections, :mod:`.int4_experts`), computed once for every graph. The router and
the shared-expert gate stay in the activation dtype. Refused (reported): a layer that is not
in the plan (kept, with the plan's reason), weights that are not constants, a weight_format
other than "float".
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from ...plugins.moe import op as moe_op
from ..base import QcnRule, attr, refuse
from .int4 import TORCH_DTYPES, float_tensor, int4_tensor
from .int4_experts import MATRICES, MoeInt4
from .int4_projection import const_weight

NAMES = ("x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate")


class Int4Experts(QcnRule):
    pass_name = "int4_experts"
    root_op = "MoE"

    def __init__(self, plan: dict[str, MoeInt4], kept: dict[str, str] | None = None):
        super().__init__()
        self.plan, self.kept = plan, dict(kept or {})
        self._graph = None

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, _domain="qcn")

    def check(self, context, **values):
        if attr(context.root, "weight_format", "float") != "float":
            return MatchResult().fail("already quantized")   # not a candidate (e.g. the rewritten node)
        return super().check(context, **values)

    def check_node(self, context, **v):
        self._graph = context.graph_or_function
        gu = v["gate_up"]
        if any(const_weight(v[n]) is None for n in MATRICES):
            return refuse("expert weights are not constant initializers")
        if gu.name not in self.plan:
            return refuse(f"{gu.name} kept unquantized: {self.kept.get(gu.name, 'not in the INT4 plan')}")
        p = self.plan[gu.name]
        for n in MATRICES:
            if tuple(v[n].shape) != tuple(p.q[n].shape):
                return refuse(f"{v[n].name} has shape {list(v[n].shape)}, the plan quantized {list(p.q[n].shape)}")
            if v[n].dtype != v["x"].dtype or TORCH_DTYPES.get(v[n].dtype) != p.scale[n].dtype:
                return refuse(f"{v[n].name} is {v[n].dtype}, x {v['x'].dtype}, plan scales {p.scale[n].dtype}")
        model = context.model
        key = (moe_op.DOMAIN, moe_op.OP_NAME, "int4")
        if key not in model.functions:
            opset = model.opset_imports.get("", 23)
            model.functions[key] = ir.serde.deserialize_function(moe_op.function_proto(opset, "int4"))
        return {}

    def _init(self, op, tensor: ir.Tensor) -> ir.Value:
        have = self._graph.initializers.get(tensor.name) if self._graph is not None else None
        return have if have is not None else op.initializer(tensor, tensor.name)

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        node = self._root
        p = self.plan[gate_up.name]
        ws = {"gate_up": gate_up, "down": down, "shared_gate_up": shared_gate_up, "shared_down": shared_down}
        q = {n: self._init(op, int4_tensor(p.q[n], f"{ws[n].name}.int4")) for n in MATRICES}
        s = {n: self._init(op, float_tensor(p.scale[n], f"{ws[n].name}.int4_scale", x.dtype)) for n in MATRICES}
        y = op.MoE(x, router_weight, q["gate_up"], q["down"], q["shared_gate_up"], q["shared_down"], shared_gate,
                   s["gate_up"], s["down"], s["shared_gate_up"], s["shared_down"], _domain="qcn",
                   top_k=attr(node, "top_k"), norm_topk_prob=attr(node, "norm_topk_prob", 1), weight_format="int4")
        y.producer().overload = moe_op.overload("int4")
        y.shape, y.type = node.outputs[0].shape, node.outputs[0].type
        return self.count_rewrite(op, y, set())


__all__ = ["Int4Experts"]
