"""qcn::GatedDeltaNet (docs/OPS.md): op definition, reference, Triton kernels, AOT PTX, TRT plugin.

Modules (the same in every op folder, compile/plugins/__init__.py): ``op`` (torch op, ONNX
schema, function body), ``reference`` (naive per-token PyTorch, float64 capable; the torch op
calls it), ``launch`` (the kernels' public entry points; kernels in ``decode`` / ``prefill`` /
``common``), ``aot`` (PTX per target without a GPU), ``trt_plugin`` (TensorRT >= 10.9 AOT
plugin). Kernel modules import triton, so they are loaded lazily: the reference does not need it.
"""
from __future__ import annotations

from .reference import gated_deltanet_reference

_LAUNCH = ("gated_deltanet", "gated_deltanet_decode", "gated_deltanet_prefill", "gated_deltanet_verify")

__all__ = [*_LAUNCH, "gated_deltanet_reference"]


def __getattr__(name):
    if name in _LAUNCH:
        from . import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
