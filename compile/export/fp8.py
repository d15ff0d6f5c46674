"""The official FP8 release exported as it is: FP8 bytes kept, block scales re-expressed.

Qwen ships Qwen3-Coder-Next-FP8 with float8_e4m3fn linear weights and a `weight_scale_inv`
per 128 x 128 block of each [out, in] weight. For a recipe that asks for FP8 weights
(`quantization.weights: fp8` for the projections, `quantization.experts: fp8` for the routed
experts) the export keeps those bytes and emits, for each kept projection (contract 2 of the
quantization work, docs/QUANTIZATION.md):

    W      float8e4m3fn [K, N]        the checkpoint's bytes, transposed to [in, out]
    W_scale float32 [ceil(K/b), N]    scale_inv[n // b, k // b] for the 1 x b block (n, k // b)
    W_dq = DequantizeLinear(W, W_scale, axis=0, block_size=b)   -> MatMul(x, W_dq)

(b = the checkpoint's block along `in`, 128 for the release; output_dtype = the activation
dtype when that is not fp32). Repeating each 128 x 128 block's scale over its 128 rows is
exact, so `W_dq` equals the dequantize-on-load weight of a `weights: none` export bit for bit,
in fp32. The quantization pass then only adds activation Q/DQ in front of such a MatMul.

This module decides which weights stay FP8 (`kept_fp8`) and rewrites a traced graph
(`emit_fp8`); the bytes and scales come from the weight map (weights.WeightSpec.fp8_chunks /
fp8_scale), streamed by the export's InitializerSource like every other weight.
"""

from __future__ import annotations

import logging
from typing import Callable

import onnx_ir as ir

from .weights import WeightSpec, is_fp8_in

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale"  # initializer "<weight>_scale" holds the fp32 block scale of "<weight>"
DQ_SUFFIX = "_dq"
_IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


MOE_BLOCK = 128  # qcn::MoE "fp8" block scales are 1 x 128 along K (docs/OPS.md)


def fp8_roles(weights: str, experts: str) -> frozenset[str]:
    """The weight-map roles (weights.FP8_ROLES) a recipe's quantization keeps in FP8 when the
    checkpoint stores them so: `weights: fp8` the projections and the shared experts,
    `experts: fp8` the routed experts."""
    roles = set()
    if weights == "fp8":
        roles |= {"projection", "shared_expert"}
    if experts == "fp8":
        roles.add("expert")
    return frozenset(roles)


def _moe_fp8_format() -> bool:
    from ..plugins.moe import op as moe_op

    return "fp8" in moe_op.WEIGHT_FORMATS


def kept_fp8(specs: list[WeightSpec], checkpoint, roles: frozenset[str]) -> dict[str, WeightSpec]:
    """The specs, by name, whose FP8 checkpoint bytes the export keeps. A MoE layer's weights
    are kept only all together (routed and shared: qcn::MoE has one weight format per node),
    with qcn::MoE's "fp8" format and a checkpoint block of 128 along K; otherwise that layer's
    experts are dequantized as with `none` (logged)."""
    kept = {s.name: s for s in specs if s.fp8 in roles and is_fp8_in(s, checkpoint)}
    moe: dict[str, list[str]] = {}
    for s in specs:
        if s.fp8 in ("expert", "shared_expert"):
            moe.setdefault(s.name.rsplit(".", 1)[0], []).append(s.name)
    for layer, names in moe.items():
        have = [n for n in names if n in kept]
        if not have:
            continue
        why = None
        if len(have) != len(names):
            why = (f"only {sorted(have)} of its experts are FP8 for this recipe (quantization.experts and "
                   "quantization.weights must both be fp8 to keep a MoE layer's FP8 bytes)")
        elif not _moe_fp8_format():
            why = "qcn::MoE has no fp8 weight format in this qcn"
        elif checkpoint.block_size[1] != MOE_BLOCK:
            why = f"the checkpoint's block along K is {checkpoint.block_size[1]}, qcn::MoE's fp8 blocks are {MOE_BLOCK}"
        if why:
            log.info("%s: MoE weights dequantized: %s", layer, why)
            for n in have:
                del kept[n]
    if kept:
        log.info("keeping %d FP8 weights of the checkpoint as FP8 (%s)", len(kept), ", ".join(sorted(roles)))
    return kept


def initializer_names(kept: dict[str, WeightSpec]) -> dict[str, tuple[WeightSpec, str]]:
    """Initializer name -> (spec, "weight" | "scale") of the kept weights."""
    out = {}
    for name, spec in kept.items():
        out[name] = (spec, "weight")
        out[name + SCALE_SUFFIX] = (spec, "scale")
    return out


def emit_fp8(model: ir.Model, kept: dict[str, WeightSpec], block: int, activation_dtype: str, opset: int,
             attach: Callable[[ir.Value], None]) -> int:
    """Replace each kept projection's float initializer by DequantizeLinear(FP8 W, scale);
    returns how many were replaced. `attach(value)` gives a new initializer its data
    (the export's InitializerSource.attach_value). Every use must be a MatMul's weight input (what the
    quantization pass and TensorRT's FP8 GEMMs expect); anything else is a ValueError."""
    graph = model.graph
    act = _IR_DTYPES[activation_dtype]
    if act != ir.DataType.FLOAT and opset < 23:
        raise ValueError(f"FP8 weights with activation dtype {activation_dtype} need opset >= 23 "
                         f"(DequantizeLinear output_dtype), got {opset}")
    first = next(iter(graph), None)
    done = 0
    for name, spec in kept.items():
        if spec.fp8 != "projection":
            continue  # experts: emit_fp8_moe
        old = graph.initializers.get(name)
        if old is None:
            continue
        bad = [(u.node.op_type, u.idx) for u in old.uses() if (u.node.op_type, u.node.domain, u.idx) != ("MatMul", "", 1)]
        if bad:
            raise ValueError(f"weight {name}: FP8 kept weights must feed MatMul's weight input only; used by {bad}")
        K, N = spec.shape
        graph.initializers.pop(name)
        old.name = f"{name}.float"  # the float value goes away once its uses move to the DQ output
        w = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT8E4M3FN), shape=ir.Shape([K, N]))
        s = ir.Value(name=name + SCALE_SUFFIX, type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape([-(-K // block), N]))
        for v in (w, s):
            attach(v)
            graph.register_initializer(v)
        attrs = {"axis": 0, "block_size": block}
        if act != ir.DataType.FLOAT:
            attrs["output_dtype"] = int(act)
        node = ir.node("DequantizeLinear", [w, s], attributes=attrs, name=name + DQ_SUFFIX)
        node.outputs[0].name = name + DQ_SUFFIX
        node.outputs[0].type = ir.TensorType(act)
        node.outputs[0].shape = ir.Shape([K, N])
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
        old.replace_all_uses_with(node.outputs[0])
        done += 1
    return done


def emit_fp8_moe(model: ir.Model, kept: dict[str, WeightSpec], activation_dtype: str,
                 attach: Callable[[ir.Value], None]) -> int:
    """Each qcn::MoE node whose four expert weights are kept: FP8 weights (the checkpoint's
    bytes, [E, R, K] / [R, K]) plus `<input>_scale` inputs [E, R, ceil(K/128)] / [R, ceil(K/128)]
    in the activation dtype, weight_format "fp8", overload "fp8" (contract 3); returns how many."""
    from ..plugins.moe import op as moe_op

    graph = model.graph
    act = _IR_DTYPES[activation_dtype]
    done = 0
    for node in list(graph):
        if (node.domain, node.op_type) != ("qcn", "MoE"):
            continue
        slots = {n: moe_op.INPUTS.index(n) for n in moe_op.QUANTIZED}
        values = {n: node.inputs[i] for n, i in slots.items()}
        if not all(v is not None and v.name in kept for v in values.values()):
            continue
        node.resize_inputs(len(moe_op.INPUTS) + len(moe_op.SCALE_INPUTS))
        for n, i in slots.items():
            old, spec = values[n], kept[values[n].name]
            name, shape = old.name, list(spec.shape)
            if old.is_initializer():
                graph.initializers.pop(name)
            old.name = f"{name}.float"
            w = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT8E4M3FN), shape=ir.Shape(shape))
            s = ir.Value(name=name + SCALE_SUFFIX, type=ir.TensorType(act),
                         shape=ir.Shape(shape[:-1] + [-(-shape[-1] // MOE_BLOCK)]))
            for v in (w, s):
                attach(v)
                graph.register_initializer(v)
            node.replace_input_with(i, w)
            node.replace_input_with(len(moe_op.INPUTS) + moe_op.QUANTIZED.index(n), s)
        node.attributes["weight_format"] = ir.AttrString("weight_format", "fp8")
        node.overload = moe_op.overload("fp8")
        done += 1
    return done
