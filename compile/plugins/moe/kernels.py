"""Triton kernels of qcn::MoE. Launchers and shapes: ``launch.py``.

Every kernel's non-constexpr parameters are ordered (input pointers, int32 scalars, output
pointers): the calling convention of TensorRT's AOT plugins (``trt_plugin.py``), so the same
PTX serves both. All tensors are contiguous; strides are derived from the sizes.

Weight formats (constexpr WFMT): 0 dense (bf16/fp16/fp32), 1 FP8 E4M3 + fp32 scale per output
row, 2 INT4 packed two per byte (low nibble first) + bf16 scale per group of GROUP along the
reduction dimension (see ``quant.py``), 3 = FP8 E4M3 read as raw bytes and decoded with
integer ops (Triton has no e4m3 type below sm_89: the sm_80 build uses this). Weights are
dequantized in registers to the dot's input dtype (exact: int4 values and e4m3 values fit
bf16); scales are applied to the fp32 partial sums, once per group (INT4) or once per tile
(FP8).

Pipeline (slot = n * TOP_K + k, NK = N * TOP_K; "rows" index the intermediate buffers, which
hold NK routed rows followed by N shared-expert rows):

  _router_logits_kernel  x [N,H] @ router^T        -> logits [N,E] fp32
  _router_topk_kernel    softmax, top-k, renorm     -> topk_ids [N,K] i32, topk_w [N,K] f32,
                         sigmoid(x . shared_gate)   -> shared_w [N] f32
  decode (N <= BM = 16): rows are slots. One program per (slot, column block); the program of
    an expert's first slot gathers every token routed to it (<= 16) and runs a 16-row tile,
    so each selected expert's weights are read once; the last slot is the shared expert.
      _moe_decode_gate_up_kernel -> act [NK+N, IMAX];  _moe_decode_down_kernel -> inter [NK+N, H]
  prefill: counting sort of the slots by expert, then grouped GEMM over (expert, M-tile).
      _moe_align_kernel -> sorted_slots [NK], slot_row [NK], expert_off [E+1], tile_off [E+1]
      _moe_prefill_gate_up_kernel -> act;  _moe_prefill_down_kernel -> inter
  _moe_combine_kernel    y[n] = sum_k w[n,k] inter[row(n,k)] + shared_w[n] inter[NK+n]
                         (fixed order, no atomics: deterministic and batch invariant)
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Three defects of Triton 3.9's interpreter are worked around under TRITON_INTERPRET=1 only:
# tl.dot multiplies bf16 operands as their raw uint16 bits (operands are widened to fp32
# first: exact, the same arithmetic as a bf16 MMA with fp32 accumulation), int -> bf16 casts
# reinterpret bits (INT4 values go through fp32), and fp32 -> bf16 casts truncate (``_cast``
# rounds to nearest even with integer ops, as the GPU's cvt.rn does). Compiled kernels
# (GPU, aot.py, which runs without the interpreter) never take those branches.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# ----------------------------------------------------------------------------- helpers


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
    """v.to(DT) with round-to-nearest-even (see _INTERPRET)."""
    if _INTERPRET and DT == tl.bfloat16:
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _e4m3_to_f32(b):
    """float8_e4m3fn bits (uint8) -> fp32: the 7 magnitude bits shifted into an fp16 give the
    value * 2^-8 (exponent bias 15 vs 7; subnormals map to subnormals). NaN is not decoded."""
    h = b.to(tl.uint16)
    h = ((h & 0x80) << 8) | ((h & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _row_len(K, WFMT: tl.constexpr):
    """Elements (dense/fp8) or bytes (int4) per stored weight row of reduction length K."""
    if WFMT == 2:
        return (K + 1) // 2
    else:
        return K


@triton.jit
def _expert_bases(w_ptr, s_ptr, e, R, K, WFMT: tl.constexpr, GROUP: tl.constexpr):
    """Base pointers of expert e's weight [R, K] and scales inside stacked [E, R, ...] tensors."""
    e64 = e.to(tl.int64)
    w_e = w_ptr + e64 * R * _row_len(K, WFMT)
    if WFMT == 1 or WFMT == 3:
        s_e = s_ptr + e64 * R
    elif WFMT == 2:
        s_e = s_ptr + e64 * R * ((K + GROUP - 1) // GROUP)
    else:
        s_e = w_e  # unused
    return w_e, s_e


@triton.jit
def _load_w_t(w_base, offs_n, n_mask, k0, K, WFMT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """W[offs_n, k0:k0+BK] of a [*, K] matrix, transposed to [BK, BN], unscaled.

    Dense -> stored dtype, FP8 -> float8e4nv (WFMT 3: fp32), INT4 -> int32 in [-8, 7] (fp32
    under the interpreter). Masked entries are 0.
    """
    row = offs_n.to(tl.int64)[None, :] * _row_len(K, WFMT)
    if WFMT == 2:
        offs_b = k0 // 2 + tl.arange(0, BK // 2)
        b = tl.load(w_base + row + offs_b[:, None], mask=n_mask[None, :] & (offs_b[:, None] < (K + 1) // 2), other=0)
        b = b.to(tl.int32)
        lo = ((b & 15) ^ 8) - 8
        hi = ((b >> 4) ^ 8) - 8
        # element 2j <- low nibble of byte j, 2j+1 <- high nibble
        w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BK, BN))
        if _INTERPRET:  # the interpreter's int -> bf16 cast reinterprets bits
            w = w.to(tl.float32)
    elif WFMT == 3:
        offs_k = k0 + tl.arange(0, BK)
        w = _e4m3_to_f32(tl.load(w_base + row + offs_k[:, None], mask=n_mask[None, :] & (offs_k[:, None] < K), other=0))
    else:
        offs_k = k0 + tl.arange(0, BK)
        w = tl.load(w_base + row + offs_k[:, None], mask=n_mask[None, :] & (offs_k[:, None] < K), other=0.0)
    return w


@triton.jit
def _matmul_rows(a_ptr, a_rows, r_mask, a_stride, w_e, s_e, offs_n, n_mask, K,
                 WFMT: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc[BM, BN] = A[a_rows, :K] @ W[offs_n, :K]^T in fp32 with W's scales applied."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * a_stride
    n_groups = (K + GROUP - 1) // GROUP
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_base + offs_k[None, :], mask=r_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        w = _load_w_t(w_e, offs_n, n_mask, k0, K, WFMT, BK, BN).to(a.dtype)
        if WFMT == 2:
            # BK divides GROUP: the whole K-chunk lies in group k0 // GROUP
            s = tl.load(s_e + offs_n.to(tl.int64) * n_groups + k0 // GROUP, mask=n_mask, other=0.0)
            acc += _dot(a, w, tl.zeros([BM, BN], dtype=tl.float32), DOT_F32) * s.to(tl.float32)[None, :]
        else:
            acc = _dot(a, w, acc, DOT_F32)
    if WFMT == 1 or WFMT == 3:
        s = tl.load(s_e + offs_n, mask=n_mask, other=0.0)
        acc = acc * s.to(tl.float32)[None, :]
    return acc


@triton.jit
def _gate_up_tile(x_ptr, a_rows, o_rows, r_mask, w_e, s_e, act_ptr, H, INTER, IMAX, pid_n,
                  WFMT: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """act[o_rows, cols] = silu(x[a_rows] @ Wg^T) * (x[a_rows] @ Wu^T) for one column block."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < INTER
    g = _matmul_rows(x_ptr, a_rows, r_mask, H, w_e, s_e, offs_n, n_mask, H, WFMT, GROUP, DOT_F32, BM, BN, BK)
    u = _matmul_rows(x_ptr, a_rows, r_mask, H, w_e, s_e, INTER + offs_n, n_mask, H, WFMT, GROUP, DOT_F32, BM, BN, BK)
    h = g * tl.sigmoid(g) * u
    ptrs = act_ptr + o_rows.to(tl.int64)[:, None] * IMAX + offs_n[None, :]
    tl.store(ptrs, _cast(h, act_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_tile(act_ptr, rows, r_mask, w_e, s_e, out_ptr, H, INTER, IMAX, pid_n,
               WFMT: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[rows, cols] = act[rows, :INTER] @ Wd[cols, :INTER]^T for one column block of H."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < H
    acc = _matmul_rows(act_ptr, rows, r_mask, IMAX, w_e, s_e, offs_n, n_mask, INTER, WFMT, GROUP, DOT_F32, BM, BN, BK)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * H + offs_n[None, :]
    tl.store(ptrs, _cast(acc, out_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- router


@triton.jit
def _router_logits_kernel(x_ptr, wr_ptr, N, E, H, logits_ptr,
                          DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """logits[N, E] (fp32) = x[N, H] @ router[E, H]^T. Grid (cdiv(N, BM), cdiv(E, BN))."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask = offs_m < N
    n_mask = offs_n < E
    acc = _matmul_rows(x_ptr, offs_m, m_mask, H, wr_ptr, wr_ptr, offs_n, n_mask, H, 0, 1, DOT_F32, BM, BN, BK)
    ptrs = logits_ptr + offs_m.to(tl.int64)[:, None] * E + offs_n[None, :]
    tl.store(ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _router_topk_kernel(logits_ptr, x_ptr, sg_ptr, N, E, H, ids_ptr, w_ptr, sw_ptr,
                        TOP_K: tl.constexpr, NORM: tl.constexpr, BE: tl.constexpr, KP: tl.constexpr,
                        BH: tl.constexpr):
    """Per token: softmax (fp32) over E, top-k (ties -> lowest index), optional renormalisation,
    and the shared-expert gate sigmoid(x . shared_gate). Grid (N,)."""
    n = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BE)
    e_mask = offs_e < E
    lg = tl.load(logits_ptr + n * E + offs_e, mask=e_mask, other=float("-inf"))
    p = tl.exp(lg - tl.max(lg, axis=0))
    p = p / tl.sum(tl.where(e_mask, p, 0.0), axis=0)
    p = tl.where(e_mask, p, -1.0)
    offs_k = tl.arange(0, KP)
    sel_w = tl.zeros([KP], dtype=tl.float32)
    sel_i = tl.zeros([KP], dtype=tl.int32)
    for kk in tl.static_range(TOP_K):
        pm = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == pm, offs_e, BE), axis=0)
        idx = tl.minimum(idx, E - 1)  # NaN logits: keep the index in range, the NaN flows on
        sel_w = tl.where(offs_k == kk, pm, sel_w)
        sel_i = tl.where(offs_k == kk, idx, sel_i)
        p = tl.where(offs_e == idx, -2.0, p)
    if NORM:
        sel_w = sel_w / tl.sum(sel_w, axis=0)
    k_mask = offs_k < TOP_K
    tl.store(ids_ptr + n * TOP_K + offs_k, sel_i, mask=k_mask)
    tl.store(w_ptr + n * TOP_K + offs_k, sel_w, mask=k_mask)
    acc = tl.zeros([BH], dtype=tl.float32)
    for h0 in range(0, H, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_mask = offs_h < H
        xv = tl.load(x_ptr + n * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        gv = tl.load(sg_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        acc += xv * gv
    tl.store(sw_ptr + n, tl.sigmoid(tl.sum(acc, axis=0)))


# ----------------------------------------------------------------------------- decode (N <= BM)


@triton.jit
def _decode_rows(topk_ids_ptr, pid_s, N, NK, TOP_K: tl.constexpr, BM: tl.constexpr,
                 BS: tl.constexpr, KP: tl.constexpr):
    """For the slot pid_s: its expert e, whether pid_s is that expert's first slot, and the
    [BM] per-token output rows (slot indices) / mask of the tokens routed to e."""
    e = tl.load(topk_ids_ptr + pid_s)
    offs_s = tl.arange(0, BS)
    ids = tl.load(topk_ids_ptr + offs_s, mask=offs_s < NK, other=-1)
    first = tl.min(tl.where(ids == e, offs_s, BS), axis=0) == pid_s
    offs_t = tl.arange(0, BM)
    offs_k = tl.arange(0, KP)
    ids2 = tl.load(topk_ids_ptr + offs_t[:, None] * TOP_K + offs_k[None, :],
                   mask=(offs_t[:, None] < N) & (offs_k[None, :] < TOP_K), other=-1)
    kk = tl.min(tl.where(ids2 == e, offs_k[None, :], KP), axis=1)
    return e, first, offs_t * TOP_K + kk, kk < KP


@triton.jit
def _moe_decode_gate_up_kernel(x_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, topk_ids_ptr,
                               N, H, INTER, INTER_S, act_ptr,
                               TOP_K: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                               DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                               BS: tl.constexpr, KP: tl.constexpr):
    """Grid (N*TOP_K + 1, cdiv(max(I, Is), BN)); requires N <= BM."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    NK = N * TOP_K
    IMAX = tl.maximum(INTER, INTER_S)
    offs_t = tl.arange(0, BM)
    if pid_s < NK:
        e, first, o_rows, r_mask = _decode_rows(topk_ids_ptr, pid_s, N, NK, TOP_K, BM, BS, KP)
        if first & (pid_n * BN < INTER):
            w_e, s_e = _expert_bases(w_ptr, ws_ptr, e, 2 * INTER, H, WFMT, GROUP)
            _gate_up_tile(x_ptr, offs_t, o_rows, r_mask, w_e, s_e, act_ptr, H, INTER, IMAX, pid_n,
                          WFMT, GROUP, DOT_F32, BM, BN, BK)
    else:
        if pid_n * BN < INTER_S:
            _gate_up_tile(x_ptr, offs_t, NK + offs_t, offs_t < N, sw_ptr, sws_ptr, act_ptr, H, INTER_S, IMAX,
                          pid_n, WFMT, GROUP, DOT_F32, BM, BN, BK)


@triton.jit
def _moe_decode_down_kernel(act_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, topk_ids_ptr,
                            N, H, INTER, INTER_S, out_ptr,
                            TOP_K: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                            DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            BS: tl.constexpr, KP: tl.constexpr):
    """Grid (N*TOP_K + 1, cdiv(H, BN)); requires N <= BM."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    NK = N * TOP_K
    IMAX = tl.maximum(INTER, INTER_S)
    offs_t = tl.arange(0, BM)
    if pid_s < NK:
        e, first, rows, r_mask = _decode_rows(topk_ids_ptr, pid_s, N, NK, TOP_K, BM, BS, KP)
        if first:
            w_e, s_e = _expert_bases(w_ptr, ws_ptr, e, H, INTER, WFMT, GROUP)
            _down_tile(act_ptr, rows, r_mask, w_e, s_e, out_ptr, H, INTER, IMAX, pid_n,
                       WFMT, GROUP, DOT_F32, BM, BN, BK)
    else:
        _down_tile(act_ptr, NK + offs_t, offs_t < N, sw_ptr, sws_ptr, out_ptr, H, INTER_S, IMAX, pid_n,
                   WFMT, GROUP, DOT_F32, BM, BN, BK)


# ----------------------------------------------------------------------------- prefill


@triton.jit
def _moe_align_kernel(topk_ids_ptr, NK, E, sorted_ptr, slot_row_ptr, expert_off_ptr, tile_off_ptr,
                      BM: tl.constexpr, EP: tl.constexpr, BLOCK: tl.constexpr):
    """Stable counting sort of the NK slots by expert. Grid (E,); program e writes
    expert_off[e] / tile_off[e] (exclusive prefix sums of counts / cdiv(counts, BM)), the last
    program also entry E, and places expert e's slots (in slot order) at sorted rows
    expert_off[e] ..; slot_row is the inverse permutation."""
    e = tl.program_id(0)
    offs_e = tl.arange(0, EP)
    hist = tl.zeros([EP], dtype=tl.int32)
    for s0 in range(0, NK, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        m = offs < NK
        ids = tl.load(topk_ids_ptr + offs, mask=m, other=0)
        hist += tl.histogram(ids, EP, mask=m)
    before = offs_e < e
    start = tl.sum(tl.where(before, hist, 0), axis=0)
    count = tl.sum(tl.where(offs_e == e, hist, 0), axis=0)
    tstart = tl.sum(tl.where(before, (hist + BM - 1) // BM, 0), axis=0)
    tl.store(expert_off_ptr + e, start)
    tl.store(tile_off_ptr + e, tstart)
    if e == E - 1:
        tl.store(expert_off_ptr + E, start + count)
        tl.store(tile_off_ptr + E, tstart + (count + BM - 1) // BM)
    run = start
    for s0 in range(0, NK, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < NK, other=-1)
        hit = (ids == e).to(tl.int32)
        pos = run + tl.cumsum(hit, axis=0) - 1
        tl.store(sorted_ptr + pos, offs, mask=hit > 0)
        tl.store(slot_row_ptr + offs, pos, mask=hit > 0)
        run += tl.sum(hit, axis=0)


@triton.jit
def _prefill_tile(sorted_ptr, expert_off_ptr, tile_off_ptr, pid_m, N, NK, E,
                  TOP_K: tl.constexpr, BM: tl.constexpr, EP: tl.constexpr):
    """Map an M-tile program to (is_routed, expert, sorted rows [BM], their tokens, row mask).
    Tiles [0, tile_off[E]) are routed (expert-major); the following cdiv(N, BM) tiles are the
    shared expert over all tokens (rows NK + n); later programs have an all-false mask."""
    total = tl.load(tile_off_ptr + E)
    offs = tl.arange(0, BM)
    routed = pid_m < total
    if routed:
        offs_e = tl.arange(0, EP)
        ends = tl.load(tile_off_ptr + 1 + offs_e, mask=offs_e < E, other=2147483647)
        e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
        row0 = tl.load(expert_off_ptr + e) + (pid_m - tl.load(tile_off_ptr + e)) * BM
        rows = row0 + offs
        r_mask = rows < tl.load(expert_off_ptr + e + 1)
        tokens = tl.load(sorted_ptr + rows, mask=r_mask, other=0) // TOP_K
    else:
        e = total * 0
        tokens = (pid_m - total) * BM + offs
        r_mask = tokens < N
        rows = NK + tokens
    return routed, e, rows, tokens, r_mask


@triton.jit
def _moe_prefill_gate_up_kernel(x_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, sorted_ptr, expert_off_ptr, tile_off_ptr,
                                N, E, H, INTER, INTER_S, act_ptr,
                                TOP_K: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                                DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                EP: tl.constexpr):
    """Grid (cdiv(NK, BM) + min(E, NK) + cdiv(N, BM), cdiv(max(I, Is), BN))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    NK = N * TOP_K
    IMAX = tl.maximum(INTER, INTER_S)
    routed, e, rows, tokens, r_mask = _prefill_tile(sorted_ptr, expert_off_ptr, tile_off_ptr, pid_m, N, NK, E,
                                                    TOP_K, BM, EP)
    if routed:
        if pid_n * BN < INTER:
            w_e, s_e = _expert_bases(w_ptr, ws_ptr, e, 2 * INTER, H, WFMT, GROUP)
            _gate_up_tile(x_ptr, tokens, rows, r_mask, w_e, s_e, act_ptr, H, INTER, IMAX, pid_n,
                          WFMT, GROUP, DOT_F32, BM, BN, BK)
    else:
        if (pid_n * BN < INTER_S) & (tl.sum(r_mask.to(tl.int32), axis=0) > 0):
            _gate_up_tile(x_ptr, tokens, rows, r_mask, sw_ptr, sws_ptr, act_ptr, H, INTER_S, IMAX, pid_n,
                          WFMT, GROUP, DOT_F32, BM, BN, BK)


@triton.jit
def _moe_prefill_down_kernel(act_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, sorted_ptr, expert_off_ptr, tile_off_ptr,
                             N, E, H, INTER, INTER_S, out_ptr,
                             TOP_K: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                             DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             EP: tl.constexpr):
    """Grid (cdiv(NK, BM) + min(E, NK) + cdiv(N, BM), cdiv(H, BN))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    NK = N * TOP_K
    IMAX = tl.maximum(INTER, INTER_S)
    routed, e, rows, tokens, r_mask = _prefill_tile(sorted_ptr, expert_off_ptr, tile_off_ptr, pid_m, N, NK, E,
                                                    TOP_K, BM, EP)
    if routed:
        w_e, s_e = _expert_bases(w_ptr, ws_ptr, e, H, INTER, WFMT, GROUP)
        _down_tile(act_ptr, rows, r_mask, w_e, s_e, out_ptr, H, INTER, IMAX, pid_n, WFMT, GROUP, DOT_F32, BM, BN, BK)
    else:
        if tl.sum(r_mask.to(tl.int32), axis=0) > 0:
            _down_tile(act_ptr, rows, r_mask, sw_ptr, sws_ptr, out_ptr, H, INTER_S, IMAX, pid_n,
                       WFMT, GROUP, DOT_F32, BM, BN, BK)


# ----------------------------------------------------------------------------- combine


@triton.jit
def _moe_combine_kernel(inter_ptr, topk_w_ptr, shared_w_ptr, slot_row_ptr, N, H, y_ptr,
                        TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BH: tl.constexpr):
    """y[n, :] = sum_k topk_w[n,k] * inter[row(n,k), :] + shared_w[n] * inter[NK + n, :], fp32,
    k ascending then shared. row = slot_row[slot] (prefill) or the slot (decode). Grid (N, cdiv(H, BH))."""
    n = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_mask = offs_h < H
    acc = tl.zeros([BH], dtype=tl.float32)
    for kk in tl.static_range(TOP_K):
        slot = n * TOP_K + kk
        if HAS_MAP:
            row = tl.load(slot_row_ptr + slot).to(tl.int64)
        else:
            row = slot
        wk = tl.load(topk_w_ptr + slot)
        acc += wk * tl.load(inter_ptr + row * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    row_s = N.to(tl.int64) * TOP_K + n
    acc += tl.load(shared_w_ptr + n) * tl.load(inter_ptr + row_s * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n * H + offs_h, _cast(acc, y_ptr.dtype.element_ty), mask=h_mask)
