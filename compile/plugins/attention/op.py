"""qcn::CachedAttention: causal GQA over a runtime-owned KV cache plus the new tokens.

Shapes: B batch, T new tokens, P cache length passed in, Hq query heads, KVH kv heads, D head dim.
    q [B, T, Hq, D]     after q_norm and RoPE
    k, v [B, T, KVH, D] the new tokens' keys (after k_norm and RoPE) and values
    past_key, past_value [B, KVH, P, D]  the runtime's cache; positions >= past_len[b] are ignored
    past_len [B] int64  tokens already in the cache for each sequence
    k_scale, v_scale [1] fp32  (optional; present exactly when the cache is float8e4m3fn)
 -> out [B, T, Hq, D]
Attribute: scale (softmax scale, D^-0.5 for Qwen3-Next).

FP8 cache (`quantization.kv_cache: fp8`, the kv_fp8 pass): past_key/past_value are
float8e4m3fn and cache value = fp8 * k_scale (resp. v_scale), one fp32 scale per tensor (per
layer), the decode kernel's convention (kernels.py: k_scale folds into the score scale, v_scale
into the partial acc). The new tokens' k/v stay in the activation dtype inside the op (the
graph quantizes them on their way out to the cache), as in the kernel. Cache formats are ONNX
function overloads (IR v10, as qcn::MoE's weight formats): a node reading FP8 caches has
overload "fp8" and the scale inputs, and the model carries the fp8 body
(`function_proto(opset, fp8_cache=True)`: the same body behind one DequantizeLinear of each
cache); the exported activation-dtype body is overload "".

Cache key j is visible iff j < past_len[b]; new key t' is visible to query t iff t' <= t. Query
head h reads KV head h // (Hq / KVH). Scores in the activation dtype, softmax in fp32 then back
to the activation dtype (transformers' eager_attention_forward). The op never writes the cache:
the graph returns k/v of the new tokens and the runtime appends them (docs/CONTRACT.md), so no
step copies the whole cache. Cache rows at or beyond past_len are never read (garbage or NaN there
cannot leak into the output). The decode kernel (flash-decoding) replaces this body on GPU.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import TensorProto
from onnx.defs import OpSchema

from ..onnx_function import DOMAIN, DOMAIN_VERSION, FunctionBuilder, QcnOp, register_schema
from .reference import cached_attention_reference

OP_NAME = "CachedAttention"
INPUTS = ["q", "k", "v", "past_key", "past_value", "past_len"]
FP8_INPUTS = ["k_scale", "v_scale"]  # the FP8 cache's per-tensor scales (optional inputs 6, 7)
FP8_OVERLOAD = "fp8"  # the function overload of nodes reading FP8 caches


@torch.library.custom_op("qcn::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, past_len: torch.Tensor, scale: float) -> torch.Tensor:
    """The naive reference (reference.cached_attention_reference) in the op's own precision."""
    return cached_attention_reference(q, k, v, past_key, past_value, past_len, softmax_scale=scale, compute_dtype=None)


@cached_attention.register_fake
def _(q, k, v, past_key, past_value, past_len, scale):
    return torch.empty_like(q)


def _schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        OP_NAME, DOMAIN, DOMAIN_VERSION,
        doc=__doc__,
        inputs=[P(n, "T") for n in INPUTS[:3]] + [P(n, "C") for n in INPUTS[3:5]] + [P("past_len", "I")]
        + [P(n, "S", param_option=OpSchema.FormalParameterOption.Optional) for n in FP8_INPUTS],
        outputs=[P("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("C", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(float8e4m3fn)"],
                           "cache: the activation dtype, or float8e4m3fn with k_scale / v_scale"),
                          ("I", ["tensor(int64)"], "lengths"), ("S", ["tensor(float)"], "fp8 cache scales")],
        attributes=[OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale")],
    )


register_schema(_schema())
_qcn = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _translation(q, k, v, past_key, past_value, past_len, scale: float):
    return _qcn.CachedAttention(q, k, v, past_key, past_value, past_len, scale=scale)


def function_proto(opset: int, fp8_cache: bool = False) -> onnx.FunctionProto:
    """One read of the cached K and one of V per step: scores against the cache and against the
    new keys are two MatMuls joined on the small score tensor (the caches are never concatenated
    or transposed; ORT fuses the Transpose of past_key into its MatMul as transB), and the mask is
    built on [B, T, P+T] indices. Besides the two products the cache sees one Slice copy of the V
    rows every sequence uses (ORT has no strided views) and a mask over the rows only some use.

    `fp8_cache`: the body of graphs whose caches are float8e4m3fn: each cache goes through
    DequantizeLinear(cache, scale) (fp32, exact: value = fp8 * scale) cast to the activation
    dtype, then the same body. (On CPU that is one dequantized copy of each cache per call: the
    emulation's price; the GPU kernel reads the FP8 bytes.)"""
    f = FunctionBuilder(OP_NAME, opset)
    past_key, past_value = "past_key", "past_value"
    if fp8_cache:
        past_key = f.op("CastLike", f.op("DequantizeLinear", "past_key", "k_scale"), "q")
        past_value = f.op("CastLike", f.op("DequantizeLinear", "past_value", "v_scale"), "q")
    i64 = lambda v: f.const(v, "int64")  # noqa: E731
    T = lambda t, perm: f.op("Transpose", t, perm=perm)  # noqa: E731
    sq = lambda t: f.op("Squeeze", t)  # noqa: E731

    n_new, n_cache = f.dim("q", 1), f.dim("past_key", 2)
    Hq, KVH, D = f.dim("q", 2), f.dim("k", 2), f.dim("q", 3)

    # q [B,T,Hq,D] -> [B, KVH, G*T, D]: query head h = kv * G + g, row g * T + t
    q4 = f.op("Reshape", T("q", [0, 2, 1, 3]), f.op("Concat", i64([0]), KVH, i64([-1]), D, axis=0))
    s_past = f.op("MatMul", q4, T(past_key, [0, 1, 3, 2]))  # [B, KVH, G*T, P]
    s_new = f.op("MatMul", q4, T("k", [0, 2, 3, 1]))  # [B, KVH, G*T, T]
    scores = f.op("Concat", s_past, s_new, axis=-1)  # [B, KVH, G*T, P+T]
    scores = f.op("Mul", scores, f.op("CastLike", f.attr_const("scale", onnx.AttributeProto.FLOAT), "q"))
    n_keys = f.op("Add", n_cache, n_new)
    scores = f.op("Reshape", scores, f.op("Concat", i64([0]), KVH, i64([-1]), n_new, n_keys, axis=0))  # [B,KVH,G,T,P+T]

    # visibility [B, T, P+T]
    j = f.op("Range", i64(0), sq(n_keys), i64(1))  # [P+T]
    t = f.op("Unsqueeze", f.op("Range", i64(0), sq(n_new), i64(1)), i64([1]))  # [T, 1]
    in_cache = f.op("Less", j, n_cache)  # [P+T]
    past_ok = f.op("And", in_cache, f.op("Less", j, f.op("Unsqueeze", "past_len", i64([1]))))  # [B, P+T]
    new_ok = f.op("And", f.op("Not", in_cache), f.op("LessOrEqual", f.op("Sub", j, n_cache), t))  # [T, P+T]
    visible = f.op("Or", f.op("Unsqueeze", past_ok, i64([1])), new_ok)  # [B, T, P+T]
    visible = f.op("Unsqueeze", visible, i64([1, 2]))  # [B, 1, 1, T, P+T]

    neg_inf = f.const(float("-inf"), "float32")
    masked = f.op("Where", visible, f.op("Cast", scores, to=TensorProto.FLOAT), neg_inf)
    probs = f.op("CastLike", f.op("Softmax", masked, axis=-1), "q")
    probs = f.op("Reshape", probs, f.op("Concat", i64([0]), KVH, i64([-1]), n_keys, axis=0))  # [B,KVH,G*T,P+T]
    p_past, p_new = f.op("Split", probs, f.op("Concat", n_cache, n_new, axis=0), axis=-1, outputs=2)

    # Cache rows >= past_len[b] are never read (0 * NaN would leak garbage from unused rows): the
    # product over the cache is split at lo = min(past_len) and hi = max(past_len). Rows < lo are
    # valid for every sequence (one Slice copy, no mask); rows in [lo, hi) are zeroed where
    # j >= past_len[b] (none when all sequences have one length); rows >= hi are dropped.
    lo = f.op("Min", f.op("ReduceMin", "past_len", keepdims=1), n_cache)  # [1]
    hi = f.op("Min", f.op("ReduceMax", "past_len", keepdims=1), n_cache)
    zero, last, row = i64([0]), i64([-1]), i64([2])
    ctx_head = f.op("MatMul", f.op("Slice", p_past, zero, lo, last), f.op("Slice", past_value, zero, lo, row))
    j_tail = f.op("Range", sq(lo), sq(hi), i64(1))  # [hi - lo]
    tail_ok = f.op("Unsqueeze", f.op("Less", j_tail, f.op("Unsqueeze", "past_len", i64([1]))), i64([1, 3]))
    v_tail = f.op("Where", tail_ok, f.op("Slice", past_value, lo, hi, row),
                  f.op("CastLike", f.const(0.0, "float32"), "q"))  # [B, KVH, hi-lo, D]
    ctx_tail = f.op("MatMul", f.op("Slice", p_past, lo, hi, last), v_tail)
    ctx_new = f.op("MatMul", p_new, T("v", [0, 2, 1, 3]))
    ctx = f.op("Add", f.op("Add", ctx_head, ctx_tail), ctx_new)  # [B, KVH, G*T, D]
    ctx = f.op("Reshape", ctx, f.op("Concat", i64([0]), Hq, n_new, D, axis=0))  # [B, Hq, T, D]
    f.graph_op("Transpose", [ctx], ["out"], perm=[0, 2, 1, 3])
    proto = f.build(INPUTS + FP8_INPUTS if fp8_cache else INPUTS, ["out"], ["scale"])
    if fp8_cache:
        proto.overload = FP8_OVERLOAD
    return proto


OP = QcnOp(OP_NAME, torch.ops.qcn.cached_attention.default, _schema(), _translation, function_proto)
