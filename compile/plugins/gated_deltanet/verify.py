"""The verify form of the GatedDeltaNet step (``qcn::GatedDeltaNetVerify``, docs/OPS.md): the
fused decode step looped over the T = N+1 tokens of a speculative verify call, in one program
per (v head j, sequence b), storing the conv and recurrent state after *every* token so the
runtime commits the state after the last accepted draft (docs/MTP.md). The input states are
not modified (a rejected draft never touches them).

kernel (``gdn_verify_kernel``) -> launcher (``launch_verify``) -> public function
(``gated_deltanet_verify``).

Per token t the program does what ``gdn_decode_kernel`` does for one token (conv over the
window ``x[t .. t+K-1]`` of ``x = [conv_state ; qkv]``, SiLU, L2 norms, gates, the delta-rule
update of the fp32 state tile held in registers across tokens, o = S^T q, gated RMSNorm) and
stores the state tile to ``recurrent_states[b, t, j]`` and its conv window
``x[t+1 .. t+K-1]`` to ``conv_states[b, t]``. T is small (2..9), so the per-token state writes
(T x the state) are the price of an exact rollback without a replay call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _gate_scalars, _rnd, _silu, check_inputs
from .decode import decode_meta

__all__ = ["gdn_verify_kernel", "launch_verify", "gated_deltanet_verify"]


@triton.jit
def _x_at(qkv_ptr, cs_ptr, bi, m, ch, mask, T, C: tl.constexpr, KC: tl.constexpr):
    """x[m] for channels ``ch`` of sequence ``bi``, x = [conv_state (KC-1) ; qkv (T)] along time."""
    in_state = m < KC - 1
    s = tl.load(cs_ptr + bi * C * (KC - 1) + ch * (KC - 1) + m, mask=mask & in_state, other=0.0)
    q = tl.load(qkv_ptr + (bi * T + (m - (KC - 1))) * C + ch, mask=mask & (m >= KC - 1), other=0.0)
    return tl.where(in_state, s.to(tl.float32), q.to(tl.float32))


@triton.jit
def _conv_token(qkv_ptr, cw_ptr, cs_ptr, css_ptr, bi, t, T, ch, mask, WRITE_STATE,
                C: tl.constexpr, KC: tl.constexpr, DT: tl.constexpr):
    """Conv + SiLU of token t for channels ``ch``; stores the conv state after t when ``WRITE_STATE``."""
    wmask = mask & ((ch * 0 + WRITE_STATE) != 0)
    acc = tl.zeros(ch.shape, dtype=tl.float32)
    for i in tl.static_range(KC):
        xi = _x_at(qkv_ptr, cs_ptr, bi, t + i, ch, mask, T, C, KC)
        acc += tl.load(cw_ptr + ch * KC + i, mask=mask, other=0.0).to(tl.float32) * xi
        if i > 0:  # the state after token t is x[t+1 .. t+KC-1]
            tl.store(css_ptr + ((bi * T + t) * C + ch) * (KC - 1) + (i - 1), xi.to(css_ptr.dtype.element_ty),
                     mask=wmask)
    return _rnd(_silu(_rnd(acc, DT)), DT)


@triton.jit(do_not_specialize=["T"])
def gdn_verify_kernel(
    qkv_ptr, z_ptr, b_ptr, a_ptr, cw_ptr, A_log_ptr, dt_bias_ptr, nw_ptr, cs_ptr, s_ptr,
    T,
    y_ptr, css_ptr, ss_ptr,
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, EPS: tl.constexpr,
):
    """Grid (Hv, B). qkv [B,T,C], z [B,T,Hv,Dv], b/a [B,T,Hv], cs [B,C,KC-1], s [B,Hv,DK,DV] fp32 (read only)
    -> y [B,T,Hv*DV], css [B,T,C,KC-1], ss [B,T,Hv,DK,DV] fp32."""
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
    m2 = mk[:, None] & mv[None, :]
    owns_qk = ((j % G) == 0).to(tl.int32)
    tile = ok[:, None] * DV + ov[None, :]
    S = tl.load(s_ptr + (bi * HV + j) * DK * DV + tile, mask=m2, other=0.0)
    for t in range(T):
        q = _conv_token(qkv_ptr, cw_ptr, cs_ptr, css_ptr, bi, t, T, hk * DK + ok, mk, owns_qk, C, KC, DT)
        k = _conv_token(qkv_ptr, cw_ptr, cs_ptr, css_ptr, bi, t, T, HK * DK + hk * DK + ok, mk, owns_qk, C, KC, DT)
        v = _conv_token(qkv_ptr, cw_ptr, cs_ptr, css_ptr, bi, t, T, 2 * HK * DK + j * DV + ov, mv, 1, C, KC, DT)
        q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * (DK ** -0.5)
        k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
        bt = (bi * T + t) * HV + j
        beta, g = _gate_scalars(b_ptr, a_ptr, A_log_ptr, dt_bias_ptr, bt, j, DT)
        S = S * tl.exp(g)
        kv = tl.sum(S * k[:, None], 0)
        S += k[:, None] * (beta * (v - kv))[None, :]
        tl.store(ss_ptr + bt * DK * DV + tile, S, mask=m2)
        o = _rnd(tl.sum(S * q[:, None], 0), DT)
        o_hat = _rnd(o * tl.rsqrt(tl.sum(o * o, 0) / DV + EPS), DT)
        zz = tl.load(z_ptr + bt * DV + ov, mask=mv, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + ov, mask=mv, other=0.0).to(tl.float32)
        y = _rnd(w * o_hat, DT) * _silu(zz)
        tl.store(y_ptr + bt * DV + ov, _rnd(y, DT).to(DT), mask=mv)


def launch_verify(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                  y, conv_states, recurrent_states, *, num_k_heads: int, norm_eps: float):
    """Launch ``gdn_verify_kernel`` on preallocated outputs."""
    B, T, C, Hk, Hv, Dk, Dv, K = check_inputs(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight,
                                               conv_state, recurrent_state, num_k_heads)
    if K < 2:
        raise ValueError("the verify kernel needs a conv kernel of size >= 2 (a conv state to keep)")
    meta = decode_meta(Hk, Hv, Dk, Dv, K, norm_eps)
    gdn_verify_kernel[(Hv, B)](qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state,
                               recurrent_state, T, y, conv_states, recurrent_states,
                               **meta["constexprs"], num_warps=meta["num_warps"], num_stages=meta["num_stages"])


def gated_deltanet_verify(
    qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor, conv_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor, conv_state: torch.Tensor,
    recurrent_state: torch.Tensor, *, num_k_heads: int, norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qcn::GatedDeltaNetVerify``: T tokens, the states after every token.

    Args:
        qkv: [B, T, C]; z: [B, T, Hv, Dv]; b, a: [B, T, Hv]; conv_weight: [C, K]; A_log: [Hv] fp32;
        dt_bias: [Hv]; norm_weight: [Dv]; conv_state: [B, C, K-1]; recurrent_state: [B, Hv, Dk, Dv] fp32.
        Neither state is modified.
    Returns:
        (y [B, T, Hv*Dv], conv_states [B, T, C, K-1], recurrent_states [B, T, Hv, Dk, Dv] fp32).
    """
    B, T, C = qkv.shape
    Hv, Dv = z.shape[2], z.shape[3]
    Dk = recurrent_state.shape[2]
    y = torch.empty(B, T, Hv * Dv, dtype=qkv.dtype, device=qkv.device)
    conv_states = torch.empty(B, T, *conv_state.shape[1:], dtype=conv_state.dtype, device=qkv.device)
    recurrent_states = torch.empty(B, T, Hv, Dk, Dv, dtype=torch.float32, device=qkv.device)
    launch_verify(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                  y, conv_states, recurrent_states, num_k_heads=num_k_heads, norm_eps=norm_eps)
    return y, conv_states, recurrent_states
