"""Pass ``lower_cached_attention``: ``qcn::CachedAttention`` at T == 1 -> the two decode plugins
of ``plugins/attention/trt_plugin.py`` (namespace ``qcn_attn``; full TensorRT >= 10.9 only):

  decode_split_<cache>(q, past_key, past_value, past_len[, k_scale, v_scale]) -> m, l, acc  (fp32 partials)
  decode_reduce(q, k, v, past_len, m, l, acc)             -> out

(<cache> = the activation dtype, or fp8 for a node reading FP8 caches -- overload "fp8", with
the k_scale / v_scale inputs the kv_fp8 pass gives it, the kernel's convention: value = fp8 *
scale, fp32 [1] each.)
Head counts, head dim, softmax scale, activation and cache dtype are fixed at registration:
the pass returns them as its config.

Refused (node left alone; the parser inlines its function body) when T is not the static
value 1 -- the kernels are decode-only, so in the one engine built from ``prefill.onnx``
(T dynamic) every attention node is refused today -- or when Hq/KVH/D are not static, Hq %
KVH != 0, dtypes are not bf16/fp16/fp32 activations with an int64 past_len, or the cache
dtype is neither q's nor float8e4m3fn with fp32 scales. NOT EXECUTED: no full TensorRT here; checked only against a stub of
``tensorrt.plugin`` (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

import onnx_ir as ir

from .base import ACT_DTYPES, QcnRule, attr, dims, plugin_op, refuse

PLUGIN_NAMESPACE = "qcn_attn"


class LowerCachedAttention(QcnRule):
    pass_name = "lower_cached_attention"
    root_op = "CachedAttention"

    def pattern(self, op, q, k, v, past_key, past_value, past_len):
        return op.CachedAttention(q, k, v, past_key, past_value, past_len, _domain="qcn", _allow_other_inputs=True)

    def check_node(self, context, q, k, v, past_key, past_value, past_len):
        qs = dims(q, 4, "q", (2, 3))
        if not isinstance(qs, tuple):
            return qs
        if qs[1] != 1:
            return refuse(f"T={q.shape[1]} (q axis 1): the attention plugins implement decode (T == 1) only")
        ks, pks = dims(k, 4, "k", (2,)), dims(past_key, 4, "past_key", (1, 3))
        for s in (ks, pks):
            if not isinstance(s, tuple):
                return s
        hq, d, kvh = qs[2], qs[3], ks[2]
        if kvh <= 0 or hq % kvh or pks[1] != kvh or pks[3] != d:
            return refuse(f"heads/head dim do not fit: Hq={hq}, KVH={kvh}, past_key {list(pks)}, D={d}")
        act = q.dtype
        if act not in ACT_DTYPES:
            return refuse(f"activation dtype {act} is not bf16/fp16/fp32")
        if k.dtype != act or v.dtype != act:
            return refuse("k/v dtypes differ from q's")
        scales = list(context.root.inputs[6:])
        if past_key.dtype == past_value.dtype == ir.DataType.FLOAT8E4M3FN:
            if len(scales) != 2 or any(s is None or s.dtype != ir.DataType.FLOAT for s in scales):
                return refuse("an fp8 cache needs the k_scale and v_scale inputs (fp32 [1])")
        elif past_key.dtype != act or past_value.dtype != act:
            return refuse(f"cache dtype {past_key.dtype}/{past_value.dtype} is neither q's {act} nor float8e4m3fn")
        elif scales:
            return refuse(f"{len(scales)} scale inputs on a {act} cache")
        if past_len.dtype != ir.DataType.INT64:
            return refuse(f"past_len must be int64, got {past_len.dtype}")
        scale = attr(context.root, "scale")
        if scale is None:
            return refuse("no scale attribute")
        cache = "fp8" if past_key.dtype == ir.DataType.FLOAT8E4M3FN else ACT_DTYPES[act]
        return {"num_heads": hq, "num_kv_heads": kvh, "head_dim": d, "act": ACT_DTYPES[act],
                "softmax_scale": float(scale), "cache": cache}

    def rewrite(self, op, q, k, v, past_key, past_value, past_len):
        fp8 = self.config["cache"] == "fp8"
        split = f"decode_split_{self.config['cache']}"
        scales = list(self._root.inputs[6:8]) if fp8 else []
        m, l_, acc = plugin_op(op, split, PLUGIN_NAMESPACE, [q, past_key, past_value, past_len, *scales], outputs=3)
        out = plugin_op(op, "decode_reduce", PLUGIN_NAMESPACE, [q, k, v, past_len, m, l_, acc])
        return self.count_rewrite(op, out, {f"{PLUGIN_NAMESPACE}::{split}", f"{PLUGIN_NAMESPACE}::decode_reduce"})
