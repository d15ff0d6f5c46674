"""Launchers and public functions of the qcn::MoE Triton kernels.

On a GPU the kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` (tests, ``--dry-run``)
they run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import kernels as K


def _empty(shape, *, device, dtype):
    """Allocation of outputs and scratch (tests replace it to poison buffers)."""
    return torch.empty(shape, device=device, dtype=dtype)

__all__ = ["MoEConfig", "WEIGHT_FORMATS", "DECODE_MAX_TOKENS", "moe_route", "moe_forward"]

WEIGHT_FORMATS = {"dense": 0, "fp8": 1, "int4": 2}
DECODE_MAX_TOKENS = 16  # decode-path tile height (tensor-core minimum); N <= this uses the decode path


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes (powers of two >= 16; BK must divide the INT4 group size) and warps."""

    router_bm: int = 16
    router_bn: int = 64
    router_bk: int = 128
    topk_bh: int = 256
    decode_bn_gate_up: int = 32
    decode_bn_down: int = 64
    decode_bk: int = 128
    prefill_bm: int = 64
    prefill_bn: int = 64
    prefill_bk: int = 32
    align_block: int = 1024
    combine_bh: int = 256
    num_warps: int = 4
    num_stages: int = 3
    # FP8 weights decoded from raw bytes with integer ops (WFMT 3) instead of the native e4m3
    # type; None = automatic (software below sm_89, where Triton has no e4m3 type).
    fp8_software: bool | None = None


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _fp8_software(cfg: MoEConfig, device: torch.device) -> bool:
    if cfg.fp8_software is not None:
        return cfg.fp8_software
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9)


def _dot_f32(x: torch.Tensor, w: torch.Tensor, fmt: str) -> bool:
    return x.dtype == torch.float32 or (fmt == "dense" and w.dtype != x.dtype)


def moe_route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    shared_gate: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    *,
    config: MoEConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router of qcn::MoE (two kernels: logits GEMM, then per-token softmax/top-k).

    Args:
        x: [N, H] activations (bf16/fp16/fp32).
        router_weight: [E, H].
        shared_gate: [1, H] (or [H]) shared-expert gate weight.
    Returns:
        topk_ids [N, top_k] int32 (descending probability, ties -> lowest index),
        topk_weights [N, top_k] fp32 (renormalised when norm_topk_prob),
        shared_weight [N] fp32 = sigmoid(x . shared_gate).
    """
    cfg = config or MoEConfig()
    n, h = x.shape
    e = router_weight.shape[0]
    if router_weight.shape != (e, h) or shared_gate.numel() != h:
        raise ValueError(f"router_weight must be [E, H={h}] and shared_gate [1, H={h}]; got "
                         f"{tuple(router_weight.shape)} and {tuple(shared_gate.shape)}")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, E={e}]")
    x, router_weight, shared_gate = x.contiguous(), router_weight.contiguous(), shared_gate.contiguous()
    dev = x.device
    logits = _empty((n, e), device=dev, dtype=torch.float32)
    ids = _empty((n, top_k), device=dev, dtype=torch.int32)
    w = _empty((n, top_k), device=dev, dtype=torch.float32)
    sw = _empty((n,), device=dev, dtype=torch.float32)
    if n == 0:
        return ids, w, sw
    grid = (triton.cdiv(n, cfg.router_bm), triton.cdiv(e, cfg.router_bn))
    K._router_logits_kernel[grid](
        x, router_weight, n, e, h, logits,
        DOT_F32=_dot_f32(x, router_weight, "dense"), BM=cfg.router_bm, BN=cfg.router_bn, BK=cfg.router_bk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    K._router_topk_kernel[(n,)](
        logits, x, shared_gate, n, e, h, ids, w, sw,
        TOP_K=top_k, NORM=bool(norm_topk_prob), BE=_p2(e), KP=_p2(top_k), BH=min(cfg.topk_bh, _p2(h)),
        num_warps=cfg.num_warps,
    )
    return ids, w, sw


def _check_weights(fmt, h, e, inter, inter_s, group_size, gate_up, down, sgu, sdown, scales):
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {sorted(WEIGHT_FORMATS)}, got {fmt!r}")

    def row(k):  # stored row length
        return (k + 1) // 2 if fmt == "int4" else k

    want = {
        "gate_up": (gate_up, (e, 2 * inter, row(h)), (e, 2 * inter), h),
        "down": (down, (e, h, row(inter)), (e, h), inter),
        "shared_gate_up": (sgu, (2 * inter_s, row(h)), (2 * inter_s,), h),
        "shared_down": (sdown, (h, row(inter_s)), (h,), inter_s),
    }
    for name, (t, shape, srows, k) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} for format {fmt}, got {tuple(t.shape)}")
        s = scales[name]
        if fmt == "dense":
            continue
        if s is None:
            raise ValueError(f"{name}_scale is required for weight_format={fmt!r}")
        if fmt == "fp8":
            if t.dtype != torch.float8_e4m3fn or tuple(s.shape) != srows:
                raise ValueError(f"{name}: fp8 wants float8_e4m3fn weights and scale {srows}, "
                                 f"got {t.dtype} {tuple(s.shape)}")
        else:
            sshape = srows + (-(-k // group_size),)
            if t.dtype != torch.uint8 or tuple(s.shape) != sshape:
                raise ValueError(f"{name}: int4 wants uint8 weights and scale {sshape}, got {t.dtype} {tuple(s.shape)}")


def moe_forward(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    shared_gate_up: torch.Tensor,
    shared_down: torch.Tensor,
    shared_gate: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    *,
    weight_format: str = "dense",
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    shared_gate_up_scale: torch.Tensor | None = None,
    shared_down_scale: torch.Tensor | None = None,
    group_size: int = 128,
    path: str = "auto",
    out: torch.Tensor | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """qcn::MoE: y = sum_k p_k expert_k(x) + sigmoid(x . shared_gate) * shared_expert(x).

    Shapes (I = expert width, Is = shared width; "row" = H or I, or ceil(row/2) bytes for int4):
        x [N, H]; router_weight [E, H]; shared_gate [1, H]
        gate_up [E, 2I, H] (gate rows first), down [E, H, I]
        shared_gate_up [2Is, H], shared_down [H, Is]
        fp8 scales (fp32): gate_up_scale [E, 2I], down_scale [E, H],
            shared_gate_up_scale [2Is], shared_down_scale [H]
        int4 scales (bf16): gate_up_scale [E, 2I, ceil(H/G)], down_scale [E, H, ceil(I/G)],
            shared_gate_up_scale [2Is, ceil(H/G)], shared_down_scale [H, ceil(Is/G)]
    Returns y [N, H] in x.dtype (written into ``out`` if given; every element is written).

    path: "decode" (N <= 16: each selected expert's weights read once, 16-row tiles),
    "prefill" (tokens sorted by expert, grouped GEMM), or "auto" (decode iff N <= 16).
    Accumulation is fp32; intermediates (silu(g)*u and the per-expert outputs) are x.dtype.
    """
    cfg = config or MoEConfig()
    n, h = x.shape
    e = router_weight.shape[0]
    inter = gate_up.shape[1] // 2
    inter_s = shared_gate_up.shape[0] // 2
    fmt = weight_format
    scales = {"gate_up": gate_up_scale, "down": down_scale, "shared_gate_up": shared_gate_up_scale,
              "shared_down": shared_down_scale}
    _check_weights(fmt, h, e, inter, inter_s, group_size, gate_up, down, shared_gate_up, shared_down, scales)
    if path == "auto":
        path = "decode" if n <= DECODE_MAX_TOKENS else "prefill"
    if path not in ("decode", "prefill"):
        raise ValueError(f"path must be auto/decode/prefill, got {path!r}")
    if path == "decode" and n > DECODE_MAX_TOKENS:
        raise ValueError(f"decode path takes at most {DECODE_MAX_TOKENS} tokens, got {n}")
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(x.shape)} {x.dtype} like x, got {tuple(out.shape)} {out.dtype}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    if n == 0:
        return out

    x = x.contiguous()
    w = [t.contiguous() for t in (gate_up, down, shared_gate_up, shared_down)]
    s = [None if v is None or fmt == "dense" else v.contiguous() for v in scales.values()]
    wfmt = WEIGHT_FORMATS[fmt]
    if fmt == "fp8" and _fp8_software(cfg, x.device):
        wfmt = 3
        w = [t.view(torch.uint8) for t in w]
    group = group_size if fmt == "int4" else 1
    dot_f32 = _dot_f32(x, gate_up, fmt)
    ids, tw, sw = moe_route(x, router_weight, shared_gate, top_k, norm_topk_prob, config=cfg)

    nk = n * top_k
    imax = max(inter, inter_s)
    act = _empty((nk + n, imax), device=x.device, dtype=x.dtype)
    inter_out = _empty((nk + n, h), device=x.device, dtype=x.dtype)
    common = dict(TOP_K=top_k, WFMT=wfmt, GROUP=group, DOT_F32=dot_f32, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)

    def bk(v):
        v = min(v, group) if fmt == "int4" else v
        if fmt == "int4" and group % v:
            raise ValueError(f"INT4 weights need the K tile ({v}) to divide group_size {group}: set the "
                             "MoEConfig block sizes to a divisor of the group size")
        return v

    if path == "decode":
        dec = dict(BM=DECODE_MAX_TOKENS, BK=bk(cfg.decode_bk), BS=_p2(DECODE_MAX_TOKENS * top_k), KP=_p2(top_k))
        grid = (nk + 1, triton.cdiv(imax, cfg.decode_bn_gate_up))
        K._moe_decode_gate_up_kernel[grid](x, w[0], s[0], w[2], s[2], ids, n, h, inter, inter_s, act,
                                           BN=cfg.decode_bn_gate_up, **dec, **common)
        grid = (nk + 1, triton.cdiv(h, cfg.decode_bn_down))
        K._moe_decode_down_kernel[grid](act, w[1], s[1], w[3], s[3], ids, n, h, inter, inter_s, inter_out,
                                        BN=cfg.decode_bn_down, **dec, **common)
        slot_row, has_map = None, False
    else:
        bm = cfg.prefill_bm
        sorted_slots = _empty((nk,), device=x.device, dtype=torch.int32)
        slot_row = _empty((nk,), device=x.device, dtype=torch.int32)
        expert_off = _empty((e + 1,), device=x.device, dtype=torch.int32)
        tile_off = _empty((e + 1,), device=x.device, dtype=torch.int32)
        K._moe_align_kernel[(e,)](ids, nk, e, sorted_slots, slot_row, expert_off, tile_off,
                                  BM=bm, EP=_p2(e), BLOCK=min(cfg.align_block, _p2(nk)), num_warps=cfg.num_warps)
        m_tiles = triton.cdiv(nk, bm) + min(e, nk) + triton.cdiv(n, bm)
        pre = dict(BM=bm, BN=cfg.prefill_bn, BK=bk(cfg.prefill_bk), EP=_p2(e))
        K._moe_prefill_gate_up_kernel[(m_tiles, triton.cdiv(imax, cfg.prefill_bn))](
            x, w[0], s[0], w[2], s[2], sorted_slots, expert_off, tile_off, n, e, h, inter, inter_s, act,
            **pre, **common)
        K._moe_prefill_down_kernel[(m_tiles, triton.cdiv(h, cfg.prefill_bn))](
            act, w[1], s[1], w[3], s[3], sorted_slots, expert_off, tile_off, n, e, h, inter, inter_s, inter_out,
            **pre, **common)
        has_map = True
    K._moe_combine_kernel[(n, triton.cdiv(h, cfg.combine_bh))](
        inter_out, tw, sw, slot_row, n, h, out, TOP_K=top_k, HAS_MAP=has_map, BH=cfg.combine_bh,
        num_warps=cfg.num_warps)
    return out
