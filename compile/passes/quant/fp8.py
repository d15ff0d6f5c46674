"""FP8 E4M3 (float8_e4m3fn) arithmetic shared by the FP8 rules and their tests.

Weights ``W [K, N]`` (in, out: how the export stores projections):
- ``channel``: one scale per output column, ``s [N] = amax_k |W[:, n]| / 448``, DequantizeLinear
  ``axis=1``;
- ``block128``: one scale per 128 rows of K per column, ``s [ceil(K/128), N]``, DequantizeLinear
  ``axis=0, block_size=128`` (the last block may be short);
``W ~= dequantize(Wq, s) = float(Wq) * s`` broadcast as above, ``Wq = saturate(round(W / s))``.
An all-zero column/block gets scale 1. Activations: one static scale per tensor,
``s_x = amax / 448`` from calibration, QuantizeLinear saturating to +-448 (ONNX's default
``saturate=1``), zero point 0. Scales are stored in the activation dtype (the DequantizeLinear
output type is the scale's type); the weights are quantized with the scale as stored, so the
dequantized weight is exactly what the graph computes with.
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = 128
GRANULARITIES = ("channel", "block128")


def weight_scales(w: torch.Tensor, granularity: str, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales of ``w [K, N]``: [N] (channel) or [ceil(K/128), N] (block128), in ``scale_dtype``."""
    w = w.float()
    K, N = w.shape
    if granularity == "channel":
        amax = w.abs().amax(dim=0)
    elif granularity == "block128":
        G = math.ceil(K / BLOCK)
        padded = torch.zeros(G * BLOCK, N)
        padded[:K] = w.abs()
        amax = padded.view(G, BLOCK, N).amax(dim=1)
    else:
        raise ValueError(f"FP8 granularity {granularity!r}: choose one of {list(GRANULARITIES)}")
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    return torch.where(s.float() > 0, s, torch.ones_like(s))  # a scale that underflowed in 16 bits


def expand(s: torch.Tensor, K: int) -> torch.Tensor:
    """Per-element scales [K, N] of weight scales [N] or [G, N] (blocks of 128 rows)."""
    if s.dim() == 1:
        return s.float().expand(K, -1)
    return s.float().repeat_interleave(BLOCK, dim=0)[:K]


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """saturate(round_nearest_even(x / scale)) to E4M3 (what QuantizeLinear computes)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_weight(w: torch.Tensor, granularity: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wq float8_e4m3fn [K, N], scales) of ``w [K, N]``."""
    s = weight_scales(w, granularity, scale_dtype)
    return quantize(w, expand(s, w.shape[0])), s


def dequantize_weight(wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return wq.float() * expand(s, wq.shape[0])


def activation_scale(amax: float, scale_dtype: torch.dtype) -> torch.Tensor:
    """The static per-tensor scale (a scalar) for a calibrated amax > 0."""
    return torch.tensor(amax / FP8_MAX, dtype=torch.float32).to(scale_dtype)


def fake_quant_activation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x, s)) in fp32."""
    return quantize(x, s).float() * s.float()
