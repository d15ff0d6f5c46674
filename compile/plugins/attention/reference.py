"""Naive PyTorch reference of qcn::CachedAttention (docs/CONTRACT.md, "Attention boundary")."""

from __future__ import annotations

import torch

__all__ = ["cached_attention_reference"]


def cached_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_len: torch.Tensor,
    *,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    softmax_scale: float | None = None,
    compute_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """q [B,T,Hq,D], k/v [B,T,KVH,D] (new tokens), past_key/past_value [B,KVH,P,D], past_len [B]
    -> out [B,T,Hq,D] in compute_dtype.

    Key j < P is visible iff j < past_len[b]; new key t' is visible to query t iff t' <= t.
    Softmax scale D^-0.5 unless given; GQA head h reads KV head h // (Hq/KVH). An fp8 cache is
    dequantized as past * scale (k_scale / v_scale, one per tensor). Any T (the kernels: T = 1).
    compute_dtype None is the op's own precision (the qcn::cached_attention torch op's,
    transformers' eager attention): scores in q's dtype, softmax in fp32 cast back to q's dtype.
    """
    cdt = q.dtype if compute_dtype is None else compute_dtype
    bsz, t, hq, d = q.shape
    kvh, p = past_key.shape[1], past_key.shape[2]
    g = hq // kvh
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    ks = 1.0 if k_scale is None else float(k_scale)
    vs = 1.0 if v_scale is None else float(v_scale)
    out = torch.empty((bsz, t, hq, d), dtype=cdt)
    for b in range(bsz):
        n = min(int(past_len[b]), p)
        keys = torch.cat([past_key[b, :, :n].to(cdt) * ks, k[b].transpose(0, 1).to(cdt)], dim=1)  # [KVH, n+T, D]
        vals = torch.cat([past_value[b, :, :n].to(cdt) * vs, v[b].transpose(0, 1).to(cdt)], dim=1)
        keys = keys.repeat_interleave(g, dim=0)  # [Hq, n+T, D]
        vals = vals.repeat_interleave(g, dim=0)
        qs = q[b].transpose(0, 1).to(cdt)  # [Hq, T, D]
        s = qs @ keys.transpose(1, 2) * scale  # [Hq, T, n+T]
        causal = torch.ones(t, n + t, dtype=torch.bool)
        causal[:, n:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
        s = s.masked_fill(~causal, float("-inf"))
        p_ = torch.softmax(s, dim=-1) if compute_dtype is not None else \
            torch.softmax(s, dim=-1, dtype=torch.float32).to(cdt)
        out[b] = (p_ @ vals).transpose(0, 1)
    return out
