"""The INT4 rows of the pass table (compile/passes/plan.py) and the plan they share.

  int4_awq_fold     AWQ's 1/s into the norm weights (only with int4_method awq)
  int4_projections  MatMul(x, W) -> MatMul(x', DQ(W int4, scale, axis 0, block 128))   weights: int4
  int4_experts      qcn::MoE float -> weight_format "int4"                             experts: int4
  int4_cpu_moe      qcn::MoE int4 -> com.microsoft.QMoE + shared expert (onnxruntime)  experts: int4
  int4_cpu_matmul   MatMul(x, DQ(W int4)) -> com.microsoft.MatMulNBits (onnxruntime)

One :class:`Int4State` per passes stage (``ctx.shared``), made on the prefill graph at the
first check of any INT4 rule (before any INT4 rewrite): which weights are quantized and how,
which are kept and why, and for AWQ the calibration statistics, from one calibration run
(:meth:`PassContext.activations`) that records every projection group's input (its Gram
matrix) and every MoE layer's input (every token through every expert). The decode graph
reuses it, so both graphs get identical initializers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir
import torch

from ..base import PassError, to_proto
from ..plan import ALL_MODULES, PassSpec
from .awq import AwqStats
from .int4 import TORCH_DTYPES, torch_threads
from .int4_cpu_matmul import Int4CpuMatMul
from .int4_cpu_moe import Int4CpuMoE
from .int4_experts import MoeInt4, MoeStats, MoeWeights, quantize_moe
from .int4_fold import Int4AwqFold
from .int4_moe import Int4Experts
from .int4_projection import Int4Projection
from .int4_plan import ProjectionPlan, groups, kept_reason, plan_projections, projections

log = logging.getLogger(__name__)
KEY = "int4"


@dataclass
class Int4State:
    projections: ProjectionPlan = field(default_factory=ProjectionPlan)
    experts: dict[str, MoeInt4] = field(default_factory=dict)      # gate_up initializer name -> INT4 layer
    experts_kept: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict:
        return {"projections": self.projections.report(),
                "experts": [q.report for q in self.experts.values()],
                "experts_kept": [{"layer": k, "why": v} for k, v in sorted(self.experts_kept.items())]}


def _moe_weights(node: ir.Node, load) -> MoeWeights:
    v = node.inputs
    return MoeWeights(load(v[1]), load(v[2]), load(v[3]), load(v[4]), load(v[5]), node.attributes["top_k"].value,
                      bool(node.attributes["norm_topk_prob"].value))


def make_state(ctx, model: ir.Model) -> Int4State:
    q = ctx.quant
    method, keep = q.int4_method, tuple(q.keep)
    load = ctx.weights.torch
    st = Int4State()
    graph = model.graph
    moes = [n for n in graph if n.op_type == "MoE" and n.domain == "qcn"
            and n.attributes.get("weight_format") is not None and n.attributes["weight_format"].value == "float"]
    want_proj, want_experts = q.weights == "int4", q.experts == "int4"
    # what AWQ needs to see: each projection group's input, each MoE layer's input
    grps = []
    if want_proj:
        quantized = {w.name for _, _, w in projections(graph) if kept_reason(w.name, keep) is None}
        grps = groups(graph, quantized)
    moe_layers = {}
    for node in moes if want_experts else []:
        name = node.inputs[2].name
        why = kept_reason(name, keep)
        if why is not None:
            st.experts_kept[name] = why
        elif node.inputs[0].dtype not in TORCH_DTYPES:
            st.experts_kept[name] = f"activation dtype {node.inputs[0].dtype} is not fp32/fp16/bf16"
        else:
            moe_layers[name] = node
    gstats: dict[str, AwqStats] = {}
    mstats: dict[str, MoeStats] = {}
    if method == "awq":
        names = list(dict.fromkeys([g.x for g in grps] + [n.inputs[0].name for n in moe_layers.values()]))
        with torch_threads(1):
            for name, node in moe_layers.items():
                mstats[name] = MoeStats(_moe_weights(node, load))
        if ctx.activations is None:
            raise PassError("quantization.int4_method awq needs calibration text (quantization.calibration.source)")
        for out in ctx.activations(to_proto(model), names, "INT4 AWQ statistics"):
            with torch_threads(1):
                for g in grps:
                    x = torch.from_numpy(out[g.x])
                    gstats.setdefault(g.x, AwqStats(x.shape[-1])).add(x)
                for name, node in moe_layers.items():
                    mstats[name].add(torch.from_numpy(out[node.inputs[0].name]))
    if want_proj:
        st.projections = plan_projections(graph, load, method=method, keep=keep,
                                          activations=lambda xs: {x: gstats[x] for x in xs})
    for name, node in moe_layers.items():
        w = mstats[name].w if name in mstats else _moe_weights(node, load)
        st.experts[name] = quantize_moe(name, w, method, mstats.get(name), TORCH_DTYPES[node.inputs[0].dtype])
    for k, why in list(st.projections.kept.items()) + list(st.experts_kept.items()):
        log.info("int4: %s kept unquantized: %s", k, why)
    return st


def state(ctx, model: ir.Model) -> Int4State:
    st = ctx.shared.get(KEY)
    if st is None:
        if ctx.graph != "prefill":
            raise PassError("the INT4 plan is made on the prefill graph, which the stage runs first")
        st = ctx.shared[KEY] = make_state(ctx, model)
    return st


def _adder(ctx):
    """ir.Tensor -> an initializer in weights.passes.bin (the stage's writer)."""
    return lambda op, tensor: ctx.weights.add_tensor(op, tensor)


class _Fold(Int4AwqFold):
    def __init__(self, ctx):
        super().__init__({}, add=_adder(ctx))
        self.ctx = ctx

    def check(self, context, **b):
        self.folds = state(self.ctx, context.model).projections.folds
        return super().check(context, **b)


def _projections(ctx):
    class Rule(Int4Projection):
        def check(self, context, **b):
            p = state(ctx, context.model).projections
            self.plan, self.kept = p.weights, p.kept
            return super().check(context, **b)

    return Rule({}, add=_adder(ctx))


def _experts(ctx):
    class Rule(Int4Experts):
        def check(self, context, **b):
            s = state(ctx, context.model)
            self.plan, self.kept = s.experts, s.experts_kept
            return super().check(context, **b)

    return Rule({}, add=_adder(ctx))


def _method_awq(q) -> str | None:
    if q.weights != "int4":
        return f"quantization.weights is {q.weights!r}"
    return None if q.int4_method == "awq" else f"quantization.int4_method is {q.int4_method!r}"


ROWS = (
    PassSpec("int4_awq_fold", _Fold, ALL_MODULES, ("", "Mul"),
             "AWQ input scales folded into the norm weight feeding the INT4 projections", wanted=_method_awq),
    PassSpec("int4_projections", _projections, ALL_MODULES, ("", "MatMul"),
             "MatMul(x, W) -> MatMul(x, DQ(W int4, scale [K/128, N], axis 0, block 128)) (INT4 weight-only)",
             wanted=lambda q: None if q.weights == "int4" else f"quantization.weights is {q.weights!r}",
             provides=(("weights", "int4"),)),
    PassSpec("int4_experts", _experts, ALL_MODULES, ("qcn", "MoE"),
             "qcn::MoE float -> weight_format int4 (INT4 g128 experts and shared expert)",
             wanted=lambda q: None if q.experts == "int4" else f"quantization.experts is {q.experts!r}",
             provides=(("experts", "int4"),)),
    PassSpec("int4_cpu_moe", lambda ctx: Int4CpuMoE(ctx.quant.int4_cpu_accuracy_level, add=_adder(ctx)),
             ("onnxruntime",), ("qcn", "MoE"),
             "qcn::MoE int4 -> com.microsoft.QMoE (routed experts read INT4 in place) + INT4 shared expert",
             wanted=lambda q: None if q.experts == "int4" else f"quantization.experts is {q.experts!r}"),
    PassSpec("int4_cpu_matmul", lambda ctx: Int4CpuMatMul(ctx.quant.int4_cpu_accuracy_level, add=_adder(ctx)),
             ("onnxruntime",), ("", "MatMul"),
             "MatMul(x, DQ(W int4)) -> com.microsoft.MatMulNBits (accuracy_level from the recipe)",
             wanted=lambda q: None if "int4" in (q.weights, q.experts) else
             f"quantization.weights is {q.weights!r} and quantization.experts is {q.experts!r}"),
)

__all__ = ["ROWS", "Int4State", "state", "make_state"]
