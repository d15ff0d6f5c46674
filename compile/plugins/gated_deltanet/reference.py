"""Naive per-token PyTorch reference of ``qcn::GatedDeltaNet`` (see docs/OPS.md).

This is the numerical ground truth for the Triton kernels in this package. It follows
transformers' ``Qwen3NextGatedDeltaNet`` step by step (``causal_conv1d_update``,
``l2norm``, ``torch_recurrent_gated_delta_rule``, ``Qwen3NextRMSNormGated``) but takes
the op's contiguous ``q | k | v`` layout and explicit states, and can run in float64.

Shapes (letters as in docs/OPS.md)::

    qkv             [B, T, C]        C = 2*Hk*Dk + Hv*Dv, activation dtype
    z               [B, T, Hv, Dv]
    b, a            [B, T, Hv]
    conv_weight     [C, K]
    A_log           [Hv]             fp32
    dt_bias         [Hv]
    norm_weight     [Dv]
    conv_state      [B, C, K-1]      last K-1 conv inputs of the previous call
    recurrent_state [B, Hv, Dk, Dv]  fp32
    ->
    y               [B, T, Hv*Dv]    activation dtype (dtype of qkv)
    conv_state_out  [B, C, K-1]      dtype of conv_state
    recurrent_state_out [B, Hv, Dk, Dv] fp32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gated_deltanet_reference", "infer_dims"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def infer_dims(qkv: torch.Tensor, z: torch.Tensor, conv_weight: torch.Tensor, num_k_heads: int):
    """Return (B, T, C, Hk, Hv, Dk, Dv, K) from the op's input shapes, validating them."""
    B, T, C = qkv.shape
    Hv, Dv = z.shape[2], z.shape[3]
    Hk = int(num_k_heads)
    if Hk <= 0 or Hv % Hk:
        raise ValueError(f"num_v_heads={Hv} must be a positive multiple of num_k_heads={Hk}")
    rest = C - Hv * Dv
    if rest <= 0 or rest % (2 * Hk):
        raise ValueError(f"C={C} != 2*Hk*Dk + Hv*Dv for Hk={Hk}, Hv={Hv}, Dv={Dv}")
    Dk = rest // (2 * Hk)
    K = conv_weight.shape[1]
    if tuple(z.shape[:2]) != (B, T) or conv_weight.shape[0] != C:
        raise ValueError("inconsistent z / conv_weight shapes")
    return B, T, C, Hk, Hv, Dk, Dv, K


def gated_deltanet_reference(
    qkv: torch.Tensor,
    z: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
    *,
    num_k_heads: int,
    norm_eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float64,
    emulate_rounding: bool = True,
    per_token_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the op token by token; inputs are not modified.

    ``compute_dtype`` is the precision of every intermediate (float64 for ground truth).
    With ``emulate_rounding`` and 16-bit activations, values are rounded to the activation
    dtype where transformers rounds them (conv output, SiLU output, beta, core output,
    normalised output, weight product, final output), so the result matches transformers
    run in that dtype. Returns ``(y, conv_state_out, recurrent_state_out)``; with
    ``per_token_states`` (the verify form, ``qcn::GatedDeltaNetVerify``) the states after every
    token instead: ``conv_states [B, T, C, K-1]`` and ``recurrent_states [B, T, Hv, Dk, Dv]`` fp32,
    whose entry ``T-1`` is what the plain form returns.
    """
    B, T, C, Hk, Hv, Dk, Dv, K = infer_dims(qkv, z, conv_weight, num_k_heads)
    act = qkv.dtype
    cd = compute_dtype
    rounding = emulate_rounding and act in _LOW_PRECISION

    def rnd(x: torch.Tensor) -> torch.Tensor:
        return x.to(act).to(cd) if rounding else x

    # causal depthwise conv over [conv_state ; qkv], then SiLU
    x = torch.cat([conv_state.to(cd), qkv.transpose(1, 2).to(cd)], dim=-1)  # [B, C, K-1+T]
    conv_state_out = x[:, :, x.shape[-1] - (K - 1):].to(conv_state.dtype).clone()
    w = conv_weight.to(cd)
    conv = torch.zeros(B, C, T, dtype=cd)
    for i in range(K):
        conv += w[None, :, i, None] * x[:, :, i:i + T]
    conv = rnd(F.silu(rnd(conv))).transpose(1, 2)  # [B, T, C]

    q = conv[..., : Hk * Dk].reshape(B, T, Hk, Dk)
    k = conv[..., Hk * Dk: 2 * Hk * Dk].reshape(B, T, Hk, Dk)
    v = conv[..., 2 * Hk * Dk:].reshape(B, T, Hv, Dv)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * Dk ** -0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    group = Hv // Hk
    q = q.repeat_interleave(group, dim=2)  # v head j reads qk head j // group
    k = k.repeat_interleave(group, dim=2)

    beta = rnd(torch.sigmoid(b.to(cd)))
    g = -torch.exp(A_log.to(torch.float32).to(cd)) * F.softplus(a.to(cd) + dt_bias.to(cd))

    S = recurrent_state.to(cd).clone()  # [B, Hv, Dk, Dv]
    o = torch.empty(B, T, Hv, Dv, dtype=cd)
    states = []
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None, None]
        kv = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta = beta[:, t, :, None] * (v[:, t] - kv)
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        if per_token_states:
            states.append(S.to(torch.float32))

    # gated RMSNorm (not zero-centred): w * rmsnorm(o) * silu(z)
    o = rnd(o)
    o_hat = rnd(o * torch.rsqrt((o * o).mean(-1, keepdim=True) + norm_eps))
    y = rnd(norm_weight.to(cd) * o_hat) * F.silu(z.to(cd))
    y = y.reshape(B, T, Hv * Dv).to(act)
    if per_token_states:  # the conv state after token t is x[:, :, t+1 : t+K]
        conv_states = torch.stack([x[:, :, t + 1:t + K] for t in range(T)], dim=1).to(conv_state.dtype)
        return y, conv_states, torch.stack(states, dim=1)
    return y, conv_state_out, S.to(torch.float32)
