"""qcn::CachedAttention: the op definition (``op.py``: torch op, ONNX schema, function body);
the Triton kernels for qcn::CachedAttention decode (T = 1): split-KV flash-decoding over the
runtime-owned cache with GQA, a log-sum-exp reduce, bf16/fp32 or fp8 caches; the PyTorch
reference, AOT PTX compilation (``aot.py``) and TensorRT plugin registration (``trt_plugin.py``).

The reference needs only torch; the kernel entry points (``ops``) import triton on first use.
"""

from .reference import cached_attention_reference

_OPS = ("DecodeAttentionConfig", "cached_attention_decode", "decode_num_splits")

__all__ = [*_OPS, "cached_attention_reference"]


def __getattr__(name):
    if name in _OPS:
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
