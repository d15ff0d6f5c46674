"""Triton kernels of qcn::CachedAttention, decode step (T = 1): split-KV flash-decoding.

Non-constexpr parameters are ordered (input pointers, int32 scalars, output pointers), the
calling convention of TensorRT's AOT plugins (``trt_plugin.py``). All tensors contiguous.

  _attn_decode_split_kernel   grid (B * KVH, S = cdiv(P, PARTITION)). Program (b, kv head,
      split s) reads cache positions [s*PARTITION, min((s+1)*PARTITION, past_len[b])) of one KV
      head once for all G = HQ / KVH query heads of its group (GQA), runs an online softmax
      and writes the partial (m, l, acc) per query head. Splits at or past past_len[b] return
      at once: no cache position >= past_len[b] is ever read (masked loads), nothing written.
  _attn_decode_reduce_kernel  grid (B * HQ,). Log-sum-exp merge of the cdiv(past_len[b],
      PARTITION) valid partials and of the new token's own (q . k_new, v_new), then acc / l.

Scores use base 2: m is max(s * scale * log2(e)); exp2 everywhere. FP8 (E4M3) caches are
dequantized as value * scale with one fp32 scale per tensor (k_scale, v_scale): k_scale folds
into the score scale, v_scale into the partial acc. KV_FP8: 0 no, 1 native e4m3 loads (sm_89+),
2 the cache read as bytes and decoded with integer ops (sm_80). Splits are aligned to absolute positions,
so a sequence's result does not depend on the other sequences of the batch or on P.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton 3.9 interpreter defects, worked around only under TRITON_INTERPRET=1 (see
# moe/kernels.py): bf16 tl.dot operands are widened to fp32 (exact, same arithmetic
# as a bf16 MMA with fp32 accumulation) and fp32 -> bf16 casts are rounded to nearest even.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(v, DT: tl.constexpr):
    if _INTERPRET and DT == tl.bfloat16:
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _e4m3_to_f32(b):
    """float8_e4m3fn bits (uint8) -> fp32 with integer ops (no e4m3 type below sm_89): the 7
    magnitude bits shifted into an fp16 give value * 2^-8. NaN is not decoded."""
    h = b.to(tl.uint16)
    h = ((h & 0x80) << 8) | ((h & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _load_kv(ptrs, mask, KV_FP8: tl.constexpr):
    if KV_FP8 == 2:
        return _e4m3_to_f32(tl.load(ptrs, mask=mask, other=0))
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _attn_decode_split_kernel(q_ptr, k_ptr, v_ptr, past_len_ptr, k_scale_ptr, v_scale_ptr,
                              P,
                              m_ptr, l_ptr, acc_ptr,
                              HQ: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, SM_SCALE: tl.constexpr,
                              KV_FP8: tl.constexpr, DOT_F32: tl.constexpr, G_PAD: tl.constexpr,
                              D_PAD: tl.constexpr, PARTITION: tl.constexpr, BLOCK_N: tl.constexpr):
    """q [B, HQ, D]; past_key/past_value [B, KVH, P, D]; past_len [B] int64;
    -> m, l [B, HQ, S] fp32, acc [B, HQ, S, D] fp32 (entries of valid splits only)."""
    G: tl.constexpr = HQ // KVH
    pid = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    b = pid // KVH
    kvh = pid % KVH
    seq_len = tl.minimum(tl.load(past_len_ptr + b), P).to(tl.int32)
    start = s * PARTITION
    if start < seq_len:
        end = tl.minimum(start + PARTITION, seq_len)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        g_mask = offs_g < G
        d_mask = offs_d < D
        heads = (b * HQ + kvh * G + offs_g).to(tl.int64)
        q = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        qk_scale = SM_SCALE * _LOG2E
        if KV_FP8:
            qk_scale = qk_scale * tl.load(k_scale_ptr).to(tl.float32)
        kv_base = (b * KVH + kvh).to(tl.int64) * P * D
        m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            kv_off = kv_base + offs_n.to(tl.int64) * D
            kb = _load_kv(k_ptr + kv_off[:, None] + offs_d[None, :], n_mask[:, None] & d_mask[None, :], KV_FP8)
            qk = _dot(q, tl.trans(kb.to(q.dtype)), tl.zeros([G_PAD, BLOCK_N], dtype=tl.float32), DOT_F32) * qk_scale
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every block has a valid key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_kv(v_ptr + kv_off[:, None] + offs_d[None, :], n_mask[:, None] & d_mask[None, :], KV_FP8)
            acc = _dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], DOT_F32)
            m_i = m_new
        if KV_FP8:
            acc = acc * tl.load(v_scale_ptr).to(tl.float32)
        part = heads * S + s
        tl.store(m_ptr + part, m_i, mask=g_mask)
        tl.store(l_ptr + part, l_i, mask=g_mask)
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _attn_decode_reduce_kernel(q_ptr, k_new_ptr, v_new_ptr, past_len_ptr, m_ptr, l_ptr, acc_ptr,
                               P, S,
                               out_ptr,
                               HQ: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, SM_SCALE: tl.constexpr,
                               D_PAD: tl.constexpr, PARTITION: tl.constexpr, BLOCK_S: tl.constexpr):
    """q [B, HQ, D], k_new/v_new [B, KVH, D], partials from the split kernel -> out [B, HQ, D]."""
    G: tl.constexpr = HQ // KVH
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    kvh = h // G
    seq_len = tl.minimum(tl.load(past_len_ptr + b), P).to(tl.int32)
    n_valid = (seq_len + PARTITION - 1) // PARTITION
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    row = pid.to(tl.int64)  # == b * HQ + h
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), axis=0)
    l_run = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), axis=0)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for s0 in range(0, n_valid, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < n_valid
        part = row * S + offs_s
        m_s = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
        l_s = tl.load(l_ptr + part, mask=s_mask, other=0.0)
        a_s = tl.load(acc_ptr + part[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))  # finite: split s0 is valid
        w = tl.exp2(m_s - m_new)
        alpha = tl.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * a_s, axis=0)
        m_run = m_new
    qv = tl.load(q_ptr + row * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    kv_row = (b * KVH + kvh).to(tl.int64) * D
    kn = tl.load(k_new_ptr + kv_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    vn = tl.load(v_new_ptr + kv_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    s_new = tl.sum(qv * kn, axis=0) * (SM_SCALE * _LOG2E)
    m_new = tl.maximum(m_run, s_new)
    alpha = tl.exp2(m_run - m_new)
    w_new = tl.exp2(s_new - m_new)
    l_run = l_run * alpha + w_new
    acc = acc * alpha + w_new * vn
    o = acc / l_run
    tl.store(out_ptr + row * D + offs_d, _cast(o, out_ptr.dtype.element_ty), mask=d_mask)
