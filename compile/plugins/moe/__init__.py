"""qcn::MoE (files as in every op folder, compile/plugins/__init__.py): the op definition
(``op.py``), the reference (``reference.py``), the Triton kernels (decode GEMV-style path,
prefill grouped-GEMM path; dense, FP8 per-channel and INT4 group-128 weights; ``kernels.py``,
entry points ``launch.py``), quantize helpers (``quant.py``), AOT specs (``aot.py``) and
TensorRT plugin registration (``trt_plugin.py``).

The reference and the quantize helpers need only torch; the kernel entry points (``launch``)
import triton on first use.
"""

from .quant import (
    dequantize_fp8_rowwise,
    dequantize_int4_groupwise,
    pack_int4,
    quantize_fp8_rowwise,
    quantize_int4_groupwise,
    quantize_moe_weights,
    unpack_int4,
)
from .reference import moe_reference, route_reference

_OPS = ("DECODE_MAX_TOKENS", "WEIGHT_FORMATS", "MoEConfig", "moe_forward", "moe_route")

__all__ = [
    *_OPS, "moe_reference", "route_reference",
    "quantize_fp8_rowwise", "dequantize_fp8_rowwise", "pack_int4", "unpack_int4",
    "quantize_int4_groupwise", "dequantize_int4_groupwise", "quantize_moe_weights",
]


def __getattr__(name):
    if name in _OPS:
        from . import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
