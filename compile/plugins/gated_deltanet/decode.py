"""Fused single-token (T = 1) GatedDeltaNet step: one Triton kernel per layer and step.

kernel (``gdn_decode_kernel``) -> launcher (``launch_decode``) -> public function
(``gated_deltanet_decode``).

One program per (v head j, sequence b) does, in one pass:
conv-state shift + depthwise conv + SiLU of its q/k (qk head j // (Hv/Hk)) and v channels,
L2 norm of q and k, gating, the delta-rule update of its fp32 state tile [Dk, Dv] (read
once, written once, in place), o = S^T q, and the gated RMSNorm w * rmsnorm(o) * silu(z).
The whole Dv row of a head stays in one program so the RMSNorm needs no second pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _gate_scalars, _rnd, _silu, check_inputs, next_pow2

__all__ = ["gdn_decode_kernel", "decode_meta", "launch_decode", "gated_deltanet_decode"]


@triton.jit
def _conv_step(qkv_ptr, cw_ptr, cs_ptr, cso_ptr, row_qkv, row_cs, ch, mask, WRITE_STATE,
               C: tl.constexpr, KC: tl.constexpr, DT: tl.constexpr):
    """Depthwise causal conv of one new token over [conv_state ; x] for channels ``ch``, + SiLU.

    Also shifts the conv state by one token into ``cso_ptr`` when ``WRITE_STATE`` (int) is non-zero.
    """
    wmask = mask & ((ch * 0 + WRITE_STATE) != 0)
    x = tl.load(qkv_ptr + row_qkv + ch, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(cw_ptr + ch * KC + (KC - 1), mask=mask, other=0.0).to(tl.float32) * x
    for i in tl.static_range(KC - 1):
        s = tl.load(cs_ptr + row_cs + ch * (KC - 1) + i, mask=mask, other=0.0)
        acc += tl.load(cw_ptr + ch * KC + i, mask=mask, other=0.0).to(tl.float32) * s.to(tl.float32)
        if i > 0:
            tl.store(cso_ptr + row_cs + ch * (KC - 1) + (i - 1), s, mask=wmask)
    if KC > 1:
        tl.store(cso_ptr + row_cs + ch * (KC - 1) + (KC - 2), x.to(cso_ptr.dtype.element_ty),
                 mask=wmask)
    return _rnd(_silu(_rnd(acc, DT)), DT)


@triton.jit(do_not_specialize=["T"])
def gdn_decode_kernel(
    # inputs (docs/OPS.md order)
    qkv_ptr, z_ptr, b_ptr, a_ptr, cw_ptr, A_log_ptr, dt_bias_ptr, nw_ptr, cs_ptr, s_ptr,
    # runtime scalars (same ABI as the prefill kernel; T must be 1 here)
    T,
    # outputs
    y_ptr, cso_ptr, so_ptr,
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, EPS: tl.constexpr,
):
    """Grid (Hv, B); T (= 1) is unused. qkv [B,1,C], z [B,1,Hv,Dv], b/a [B,1,Hv], cs/cso [B,C,KC-1] (cso must not
    alias cs), s/so [B,Hv,DK,DV] fp32 (so may alias s: each program owns its tile), y [B,1,Hv*DV]."""
    j = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    C: tl.constexpr = 2 * HK * DK + HV * DV
    G: tl.constexpr = HV // HK
    DT: tl.constexpr = y_ptr.dtype.element_ty
    hk = j // G

    ok = tl.arange(0, BK)
    ov = tl.arange(0, BV)
    mk = ok < DK
    mv = ov < DV
    row_qkv = bi * C
    row_cs = bi * C * (KC - 1)

    owns_qk = ((j % G) == 0).to(tl.int32)  # one program per qk head writes the q/k conv state
    q = _conv_step(qkv_ptr, cw_ptr, cs_ptr, cso_ptr, row_qkv, row_cs, hk * DK + ok, mk, owns_qk, C, KC, DT)
    k = _conv_step(qkv_ptr, cw_ptr, cs_ptr, cso_ptr, row_qkv, row_cs, HK * DK + hk * DK + ok, mk, owns_qk,
                   C, KC, DT)
    v = _conv_step(qkv_ptr, cw_ptr, cs_ptr, cso_ptr, row_qkv, row_cs, 2 * HK * DK + j * DV + ov, mv, 1,
                   C, KC, DT)

    q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * (DK ** -0.5)
    k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    beta, g = _gate_scalars(b_ptr, a_ptr, A_log_ptr, dt_bias_ptr, bi * HV + j, j, DT)

    s_off = (bi * HV + j) * DK * DV + ok[:, None] * DV + ov[None, :]
    m2 = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=m2, other=0.0) * tl.exp(g)
    kv = tl.sum(S * k[:, None], 0)
    delta = beta * (v - kv)
    S += k[:, None] * delta[None, :]
    tl.store(so_ptr + s_off, S, mask=m2)
    o = _rnd(tl.sum(S * q[:, None], 0), DT)

    # gated RMSNorm: w * rmsnorm(o) * silu(z), rounding like transformers
    o_hat = _rnd(o * tl.rsqrt(tl.sum(o * o, 0) / DV + EPS), DT)
    zz = tl.load(z_ptr + (bi * HV + j) * DV + ov, mask=mv, other=0.0).to(tl.float32)
    w = tl.load(nw_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    y = _rnd(w * o_hat, DT) * _silu(zz)
    tl.store(y_ptr + (bi * HV + j) * DV + ov, _rnd(y, DT).to(DT), mask=mv)


def decode_meta(Hk: int, Hv: int, Dk: int, Dv: int, K: int, norm_eps: float) -> dict:
    """Constexprs and launch options of the decode kernel for one model configuration."""
    BK, BV = next_pow2(Dk), next_pow2(Dv)
    num_warps = max(4, min(16, (BK * BV) // 2048))  # <= ~64 fp32 state registers per thread
    return dict(constexprs=dict(HK=Hk, HV=Hv, DK=Dk, DV=Dv, KC=K, BK=BK, BV=BV, EPS=float(norm_eps)),
                num_warps=num_warps, num_stages=1)


def launch_decode(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                  y, conv_state_out, recurrent_state_out, *, num_k_heads: int, norm_eps: float):
    """Launch ``gdn_decode_kernel`` on preallocated outputs (no checks beyond the dims)."""
    B, T, C, Hk, Hv, Dk, Dv, K = check_inputs(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight,
                                               conv_state, recurrent_state, num_k_heads)
    if T != 1:
        raise ValueError(f"the decode kernel takes one token (qkv [B, 1, C]); got T={T}: use the prefill kernel")
    meta = decode_meta(Hk, Hv, Dk, Dv, K, norm_eps)
    gdn_decode_kernel[(Hv, B)](qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state,
                               recurrent_state, T, y, conv_state_out, recurrent_state_out,
                               **meta["constexprs"], num_warps=meta["num_warps"],
                               num_stages=meta["num_stages"])


def gated_deltanet_decode(
    qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor, conv_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor, conv_state: torch.Tensor,
    recurrent_state: torch.Tensor, *, num_k_heads: int, norm_eps: float = 1e-6,
    y: torch.Tensor | None = None, conv_state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of ``qcn::GatedDeltaNet`` (T = 1).

    Args:
        qkv: [B, 1, C] q | k | v before the conv, C = 2*Hk*Dk + Hv*Dv (bf16/fp16/fp32).
        z: [B, 1, Hv, Dv]; b, a: [B, 1, Hv]; conv_weight: [C, K]; A_log: [Hv] fp32;
        dt_bias: [Hv]; norm_weight: [Dv].
        conv_state: [B, C, K-1], not modified.
        recurrent_state: [B, Hv, Dk, Dv] fp32, **updated in place**.
        y, conv_state_out: optional preallocated outputs; conv_state_out must not alias conv_state.
    Returns:
        (y [B, 1, Hv*Dv] in qkv's dtype, conv_state_out [B, C, K-1], recurrent_state (same tensor)).
    """
    B, T, C = qkv.shape
    Hv, Dv = z.shape[2], z.shape[3]
    if y is None:
        y = torch.empty(B, T, Hv * Dv, dtype=qkv.dtype, device=qkv.device)
    if conv_state_out is None:
        conv_state_out = torch.empty_like(conv_state)
    elif conv_state_out.numel() and conv_state_out.data_ptr() == conv_state.data_ptr():
        raise ValueError("conv_state_out must not alias conv_state")
    launch_decode(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                  y, conv_state_out, recurrent_state, num_k_heads=num_k_heads, norm_eps=norm_eps)
    return y, conv_state_out, recurrent_state
