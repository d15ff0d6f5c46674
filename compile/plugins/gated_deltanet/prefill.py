"""Chunked (WY / UT-transform) GatedDeltaNet for T >= 1 tokens, one Triton kernel per layer call.

kernel (``gdn_prefill_kernel``) -> launcher (``launch_prefill``) -> public function
(``gated_deltanet_prefill``).

One program per (v head j, sequence b) walks the sequence in chunks of BT = 64 tokens
(the last chunk is masked, nothing is copied or padded in memory). For each chunk it
computes, on the fly from qkv and the previous conv inputs (conv_state for the first K-1
taps of the first chunk), the conv + SiLU of its q, k, v channels, the L2 norms and the
gates, then the WY form of the chunk:

    gc    = cumsum(g)                          (within the chunk)
    L     = strict_lower(diag(beta) K K^T * exp(gc_i - gc_j))
    Tm    = (I + L)^-1                         (exact blockwise inverse, log2(BT) doublings)
    U     = Tm diag(beta) V,   W S = Tm diag(beta exp(gc)) (K S)
    Vnew  = U - W S
    O     = (exp(gc) * Q) S + lower_incl(Q K^T * exp(gc_i - gc_j)) Vnew
    S     = exp(gc_last) S + (exp(gc_last - gc) * K)^T Vnew

``(I + L)^-1`` is built by block doubling: with X the inverse of the block-diagonal part of
I + L at block size s, the inverse at block size 2s is X - X E X, E the strictly-lower s x s
blocks inside each 2s block. This is block forward substitution (as stable as solving
the triangular system), expressed as 2*log2(BT) small matmuls.

The state tile [Dk, BV] of each Dv slice stays in registers across chunks. The gated
RMSNorm needs the whole Dv row: when BV >= Dv it is fused; otherwise the program writes
the (activation-rounded, exactly as transformers rounds it) core output into y and
normalises y in a second pass over its own rows after a CTA barrier.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _rnd, _silu, _softplus, check_inputs, next_pow2

__all__ = ["gdn_prefill_kernel", "prefill_meta", "launch_prefill", "gated_deltanet_prefill", "CHUNK",
           "CONFIG_FALLBACKS"]

CHUNK = 64
# prefill_meta overrides tried in order when a configuration needs more shared memory than
# the GPU has (JIT: OutOfResources; AOT: the GPU table in compile/build/targets.py)
CONFIG_FALLBACKS: tuple[dict, ...] = ({}, {"block_v": 32}, {"block_v": 16})
_chosen: dict = {}


@triton.jit
def _conv_chunk(qkv_ptr, cw_ptr, cs_ptr, base_qkv, base_cs, t, mt, ch, mc,
                C: tl.constexpr, KC: tl.constexpr, DT: tl.constexpr):
    """SiLU(depthwise causal conv) for tokens ``t`` [BT] and channels ``ch`` [BD] -> [BT, BD] fp32.

    Tap i of token t reads input token s = t - (KC-1) + i: qkv when s >= 0, else the
    conv state column KC-1+s. Rows outside the sequence are zero.
    """
    acc = tl.zeros((t.shape[0], ch.shape[0]), dtype=tl.float32)
    for i in tl.static_range(KC):
        s = t.to(tl.int64) - (KC - 1) + i
        m_x = ((s >= 0) & mt)[:, None] & mc[None, :]
        xv = tl.load(qkv_ptr + base_qkv + s[:, None] * C + ch[None, :], mask=m_x, other=0.0).to(tl.float32)
        if KC > 1:
            m_s = ((s < 0) & mt)[:, None] & mc[None, :]
            xv += tl.load(cs_ptr + base_cs + ch[None, :] * (KC - 1) + (KC - 1 + s)[:, None], mask=m_s,
                          other=0.0).to(tl.float32)
        w = tl.load(cw_ptr + ch * KC + i, mask=mc, other=0.0).to(tl.float32)
        acc += w[None, :] * xv
    return tl.where(mt[:, None], _rnd(_silu(_rnd(acc, DT)), DT), 0.0)


@triton.jit
def _conv_state_tail(qkv_ptr, cs_ptr, cso_ptr, base_qkv, base_cs, T, ch, mask,
                     C: tl.constexpr, KC: tl.constexpr):
    """conv_state_out[:, ch, i] = last K-1 entries of [conv_state ; qkv] along time."""
    for i in tl.static_range(KC - 1):
        s = (T - (KC - 1) + i) + ch.to(tl.int64) * 0  # per-channel int64 vector (masks need tensors)
        from_x = s >= 0
        xv = tl.load(qkv_ptr + base_qkv + s * C + ch, mask=mask & from_x, other=0.0)
        sv = tl.load(cs_ptr + base_cs + ch * (KC - 1) + (KC - 1 + s), mask=mask & (s < 0), other=0.0)
        val = tl.where(from_x, xv.to(cso_ptr.dtype.element_ty), sv.to(cso_ptr.dtype.element_ty))
        tl.store(cso_ptr + base_cs + ch * (KC - 1) + i, val, mask=mask)


@triton.jit
def _gated_rmsnorm_store(o, z_ptr, nw_ptr, y_ptr, row, ov, mt, mv, DV: tl.constexpr, EPS: tl.constexpr,
                         DT: tl.constexpr):
    """y[row, ov] = w * rmsnorm(o) * silu(z) for an [BT, BV] tile holding whole Dv rows."""
    o_hat = _rnd(o * tl.rsqrt(tl.sum(o * o, 1) / DV + EPS)[:, None], DT)
    m2 = mt[:, None] & mv[None, :]
    zz = tl.load(z_ptr + row[:, None] + ov[None, :], mask=m2, other=0.0).to(tl.float32)
    w = tl.load(nw_ptr + ov, mask=mv, other=0.0).to(tl.float32)
    y = _rnd(w[None, :] * o_hat, DT) * _silu(zz)
    tl.store(y_ptr + row[:, None] + ov[None, :], _rnd(y, DT).to(DT), mask=m2)


@triton.jit(do_not_specialize=["T"])  # one binary for every T (no T == 1 / T % 16 variants)
def gdn_prefill_kernel(
    # inputs (docs/OPS.md order)
    qkv_ptr, z_ptr, b_ptr, a_ptr, cw_ptr, A_log_ptr, dt_bias_ptr, nw_ptr, cs_ptr, s_ptr,
    # runtime scalars
    T,
    # outputs
    y_ptr, cso_ptr, so_ptr,
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr, EPS: tl.constexpr,
    PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """Grid (Hv, B). qkv [B,T,C], z [B,T,Hv,DV], b/a [B,T,Hv], cs/cso [B,C,KC-1] (cso must not
    alias cs), s/so [B,Hv,DK,DV] fp32 (so may alias s), y [B,T,Hv*DV]. BT power of two >= 16."""
    j = tl.program_id(0)
    bi = tl.program_id(1).to(tl.int64)
    C: tl.constexpr = 2 * HK * DK + HV * DV
    G: tl.constexpr = HV // HK
    NV: tl.constexpr = (DV + BV - 1) // BV
    LOG2_BT: tl.constexpr = BT.bit_length() - 1
    DT = y_ptr.dtype.element_ty
    hk = j // G

    base_qkv = bi * T * C
    base_cs = bi * C * (KC - 1)
    base_bt = bi * T * HV + j  # b/a element (bi, 0, j); token stride HV
    base_y = bi * T * HV * DV + j * DV  # y / z element (bi, 0, j, 0); token stride HV*DV

    ok = tl.arange(0, BK)
    mk = ok < DK
    ot = tl.arange(0, BT)
    qch = hk * DK + ok
    kch = HK * DK + hk * DK + ok

    # conv state out: the owner of each channel writes it (q/k: first v head of the group)
    if KC > 1:
        odv = tl.arange(0, BDV)
        _conv_state_tail(qkv_ptr, cs_ptr, cso_ptr, base_qkv, base_cs, T, 2 * HK * DK + j * DV + odv,
                         odv < DV, C, KC)
        if j % G == 0:
            _conv_state_tail(qkv_ptr, cs_ptr, cso_ptr, base_qkv, base_cs, T, qch, mk, C, KC)
            _conv_state_tail(qkv_ptr, cs_ptr, cso_ptr, base_qkv, base_cs, T, kch, mk, C, KC)

    strict = ot[:, None] > ot[None, :]
    incl = ot[:, None] >= ot[None, :]
    eye = tl.where(ot[:, None] == ot[None, :], 1.0, 0.0)
    neg_A = -tl.exp(tl.load(A_log_ptr + j).to(tl.float32))
    dtb = tl.load(dt_bias_ptr + j).to(tl.float32)

    for iv in range(NV):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < DV
        s_off = (bi * HV + j) * DK * DV + ok[:, None] * DV + ov[None, :]
        m_s = mk[:, None] & mv[None, :]
        S = tl.load(s_ptr + s_off, mask=m_s, other=0.0)
        for t0 in range(0, T, BT):
            t = t0 + ot
            mt = t < T
            q = _conv_chunk(qkv_ptr, cw_ptr, cs_ptr, base_qkv, base_cs, t, mt, qch, mk, C, KC, DT)
            k = _conv_chunk(qkv_ptr, cw_ptr, cs_ptr, base_qkv, base_cs, t, mt, kch, mk, C, KC, DT)
            v = _conv_chunk(qkv_ptr, cw_ptr, cs_ptr, base_qkv, base_cs, t, mt, 2 * HK * DK + j * DV + ov, mv,
                            C, KC, DT)
            q = q * (tl.rsqrt(tl.sum(q * q, 1) + 1e-6) * (DK ** -0.5))[:, None]
            k = k * tl.rsqrt(tl.sum(k * k, 1) + 1e-6)[:, None]

            tb = base_bt + t.to(tl.int64) * HV
            bb = tl.load(b_ptr + tb, mask=mt, other=0.0).to(tl.float32)
            aa = tl.load(a_ptr + tb, mask=mt, other=0.0).to(tl.float32)
            beta = tl.where(mt, _rnd(tl.sigmoid(bb), DT), 0.0)
            g = tl.where(mt, neg_A * _softplus(aa + dtb), 0.0)
            gc = tl.cumsum(g, 0)
            g_last = tl.sum(tl.where(ot == BT - 1, gc, 0.0), 0)  # padded rows carry gc forward
            decay = tl.exp(tl.where(incl, gc[:, None] - gc[None, :], 0.0))

            # Diagonal scalings are applied to the small [BT, BT] / [BT, BV] factors rather than
            # to q / k, so the only [BT, BK] matmul operands are q, k and k^T (less shared memory).
            # all matmuls reading q and k (except the final state update) first: shorter live ranges
            qS = tl.dot(q, S, input_precision=PREC)
            kS = tl.dot(k, S, input_precision=PREC)
            qk_dec = tl.dot(q, tl.trans(k), input_precision=PREC) * decay
            L = tl.where(strict, beta[:, None] * tl.dot(k, tl.trans(k), input_precision=INV_PREC) * decay, 0.0)
            Tm = eye
            for lvl in tl.static_range(LOG2_BT):
                bs = 1 << lvl
                E = tl.where((ot[:, None] // (2 * bs) == ot[None, :] // (2 * bs))
                             & (ot[:, None] // bs != ot[None, :] // bs), L, 0.0)
                Tm = Tm - tl.dot(tl.dot(Tm, E, input_precision=INV_PREC), Tm, input_precision=INV_PREC)

            # U = Tm diag(beta) V ;  W S = Tm diag(beta exp(gc)) (K S)
            u = tl.dot(Tm * beta[None, :], v, input_precision=INV_PREC)
            v_new = u - tl.dot(Tm * (beta * tl.exp(gc))[None, :], kS, input_precision=INV_PREC)
            A_qk = tl.where(incl, qk_dec, 0.0)
            o = tl.exp(gc)[:, None] * qS \
                + tl.dot(A_qk, v_new, input_precision=PREC)
            S = S * tl.exp(g_last) + tl.dot(tl.trans(k), tl.exp(g_last - gc)[:, None] * v_new,
                                            input_precision=PREC)

            o = _rnd(o, DT)
            row = base_y + t.to(tl.int64) * (HV * DV)
            if NV == 1:
                _gated_rmsnorm_store(o, z_ptr, nw_ptr, y_ptr, row, ov, mt, mv, DV, EPS, DT)
            else:
                tl.store(y_ptr + row[:, None] + ov[None, :], o.to(DT), mask=mt[:, None] & mv[None, :])
        tl.store(so_ptr + s_off, S, mask=m_s)

    if NV > 1:
        # second pass: normalise this program's own y rows (written above by the same CTA)
        tl.debug_barrier()
        odv = tl.arange(0, BDV)
        mdv = odv < DV
        for t0 in range(0, T, BT):
            t = t0 + ot
            mt = t < T
            row = base_y + t.to(tl.int64) * (HV * DV)
            o = tl.load(y_ptr + row[:, None] + odv[None, :], mask=mt[:, None] & mdv[None, :],
                        other=0.0).to(tl.float32)
            _gated_rmsnorm_store(o, z_ptr, nw_ptr, y_ptr, row, odv, mt, mdv, DV, EPS, DT)


def prefill_meta(Hk: int, Hv: int, Dk: int, Dv: int, K: int, norm_eps: float, *, block_v: int | None = None,
                 act_dtype: str = "bf16", dot_precision: str | None = None,
                 inv_precision: str | None = None) -> dict:
    """Constexprs and launch options of the prefill kernel for one model configuration.

    ``block_v``: Dv tile kept in registers (default: whole Dv up to 64). ``dot_precision``:
    Triton ``input_precision`` of the q/k/state matmuls: "tf32x3" (tensor cores, about fp32
    accuracy; default for fp32 activations), "tf32" (~1e-3 relative, below bf16 rounding;
    default for 16-bit activations) or "ieee" (exact fp32 FMA loops; slow to compile and run
    at real sizes; not for AOT). ``inv_precision`` (default "tf32x3") is used for the UT
    transform (K K^T, the inverse, U and W S), whose errors the inverse amplifies; measured
    at real sizes it also needs less shared memory than "tf32" (64 KiB vs 112 KiB on sm_89).
    """
    act = str(act_dtype).replace("torch.", "")
    default_prec = "tf32x3" if act in ("fp32", "float32", "float") else "tf32"
    BK = max(16, next_pow2(Dk))
    BDV = max(16, next_pow2(Dv))
    BV = max(16, next_pow2(block_v)) if block_v else min(BDV, 64)
    BV = min(BV, BDV)
    num_warps = 4 if BK * BV <= 64 * 64 else 8
    return dict(constexprs=dict(HK=Hk, HV=Hv, DK=Dk, DV=Dv, KC=K, BT=CHUNK, BK=BK, BV=BV, BDV=BDV,
                                EPS=float(norm_eps), PREC=dot_precision or default_prec,
                                INV_PREC=inv_precision or "tf32x3"),
                num_warps=num_warps, num_stages=1)


def launch_prefill(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                   y, conv_state_out, recurrent_state_out, *, num_k_heads: int, norm_eps: float,
                   block_v: int | None = None, dot_precision: str | None = None):
    """Launch ``gdn_prefill_kernel`` on preallocated outputs."""
    B, T, C, Hk, Hv, Dk, Dv, K = check_inputs(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight,
                                               conv_state, recurrent_state, num_k_heads)
    args = (qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, T, y,
            conv_state_out, recurrent_state_out)
    key = (qkv.device.type, qkv.device.index, Hk, Hv, Dk, Dv, K, qkv.dtype, block_v, dot_precision)
    fallbacks = CONFIG_FALLBACKS if block_v is None else ({},)
    start = _chosen.get(key, 0)
    for i in range(start, len(fallbacks)):
        kw = dict(dict(block_v=block_v, dot_precision=dot_precision), **fallbacks[i])
        meta = prefill_meta(Hk, Hv, Dk, Dv, K, norm_eps, act_dtype=qkv.dtype, **kw)
        try:
            gdn_prefill_kernel[(Hv, B)](*args, **meta["constexprs"], num_warps=meta["num_warps"],
                                        num_stages=meta["num_stages"])
        except triton.runtime.errors.OutOfResources:
            if i + 1 == len(fallbacks):
                raise
            continue
        _chosen[key] = i
        return


def gated_deltanet_prefill(
    qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor, conv_weight: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor, conv_state: torch.Tensor,
    recurrent_state: torch.Tensor, *, num_k_heads: int, norm_eps: float = 1e-6,
    y: torch.Tensor | None = None, conv_state_out: torch.Tensor | None = None,
    recurrent_state_out: torch.Tensor | None = None, block_v: int | None = None, dot_precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qcn::GatedDeltaNet`` over T >= 1 tokens, chunked (chunk 64).

    Args:
        qkv: [B, T, C] q | k | v before the conv, C = 2*Hk*Dk + Hv*Dv (bf16/fp16/fp32).
        z: [B, T, Hv, Dv]; b, a: [B, T, Hv]; conv_weight: [C, K]; A_log: [Hv] fp32;
        dt_bias: [Hv]; norm_weight: [Dv].
        conv_state: [B, C, K-1] initial conv inputs, not modified.
        recurrent_state: [B, Hv, Dk, Dv] fp32 initial state; the final state is written to
            ``recurrent_state_out``, which defaults to ``recurrent_state`` itself (in place).
        y, conv_state_out: optional preallocated outputs; conv_state_out must not alias conv_state.
    Returns:
        (y [B, T, Hv*Dv] in qkv's dtype, conv_state_out [B, C, K-1], recurrent_state_out [B, Hv, Dk, Dv]).
    """
    B, T, C = qkv.shape
    Hv, Dv = z.shape[2], z.shape[3]
    if y is None:
        y = torch.empty(B, T, Hv * Dv, dtype=qkv.dtype, device=qkv.device)
    if conv_state_out is None:
        conv_state_out = torch.empty_like(conv_state)
    elif conv_state_out.numel() and conv_state_out.data_ptr() == conv_state.data_ptr():
        raise ValueError("conv_state_out must not alias conv_state")
    if recurrent_state_out is None:
        recurrent_state_out = recurrent_state
    launch_prefill(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                   y, conv_state_out, recurrent_state_out, num_k_heads=num_k_heads, norm_eps=norm_eps,
                   block_v=block_v, dot_precision=dot_precision)
    return y, conv_state_out, recurrent_state_out
