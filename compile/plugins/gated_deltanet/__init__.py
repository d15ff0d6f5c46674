"""GatedDeltaNet (``qcn::GatedDeltaNet``, docs/OPS.md): reference, Triton kernels, AOT PTX, TRT plugin.

Modules: ``reference`` (naive per-token PyTorch, float64 capable), ``decode`` (fused T = 1
step), ``prefill`` (chunked WY form, any T), ``aot`` (PTX per target without a GPU),
``trt_plugin`` (TensorRT >= 10.9 AOT plugin). Kernel modules import triton, so they are
loaded lazily: ``from qcn.compile.plugins.gated_deltanet import gated_deltanet`` needs
triton, the reference does not.
"""
from __future__ import annotations

from .reference import gated_deltanet_reference

__all__ = ["gated_deltanet", "gated_deltanet_decode", "gated_deltanet_prefill", "gated_deltanet_reference"]


def gated_deltanet(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, *,
                   num_k_heads: int, norm_eps: float = 1e-6, **kw):
    """``qcn::GatedDeltaNet``: the decode kernel for T == 1, the chunked kernel otherwise.

    Shapes as in docs/OPS.md: qkv [B,T,C], z [B,T,Hv,Dv], b/a [B,T,Hv], conv_weight [C,K], A_log [Hv]
    fp32, dt_bias [Hv], norm_weight [Dv], conv_state [B,C,K-1], recurrent_state [B,Hv,Dk,Dv] fp32
    (updated in place). Returns (y [B,T,Hv*Dv], conv_state_out [B,C,K-1], recurrent_state).
    """
    if qkv.shape[1] == 1 and not kw:
        from .decode import gated_deltanet_decode as fn
    else:
        from .prefill import gated_deltanet_prefill as fn
    return fn(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
              num_k_heads=num_k_heads, norm_eps=norm_eps, **kw)


def __getattr__(name):
    if name == "gated_deltanet_decode":
        from .decode import gated_deltanet_decode
        return gated_deltanet_decode
    if name == "gated_deltanet_prefill":
        from .prefill import gated_deltanet_prefill
        return gated_deltanet_prefill
    raise AttributeError(name)
