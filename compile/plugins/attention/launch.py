"""Launcher and public function of the qcn::CachedAttention decode kernels (T = 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import kernels as K


def _empty(shape, *, device, dtype):
    """Allocation of outputs and scratch (tests replace it to poison buffers)."""
    return torch.empty(shape, device=device, dtype=dtype)

__all__ = ["DecodeAttentionConfig", "cached_attention_decode", "decode_num_splits"]


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """partition: cache positions per split program (a multiple of block_n). 256 gives
    1024 splits per KV head at 256K context; block_s: partials merged per reduce step."""

    partition: int = 256
    block_n: int = 32
    block_s: int = 64
    num_warps: int = 4
    num_stages: int = 2
    reduce_num_warps: int = 4
    # fp8 cache decoded from raw bytes with integer ops instead of the native e4m3 type;
    # None = automatic (software below sm_89, where Triton has no e4m3 type).
    fp8_software: bool | None = None


def decode_num_splits(p: int, config: DecodeAttentionConfig | None = None) -> int:
    """S = cdiv(P, partition): grid dim 1 of the split kernel and dim 2 of the partials."""
    cfg = config or DecodeAttentionConfig()
    return triton.cdiv(p, cfg.partition)


def cached_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_len: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    config: DecodeAttentionConfig | None = None,
) -> torch.Tensor:
    """qcn::CachedAttention for one new token per sequence (flash-decoding, split-KV + reduce).

    Args:
        q: [B, 1, Hq, D] (after q_norm and RoPE), bf16/fp16/fp32.
        k, v: [B, 1, KVH, D] the new token's key/value (after k_norm and RoPE), q.dtype.
        past_key, past_value: [B, KVH, P, D], the runtime-owned cache (q.dtype, fp32, or
            float8_e4m3fn with k_scale / v_scale: fp32 tensors of one element, value = fp8 * scale).
        past_len: [B] int64; cache positions >= past_len[b] are never read.
        softmax_scale: default D ** -0.5.
    Returns:
        out [B, 1, Hq, D] in q.dtype (``out`` if given; every element written).
    Attends to cache positions j < past_len[b] and to the new token; GQA head h reads KV head
    h // (Hq / KVH). Two launches: the split kernel (grid B*KVH x cdiv(P, partition)) and the
    reduce kernel (grid B*Hq); scratch: 2 * B*Hq*S + B*Hq*S*D fp32.
    """
    cfg = config or DecodeAttentionConfig()
    bsz, t, hq, d = q.shape
    _, kvh, p, _ = past_key.shape
    if t != 1:
        raise ValueError(f"decode kernel takes T == 1, got T={t}")
    if k.shape != (bsz, 1, kvh, d) or v.shape != k.shape:
        raise ValueError(f"k/v must be [B,1,KVH,D]={(bsz, 1, kvh, d)}, got {tuple(k.shape)} / {tuple(v.shape)}")
    if past_value.shape != past_key.shape or past_key.shape[0] != bsz or past_key.shape[3] != d:
        raise ValueError(f"past_key/past_value must be [B,KVH,P,D], "
                         f"got {tuple(past_key.shape)} / {tuple(past_value.shape)}")
    if hq % kvh:
        raise ValueError(f"Hq={hq} must be a multiple of KVH={kvh}")
    if past_len.shape != (bsz,):
        raise ValueError(f"past_len must be [B]={bsz}, got {tuple(past_len.shape)}")
    if cfg.partition % cfg.block_n:
        raise ValueError("partition must be a multiple of block_n")
    kv_fp8 = past_key.dtype == torch.float8_e4m3fn
    if kv_fp8 and (k_scale is None or v_scale is None or past_value.dtype != past_key.dtype):
        raise ValueError("an fp8 cache needs k_scale and v_scale (fp32, one element each)")
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(q.shape)} {q.dtype} like q, got {tuple(out.shape)} {out.dtype}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    if bsz == 0:
        return out
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    past_key, past_value = past_key.contiguous(), past_value.contiguous()
    past_len = past_len.to(torch.int64).contiguous()
    kv_mode = 0
    if kv_fp8:
        k_scale = k_scale.reshape(1).to(torch.float32)
        v_scale = v_scale.reshape(1).to(torch.float32)
        soft = cfg.fp8_software
        if soft is None:
            soft = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 9)
        kv_mode = 2 if soft else 1
        if soft:
            past_key, past_value = past_key.view(torch.uint8), past_value.view(torch.uint8)
    else:
        k_scale = v_scale = None
    dot_f32 = q.dtype == torch.float32 or (past_key.dtype == torch.float32)
    d_pad = triton.next_power_of_2(d)
    s = decode_num_splits(p, cfg)
    m = _empty((bsz, hq, s), device=q.device, dtype=torch.float32)
    l = _empty(m.shape, device=m.device, dtype=m.dtype)
    acc = _empty((bsz, hq, s, d), device=q.device, dtype=torch.float32)
    common = dict(HQ=hq, KVH=kvh, D=d, SM_SCALE=scale, D_PAD=d_pad, PARTITION=cfg.partition)
    if s > 0:
        K._attn_decode_split_kernel[(bsz * kvh, s)](
            q, past_key, past_value, past_len, k_scale, v_scale, p, m, l, acc,
            KV_FP8=kv_mode, DOT_F32=dot_f32, G_PAD=max(16, triton.next_power_of_2(hq // kvh)),
            BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    K._attn_decode_reduce_kernel[(bsz * hq,)](
        q, k, v, past_len, m, l, acc, p, s, out,
        BLOCK_S=cfg.block_s, num_warps=cfg.reduce_num_warps, **common)
    return out
