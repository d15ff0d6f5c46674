"""TensorRT (>= 10.9, full TensorRT) plugins for the decode-attention kernels, AOT only.

UNTESTED: no full TensorRT and no GPU on this repository's machines; the embedded PTX is
produced and ptxas-checked by ``aot.py`` (tested). ``tensorrt`` is imported lazily. Uses the
generic QDP AOT registration of ``plugins/_triton.py`` (register / autotune / aot_impl;
kernel parameters: input pointers, int32 scalars, output pointers).

qcn::CachedAttention at T = 1 lowers to two plugins in namespace ``qcn_attn``:
  decode_split_<cache>(q, past_key, past_value, past_len[, k_scale, v_scale])
      -> m [B, Hq, S] f32, l [B, Hq, S] f32, acc [B, Hq, S, D] f32     S = cdiv(P, PARTITION)
  decode_reduce(q, k, v, past_len, m, l, acc) -> out [B, 1, Hq, D]
with q [B,1,Hq,D], k/v [B,1,KVH,D], past_* [B,KVH,P,D], past_len [B] int64, <cache> = bf16 |
fp8 (k_scale / v_scale: fp32 [1]). Partials of splits past past_len are never written nor
read. The reduce kernel receives S * PARTITION as its P (it only clamps past_len with it).
Head counts, head dim, softmax scale and the target cc are fixed at registration.
"""

from .._triton import register_kernel_plugin

__all__ = ["register_attention_plugins"]


def register_attention_plugins(cc: int, num_heads: int = 16, num_kv_heads: int = 2, head_dim: int = 256,
                               act: str = "bf16", caches=("bf16", "fp8"), softmax_scale=None,
                               namespace: str = "qcn_attn"):
    """Register decode_split_<cache> for each cache dtype and decode_reduce for target ``cc``."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from .aot import attention_kernel_specs

    specs = {s.name: s for s in attention_kernel_specs(num_heads, num_kv_heads, head_dim, act, tuple(caches),
                                                       softmax_scale, cc=cc)}
    part = specs[f"attn_decode_reduce_{act}"].constexprs["PARTITION"]
    f32 = trt.float32

    def splits(past_key):
        return trtp.cdiv(past_key.shape_expr[2], part)

    def split_outs(i):
        b, s = i[0].shape_expr[0], splits(i[1])
        return [trtp.from_shape_expr((b, num_heads, s), dtype=f32), trtp.from_shape_expr((b, num_heads, s), dtype=f32),
                trtp.from_shape_expr((b, num_heads, s, head_dim), dtype=f32)]

    for cache in caches:
        register_kernel_plugin(
            f"{namespace}::decode_split_{cache}", specs[f"attn_decode_split_{act}_kv{cache}"], cc, split_outs,
            lambda i: (i[0].shape_expr[0] * num_kv_heads, splits(i[1])), lambda i: (i[1].shape_expr[2],))
    register_kernel_plugin(
        f"{namespace}::decode_reduce", specs[f"attn_decode_reduce_{act}"], cc, lambda i: [i[0].like()],
        lambda i: (i[0].shape_expr[0] * num_heads, 1),
        lambda i: (i[4].shape_expr[2] * part, i[4].shape_expr[2]))
