"""Weight formats of the MoE kernels and the helpers that make them (tests, export passes).

Formats (the kernels dequantize in registers; scales are applied after the dot product,
so the products themselves are exact):

``dense``  bf16 / fp16 / fp32 weights as stored.

``fp8``    ``torch.float8_e4m3fn`` weights with one fp32 scale per output channel (row):
           W[..., r, :] ~= q[..., r, :].float() * scale[..., r]. scale = amax(|row|) / 448.

``int4``   symmetric signed int4 in groups of ``group_size`` (128) along the reduction
           (last) dimension: H for gate_up [E, 2I, H], I for down [E, H, I] (the input
           dimension of each matrix), bf16 scales: W[..., r, k] ~= q[..., r, k] *
           scale[..., r, k // group_size], q in [-8, 7], scale = amax(|group|) / 7.
           Packing (same as ONNX INT4): two values per byte along the last dimension,
           element 2j in the LOW nibble and element 2j+1 in the HIGH nibble of byte j, each
           nibble two's complement (value = ((nibble ^ 8) - 8)). Packed shape
           [..., ceil(K / 2)] uint8 (an odd K is padded with a zero nibble); scale shape
           [..., ceil(K / group_size)] bfloat16. A final partial group is allowed.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX",
    "quantize_fp8_rowwise",
    "dequantize_fp8_rowwise",
    "pack_int4",
    "unpack_int4",
    "quantize_int4_groupwise",
    "dequantize_int4_groupwise",
    "quantize_moe_weights",
]

FP8_MAX = 448.0


def quantize_fp8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, K] -> (q [..., R, K] float8_e4m3fn, scale [..., R] float32)."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (wf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_rowwise` -> float32 [..., R, K]."""
    return q.float() * scale.float()[..., None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] integer in [-8, 7] -> uint8 [..., ceil(K/2)] (element 2j low nibble)."""
    k = q.shape[-1]
    if k % 2:
        q = torch.cat([q, torch.zeros_like(q[..., :1])], dim=-1)
    n = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (n[..., 0::2] | (n[..., 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/2)] -> int8 [..., K] in [-8, 7]."""
    p = p.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = ((p >> 4) ^ 8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], -1)[..., :k].to(torch.int8)


def quantize_int4_groupwise(w: torch.Tensor, group_size: int = 128,
                            scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, K] -> (packed uint8 [..., R, ceil(K/2)], scale [..., R, ceil(K/group_size)] in
    ``scale_dtype``: bf16 for the kernels; the ONNX graphs' DequantizeLinear scales are fp32)."""
    k = w.shape[-1]
    ng = -(-k // group_size)
    wf = w.float()
    pad = ng * group_size - k
    wp = torch.nn.functional.pad(wf, (0, pad)) if pad else wf
    g = wp.reshape(*wf.shape[:-1], ng, group_size)
    scale = (g.abs().amax(dim=-1) / 7.0).to(scale_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / scale.float()[..., None]).clamp(-8, 7)
    q = q.reshape(*wf.shape[:-1], ng * group_size)[..., :k].to(torch.int8)
    return pack_int4(q), scale


def dequantize_int4_groupwise(p: torch.Tensor, scale: torch.Tensor, k: int, group_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`quantize_int4_groupwise` -> float32 [..., R, K]."""
    q = unpack_int4(p, k).float()
    s = scale.float().repeat_interleave(group_size, dim=-1)[..., :k]
    return q * s


def quantize_moe_weights(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    shared_gate_up: torch.Tensor,
    shared_down: torch.Tensor,
    weight_format: str,
    group_size: int = 128,
) -> tuple[dict, dict]:
    """Quantize the four expert matrices.

    Returns (kernel_kwargs, dequantized): kernel_kwargs holds gate_up, down, shared_gate_up,
    shared_down and their ``*_scale`` tensors (plus ``weight_format`` / ``group_size``) ready
    for :func:`moe_forward`; dequantized holds the float32 weights the reference must use.
    """
    mats = {"gate_up": gate_up, "down": down, "shared_gate_up": shared_gate_up, "shared_down": shared_down}
    kw: dict = {"weight_format": weight_format}
    deq: dict = {}
    for name, w in mats.items():
        if weight_format == "dense":
            kw[name], deq[name] = w, w.float()
        elif weight_format == "fp8":
            q, s = quantize_fp8_rowwise(w)
            kw[name], kw[name + "_scale"], deq[name] = q, s, dequantize_fp8_rowwise(q, s)
        elif weight_format == "int4":
            q, s = quantize_int4_groupwise(w, group_size)
            kw[name], kw[name + "_scale"] = q, s
            deq[name] = dequantize_int4_groupwise(q, s, w.shape[-1], group_size)
            kw["group_size"] = group_size
        else:
            raise ValueError(f"unknown weight_format {weight_format!r}")
    return kw, deq
