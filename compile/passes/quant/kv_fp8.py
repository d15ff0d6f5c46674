"""FP8 KV cache (`quantization.kv_cache: fp8`): every attention layer's cache stored as E4M3.

One rule, rooted at ``qcn::CachedAttention(q, k, v, past_key.i, past_value.i, past_len)`` whose
caches are graph inputs in the activation dtype. For layer i it

- calibrates the layer's new keys and values (graph outputs ``new_key.i`` / ``new_value.i`` of
  the prefill graph as it is when this pass runs, i.e. with the quantized weights: what the
  cache will hold) and sets ``k_scale = range(new_key.i) / 448`` (E4M3's largest finite value;
  ``range`` is the recipe's calibration method, max by default), ``v_scale`` likewise;
- retypes the graph inputs ``past_key.i`` / ``past_value.i`` to float8e4m3fn and feeds the op
  the scales (fp32 [1], inputs 6 and 7: cache value = fp8 * scale, the decode kernel's
  convention); the node calls the op's fp8 body (function overload "fp8",
  op.function_proto(opset, fp8_cache=True), added to the model once);
- quantizes the graph outputs: ``new_key.i`` = QuantizeLinear(k_new, k_scale, output_dtype
  float8e4m3fn, saturate), so the new tokens leave the graph as the FP8 bytes the runtime
  appends to its cache (half the bytes of a bf16 cache, a quarter of fp32's). Inside the op the
  new tokens attend to each other in the activation dtype, as in the GPU kernel.

A pass, not an export option: the scales come from running the unquantized-KV graph on the
calibration text (contract 4), and the export stays the reference the accuracy gate compares
against. An FP8 cache is every attention layer or none (what the recipe asked, and what the
budget table counted): a candidate layer that cannot be converted (no calibrated range, no ``new_key.i`` output) is a
PassError naming it, not a refusal. Not candidates (never rewritten): a CachedAttention whose
caches are not graph inputs, or whose cache is already FP8 (8 inputs: the pattern has 6).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from ...plugins.attention.op import FP8_OVERLOAD, function_proto
from ..base import ContextRule, PassError, attr, refuse
from ..plan import ALL_MODULES, PassSpec
from .fp8 import FP8_MAX

PASS = "kv_fp8"
FP8 = ir.DataType.FLOAT8E4M3FN
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
KINDS = (("past_key", "new_key", "k_scale"), ("past_value", "new_value", "v_scale"))


def layer_of(value: ir.Value, prefix: str) -> str | None:
    """"3" for the graph input ``past_key.3`` (docs/CONTRACT.md state names), else None."""
    name = value.name or ""
    if not value.is_graph_input() or not name.startswith(prefix + "."):
        return None
    return name[len(prefix) + 1:]


def range_key(output: str) -> str:
    """The calibration key of a new-K/V graph output (shared by the prefill and decode graphs)."""
    return f"kv_cache:{output}"


def _graph_output(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((o for o in graph.outputs if o.name == name), None)


class KvFp8(ContextRule):
    root_domain, root_op = "qcn", "CachedAttention"
    graph_only = True

    pass_name = PASS

    def pattern(self, op, q, k, v, past_key, past_value, past_len):
        return op.CachedAttention(q, k, v, past_key, past_value, past_len, _domain="qcn")

    def candidate(self, context, past_key, past_value, **_) -> bool:
        return layer_of(past_key, "past_key") is not None and layer_of(past_value, "past_value") is not None

    def check_node(self, context, q, past_key, past_value, **_):
        i = layer_of(past_key, "past_key")
        if layer_of(past_value, "past_value") != i:
            return self._fail(i, f"past_key {past_key.name!r} and past_value {past_value.name!r} are different layers")
        for cache in (past_key, past_value):
            if cache.dtype != q.dtype or cache.dtype not in FLOATS:
                return self._fail(i, f"cache {cache.name!r} is {cache.dtype}, q is {q.dtype} (need the activation dtype)")
            if len(cache.uses()) != 1:
                return self._fail(i, f"cache {cache.name!r} has {len(cache.uses())} uses (need only this node)")
        graph = context.model.graph
        for _, out, _ in KINDS:
            o = _graph_output(graph, f"{out}.{i}")
            if o is None or o.dtype != q.dtype:
                return self._fail(i, f"no graph output {out}.{i} in the activation dtype (the new K/V of the layer)")
            rng = self.ctx.ranges.get(range_key(o.name))
            if rng is None:
                return self._fail(i, f"no calibrated range for {o.name}")
            amax = rng.value(self.ctx.quant.calibration)
            if not (math.isfinite(amax) and amax > 0):
                return self._fail(i, f"calibrated |x| range of {o.name} is {amax} (need finite > 0)")
        if attr(context.root, "scale") is None:
            return refuse("no scale attribute")
        self.model = context.model
        return {}

    def _fail(self, layer, why: str):
        raise PassError(f"{PASS}: layer {layer} cannot have an FP8 KV cache: {why} (an FP8 cache is every "
                        "attention layer or none)")

    def rewrite(self, op, q, k, v, past_key, past_value, past_len, **_):
        graph, cal = self.model.graph, self.ctx.quant.calibration
        i = layer_of(past_key, "past_key")
        scales = []
        for (_, out, sname), cache in zip(KINDS, (past_key, past_value)):
            o = _graph_output(graph, f"{out}.{i}")
            s = self.ctx.ranges[range_key(o.name)].value(cal) / FP8_MAX
            scales.append(self.ctx.weights.add(op, f"kv_cache.{i}.{sname}", torch.tensor([s], dtype=torch.float32)))
            _quantize_output(graph, o, s)
            cache.dtype = FP8
        _install_fp8_body(self.model)
        out = op.CachedAttention(q, k, v, past_key, past_value, past_len, *scales, _domain="qcn",
                                 scale=attr(self._root, "scale"))
        out.producer().overload = FP8_OVERLOAD
        return self.count_rewrite(op, out, set())


def _quantize_output(graph: ir.Graph, o: ir.Value, scale: float) -> None:
    """Graph output ``o`` (activation dtype) -> QuantizeLinear(o, scale) under the same name, FP8
    (fp32 scalar scale: the division is in fp32 whatever the activation dtype; saturating)."""
    name = o.name
    s = ir.Value(name=f"{name}.scale", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                 const_value=ir.tensor(np.float32(scale), name=f"{name}.scale"))
    graph.register_initializer(s)
    node = ir.node("QuantizeLinear", [o, s], attributes={"output_dtype": int(FP8), "saturate": 1}, name=f"{name}.quantize")
    q = node.outputs[0]
    q.dtype, q.shape = FP8, o.shape
    graph.insert_after(o.producer(), node)
    idx = list(graph.outputs).index(o)
    o.name = f"{name}.act"
    q.name = name
    graph.outputs[idx] = q


def _install_fp8_body(model: ir.Model) -> None:
    """The op's fp8 body (overload "fp8"), once per model."""
    if ("qcn", "CachedAttention", FP8_OVERLOAD) not in model.functions:
        fn = ir.serde.deserialize_function(function_proto(model.opset_imports.get("", 23), fp8_cache=True))
        model.functions[fn.identifier()] = fn


def calibration_targets(model: ir.Model) -> dict[str, str]:
    """{range key: new_key.i / new_value.i} of every layer this rule will rewrite."""
    out = {}
    for node in model.graph:
        if (node.domain, node.op_type) != ("qcn", "CachedAttention") or len(node.inputs) != 6:
            continue
        i = layer_of(node.inputs[3], "past_key")
        if i is None:
            continue
        for _, name, _ in KINDS:
            if _graph_output(model.graph, f"{name}.{i}") is not None:
                out[range_key(f"{name}.{i}")] = f"{name}.{i}"
    return out


SPEC = PassSpec(
    PASS, KvFp8, ALL_MODULES, ("qcn", "CachedAttention"),
    "KV cache -> FP8 E4M3: per-layer calibrated k/v scales, caches and new K/V graph outputs float8e4m3fn",
    wanted=lambda q: None if q.kv_cache == "fp8" else f"quantization.kv_cache is {q.kv_cache!r}",
    provides=(("kv_cache", "fp8"),),
    calibrate=calibration_targets,
)
