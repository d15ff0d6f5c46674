"""Small Triton helpers and launcher utilities shared by the GatedDeltaNet kernels."""
from __future__ import annotations

import triton
import triton.language as tl
import torch

from .reference import infer_dims

__all__ = ["infer_dims", "check_inputs", "next_pow2"]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round an fp32 value to the activation dtype and back (transformers' rounding points).

    bf16 uses explicit round-to-nearest-even on the bits: exact on GPU, and the Triton CPU
    interpreter (which truncates on fp32 -> bf16 casts) then agrees with torch.
    """
    if DT == tl.float32:
        return x
    elif DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        u = (u >> 16) << 16
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus(beta=1, threshold=20); exp(x) for x << 0 keeps relative accuracy
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _gate_scalars(b_ptr, a_ptr, A_log_ptr, dt_bias_ptr, off_bt, j, DT: tl.constexpr):
    """beta = sigmoid(b) (rounded like transformers), g = -exp(A_log) * softplus(a + dt_bias) in fp32."""
    bb = tl.load(b_ptr + off_bt).to(tl.float32)
    aa = tl.load(a_ptr + off_bt).to(tl.float32)
    beta = _rnd(tl.sigmoid(bb), DT)
    g = -tl.exp(tl.load(A_log_ptr + j).to(tl.float32)) * _softplus(aa + tl.load(dt_bias_ptr + j).to(tl.float32))
    return beta, g


def check_inputs(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                 num_k_heads):
    """Validate shapes / dtypes / contiguity; return (B, T, C, Hk, Hv, Dk, Dv, K)."""
    B, T, C, Hk, Hv, Dk, Dv, K = infer_dims(qkv, z, conv_weight, num_k_heads)
    expect = {
        "b": (b, (B, T, Hv)), "a": (a, (B, T, Hv)), "A_log": (A_log, (Hv,)), "dt_bias": (dt_bias, (Hv,)),
        "norm_weight": (norm_weight, (Dv,)), "conv_state": (conv_state, (B, C, K - 1)),
        "recurrent_state": (recurrent_state, (B, Hv, Dk, Dv)),
    }
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if recurrent_state.dtype != torch.float32:
        raise TypeError("recurrent_state must be float32")
    for name, t in dict(qkv=qkv, z=z, b=b, a=a, conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias,
                        norm_weight=norm_weight, conv_state=conv_state,
                        recurrent_state=recurrent_state).items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if K < 1:
        raise ValueError("conv kernel size must be >= 1")
    return B, T, C, Hk, Hv, Dk, Dv, K
