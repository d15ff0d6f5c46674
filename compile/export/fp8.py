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


def fp8_roles(weights: str, experts: str) -> frozenset[str]:
    """The weight-map roles (weights.FP8_ROLES) a recipe's quantization keeps in FP8 when the
    checkpoint stores them so. Shared experts live inside qcn::MoE, whose FP8 weight format
    comes with the MoE op (not yet here): until then they are dequantized as before."""
    roles = set()
    if weights == "fp8":
        roles.add("projection")
    if experts == "fp8":
        pass  # routed experts: qcn::MoE "fp8" format (see module docstring of compile/plugins/moe/op.py)
    return frozenset(roles)


def kept_fp8(specs: list[WeightSpec], checkpoint, roles: frozenset[str]) -> dict[str, WeightSpec]:
    """The specs, by name, whose FP8 checkpoint bytes the export keeps."""
    kept = {s.name: s for s in specs if s.fp8 in roles and is_fp8_in(s, checkpoint)}
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
        if spec.stacked:
            raise ValueError(f"weight {name}: stacked (expert) FP8 weights go into qcn::MoE, not DequantizeLinear")
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
