"""Pass ``int4_projections``: ``MatMul(x, W const [K, N])`` -> the INT4 weight-only form
(shared contract 2; numbers in :mod:`.int4`):

    MatMul(x', DequantizeLinear(W.int4 INT4 [K, N], W.int4_scale fp32 [ceil(K/128), N], axis=0, block_size=128))

x' = x for RTN and for AWQ weights whose 1/s was folded into the norm weight producing x (the
pass checks that the fold happened: x must come from ``Mul(., <norm>.awq)``); otherwise
x' = Mul(x, W.awq_inv_scale [K]). The weights come from a plan (name -> :class:`Int4Weight`)
computed once for all graphs (prefill and decode share the weights file), so both graphs
get identical initializers. A MatMul whose weight is not in the plan is left alone and, when
the weight is a constant, reported with the reason it was kept (the plan's ``kept`` map:
``quantization.keep`` rule, lm_head default, ...).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from ..base import QcnRule, refuse
from .int4 import TORCH_DTYPES, Int4Weight, float_tensor, int4_tensor


def const_weight(w: ir.Value | None) -> ir.Value | None:
    """``w`` if it is a graph initializer (a constant weight), else None."""
    return w if w is not None and w.is_initializer() and w.const_value is not None else None


def producer_constant(x: ir.Value, op_type: str = "Mul") -> str | None:
    """The initializer name of the ``op_type`` node producing ``x`` with one constant input."""
    node = x.producer()
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    names = [v.name for v in node.inputs if const_weight(v) is not None]
    return names[0] if len(names) == 1 else None


class Int4Projection(QcnRule):
    root_domain = ""
    root_op = "MatMul"

    def __init__(self, plan: dict[str, Int4Weight], kept: dict[str, str] | None = None):
        super().__init__()
        self.plan, self.kept = plan, dict(kept or {})
        self._graph: ir.Graph | ir.Function | None = None

    pass_name = "int4_projections"

    def pattern(self, op, x, w):
        return op.MatMul(x, w)

    def check(self, context, x, w):
        # only projections (a constant weight) are candidates: activation x activation MatMuls and
        # the rewritten MatMul(x, DequantizeLinear(..)) are not counted as matched or refused
        if const_weight(w) is None:
            return MatchResult().fail("not a projection (the weight is not a constant)")
        return super().check(context, x=x, w=w)

    def check_node(self, context, x, w):
        self._graph = context.graph_or_function
        if w.name not in self.plan:
            return refuse(f"{w.name} kept unquantized: {self.kept.get(w.name, 'not in the INT4 plan')}")
        p = self.plan[w.name]
        if tuple(w.shape) != p.shape:
            return refuse(f"{w.name} has shape {list(w.shape)}, the plan quantized {list(p.shape)}")
        if w.dtype not in TORCH_DTYPES or TORCH_DTYPES[w.dtype] != p.scale.dtype:
            return refuse(f"{w.name} is {w.dtype}; the plan's scales are {p.scale.dtype} (scales are in the "
                          "weight's activation dtype)")
        if p.fold is not None and producer_constant(x) != f"{p.fold}.awq":
            return refuse(f"{w.name}: AWQ scales were folded into {p.fold}, but x is not produced by "
                          f"Mul(., {p.fold}.awq) (the fold pass must run first)")
        return {}

    def _init(self, op, tensor: ir.Tensor) -> ir.Value:
        """An initializer, shared when an earlier rewrite in this graph made the same one."""
        have = self._graph.initializers.get(tensor.name) if self._graph is not None else None
        return have if have is not None else op.initializer(tensor, tensor.name)

    def rewrite(self, op, x, w):
        p = self.plan[w.name]
        wq = self._init(op, int4_tensor(p.q, p.q_name))
        scale = self._init(op, float_tensor(p.scale, p.scale_name, w.dtype))
        if p.input_scale is not None and p.fold is None:
            x = op.Mul(x, self._init(op, float_tensor(1.0 / p.input_scale.double(), p.inv_scale_name, w.dtype)))
        wd = op.DequantizeLinear(wq, scale, axis=0, block_size=p.group)
        return self.count_rewrite(op, op.MatMul(x, wd), set())


__all__ = ["Int4Projection", "const_weight", "producer_constant"]
