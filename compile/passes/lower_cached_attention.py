"""Pass: ``qcn::CachedAttention`` at T == 1 -> the two decode plugins of
``plugins/attention/trt_plugin.py`` (namespace ``qcn_attn``; full TensorRT >= 10.9 only):

  decode_split_<cache>(q, past_key, past_value, past_len) -> m, l, acc   (fp32 partials)
  decode_reduce(q, k, v, past_len, m, l, acc)             -> out

(<cache> = the activation dtype: the op's cache has q's dtype; the fp8-cache variant needs
k_scale/v_scale inputs that qcn::CachedAttention does not have, so it is never produced.)
Head counts, head dim, softmax scale and activation dtype are fixed at registration: the
pass returns them as its config, and the first lowered node fixes it for the graph.

Refused (node left alone; the parser inlines its function body) when T is not the static
value 1 -- the kernels are decode-only, so in the one engine built from ``prefill.onnx``
(T dynamic) every attention node is refused today -- or when Hq/KVH/D are not static, Hq %
KVH != 0, dtypes are not bf16/fp16/fp32 activations with an int64 past_len, or the cache
dtype differs from q's. NOT EXECUTED: no full TensorRT here; checked only against a stub of
``tensorrt.plugin`` (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

from onnx import TensorProto

from ._lowering import ACT_DTYPES, Check, LoweringPass, attr, plugin_node, static_dims

PLUGIN_NAMESPACE = "qcn_attn"


class LowerCachedAttention(LoweringPass):
    op_type = "CachedAttention"
    name = "lower_cached_attention"

    def check(self, node, ctx) -> Check:
        if len(node.input) != 6 or len(node.output) != 1 or not all(node.input) or not all(node.output):
            return Check.refuse("needs all 6 inputs and 1 output")
        q_i, k_i, v_i, pk_i, pv_i, pl_i = (ctx.get(n) for n in node.input)
        q = static_dims(q_i, 4, "q", (1, 2, 3))
        if isinstance(q, str):
            return Check.refuse(q if "rank" in q else f"T (q axis 1) must be the static value 1 (decode kernel "
                                                      f"only); {q}")
        if q[1] != 1:
            return Check.refuse(f"T={q[1]}: the attention plugins implement decode (T == 1) only")
        k = static_dims(k_i, 4, "k", (2,))
        pk = static_dims(pk_i, 4, "past_key", (1, 3))
        for s in (k, pk):
            if isinstance(s, str):
                return Check.refuse(s)
        hq, d, kvh = q[2], q[3], k[2]
        if kvh <= 0 or hq % kvh or pk[1] != kvh or pk[3] != d:
            return Check.refuse(f"heads/head dim do not fit: Hq={hq}, KVH={kvh}, past_key {list(pk)}, D={d}")
        act = q_i.dtype
        if act not in ACT_DTYPES:
            return Check.refuse(f"activation dtype {act} is not bf16/fp16/fp32")
        if any(t.dtype != act for t in (k_i, v_i)):
            return Check.refuse("k/v dtypes differ from q's")
        if pk_i.dtype != act or pv_i.dtype != act:
            return Check.refuse(f"cache dtype {pk_i.dtype}/{pv_i.dtype} differs from q's {act} (an fp8 cache needs "
                                "scale inputs the op does not have)")
        if pl_i.dtype != TensorProto.INT64:
            return Check.refuse("past_len must be int64")
        scale = attr(node, "scale")
        if scale is None:
            return Check.refuse("no scale attribute")
        return Check(True, config={"num_heads": hq, "num_kv_heads": kvh, "head_dim": d, "act": ACT_DTYPES[act],
                                   "softmax_scale": float(scale)})

    def rewrite(self, node, ctx, config):
        q, k, v, past_key, past_value, past_len = node.input
        base = node.name or "cached_attention"
        split = f"decode_split_{config['act']}"
        m, l_, acc = ctx.fresh(f"{base}.m"), ctx.fresh(f"{base}.l"), ctx.fresh(f"{base}.acc")
        nodes = [plugin_node(split, PLUGIN_NAMESPACE, [q, past_key, past_value, past_len], [m, l_, acc],
                             ctx.fresh(f"{base}.split")),
                 plugin_node("decode_reduce", PLUGIN_NAMESPACE, [q, k, v, past_len, m, l_, acc], [node.output[0]],
                             ctx.fresh(f"{base}.reduce"))]
        return nodes, {f"{PLUGIN_NAMESPACE}::{split}", f"{PLUGIN_NAMESPACE}::decode_reduce"}
