"""INT4 weight-only projections: the math and the graph form (docs/QUANTIZATION.md, INT4).

Format: symmetric signed int4 (q in [-8, 7], no zero point: TensorRT rejects non-zero ones),
one fp32 scale per group of ``GROUP`` (128) consecutive input channels (along K) per output
channel: W [K, N] ~= q [K, N] * scale [ceil(K / 128), N][k // 128, n], scale = amax|group| / 7
(a final partial group is allowed). The numbers are compile/plugins/moe/quant.py's
``quantize_int4_groupwise`` (the MoE kernels' format) applied to W^T with fp32 scales.

Graph form (shared contract 2):
    MatMul(x, W)  ->  MatMul(x', DequantizeLinear(Wq INT4 [K, N], scale fp32 [G, N], axis=0, block_size=128))
where x' is x, or x / s for AWQ's per-input-channel scales s [K] (W' = diag(s) W is what is
quantized): the 1/s is folded into the constant Mul that produces x (the RMSNorm weight) when
every consumer of that Mul is an INT4 projection of the same group (:mod:`.int4_fold`), or an
explicit ``Mul(x, 1/s)`` in front of the projection otherwise.

ONNX Runtime (1.32, CPU) turns DQ + MatMul into ``com.microsoft.MatMulNBits`` by itself at
ORT_ENABLE_EXTENDED and above, with accuracy_level 4 (int8 activations) unless the session sets
``session.qdq_matmulnbits_accuracy_level`` = "0" (fp32 activations, exact): see
``ORT_SESSION_CONFIG`` and docs/QUANTIZATION.md for the measured difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from ...plugins.moe.quant import quantize_int4_groupwise, unpack_int4

GROUP = 128
QMIN, QMAX = -8, 7
#: ONNX Runtime session config that keeps the fused MatMulNBits exact (fp32 activations)
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def quantize_kn(w: torch.Tensor, group: int = GROUP, scale_dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, N] (in, out) -> (q int8 [K, N] in [-8, 7], scale [ceil(K / group), N]). The scale is
    rounded to ``scale_dtype`` (the activation dtype: DequantizeLinear's output type, and what
    TensorRT-RTX needs for INT4) before q is computed, so q and scale agree."""
    k = w.shape[0]
    packed, scale = quantize_int4_groupwise(w.float().T, group, scale_dtype=scale_dtype)  # [N, K/2], [N, G]
    return unpack_int4(packed, k).T.contiguous(), scale.T.contiguous()


def dequantize_kn(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Inverse of :func:`quantize_kn` (what DequantizeLinear computes) -> fp32 [K, N]."""
    k = q.shape[0]
    return q.float() * scale.float().repeat_interleave(group, dim=0)[:k]


def fake_quantize_kn(w: torch.Tensor, group: int = GROUP, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [K, N] -> its INT4 round trip (fp32 [K, N])."""
    return dequantize_kn(*quantize_kn(w, group, scale_dtype), group)


def int4_tensor(q: torch.Tensor, name: str) -> ir.Tensor:
    """q int8 [..] in [-8, 7] -> an ONNX INT4 tensor (two values per byte, low nibble first)."""
    if q.numel() and (int(q.min()) < QMIN or int(q.max()) > QMAX):
        raise ValueError(f"{name}: int4 values must lie in [{QMIN}, {QMAX}]")
    return ir.Tensor(q.numpy().astype(ml_dtypes.int4), name=name)


TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                ir.DataType.BFLOAT16: torch.bfloat16}


def float_tensor(a: torch.Tensor, name: str, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Tensor:
    """A float initializer in ``dtype`` (fp32 / fp16 / bf16) from a torch tensor."""
    t = a.detach().to(TORCH_DTYPES[dtype]).contiguous()
    if dtype == ir.DataType.BFLOAT16:
        return ir.Tensor(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


@dataclass
class Int4Weight:
    """How one projection weight W [K, N] is stored: INT4 q [K, N], fp32 scale [G, N] of
    diag(s) W, and the AWQ input scale s [K] (None: plain RTN). ``fold`` names the constant
    (the norm weight) that absorbs 1/s; None with an input scale: an explicit Mul."""

    name: str
    q: torch.Tensor
    scale: torch.Tensor
    method: str                        # "rtn" | "awq"
    # scale dtype = the weight's (activation) dtype; q was computed against the rounded scale
    input_scale: torch.Tensor | None = None
    fold: str | None = None
    group: int = GROUP

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantized(self) -> torch.Tensor:
        """The effective float weight the INT4 graph multiplies x by (1/s applied): fp32 [K, N]."""
        w = dequantize_kn(self.q, self.scale, self.group)
        return w if self.input_scale is None else w / self.input_scale.float()[:, None]

    # initializer names (same in every graph: prefill and decode share one weights file)
    @property
    def q_name(self) -> str:
        return f"{self.name}.int4"

    @property
    def scale_name(self) -> str:
        return f"{self.name}.int4_scale"

    @property
    def inv_scale_name(self) -> str:
        return f"{self.name}.awq_inv_scale"


def rtn(name: str, w: torch.Tensor, group: int = GROUP, scale_dtype: torch.dtype = torch.float32) -> Int4Weight:
    q, s = quantize_kn(w, group, scale_dtype)
    return Int4Weight(name, q, s, "rtn", group=group)


__all__ = ["GROUP", "ORT_SESSION_CONFIG", "Int4Weight", "quantize_kn", "dequantize_kn", "fake_quantize_kn",
           "int4_tensor", "float_tensor", "TORCH_DTYPES", "rtn"]
