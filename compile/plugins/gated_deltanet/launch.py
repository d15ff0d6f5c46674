"""Public entry points of the qcn::GatedDeltaNet Triton kernels (imports triton).

The kernels and their launchers live in ``decode.py`` (fused T = 1 step), ``prefill.py``
(chunked WY form, any T) and ``verify.py`` (the speculative verify form: T = N+1 tokens, the
states after every token), with shared helpers in ``common.py``.
"""
from __future__ import annotations

from .decode import gated_deltanet_decode
from .prefill import gated_deltanet_prefill
from .verify import gated_deltanet_verify

__all__ = ["gated_deltanet", "gated_deltanet_decode", "gated_deltanet_prefill", "gated_deltanet_verify"]


def gated_deltanet(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, *,
                   num_k_heads: int, norm_eps: float = 1e-6, **kw):
    """``qcn::GatedDeltaNet``: the decode kernel for T == 1, the chunked kernel otherwise.

    Shapes as in docs/OPS.md: qkv [B,T,C], z [B,T,Hv,Dv], b/a [B,T,Hv], conv_weight [C,K], A_log [Hv]
    fp32, dt_bias [Hv], norm_weight [Dv], conv_state [B,C,K-1], recurrent_state [B,Hv,Dk,Dv] fp32
    (updated in place). Returns (y [B,T,Hv*Dv], conv_state_out [B,C,K-1], recurrent_state).
    """
    fn = gated_deltanet_decode if qkv.shape[1] == 1 and not kw else gated_deltanet_prefill
    return fn(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
              num_k_heads=num_k_heads, norm_eps=norm_eps, **kw)
