"""qcn::CachedAttention (files as in every op folder, compile/plugins/__init__.py): the op
definition (``op.py``), the reference (``reference.py``), the Triton decode kernels (T = 1:
split-KV flash-decoding over the runtime-owned cache with GQA, a log-sum-exp reduce, bf16/fp32
or fp8 caches; ``kernels.py``, entry points ``launch.py``), AOT specs (``aot.py``) and TensorRT
plugin registration (``trt_plugin.py``).

The reference needs only torch; the kernel entry points (``launch``) import triton on first use.
"""

from .reference import cached_attention_reference

_OPS = ("DecodeAttentionConfig", "cached_attention_decode", "decode_num_splits")

__all__ = [*_OPS, "cached_attention_reference"]


def __getattr__(name):
    if name in _OPS:
        from . import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
