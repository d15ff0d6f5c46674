"""The op registry: one row per ``qcn`` op, carrying everything the pipeline does with it.

  export    the op's :class:`~.onnx_function.QcnOp` (torch op, schema, function body), from
            ``plugins/<op>/op.py``; the exporter emits every row's op
  lowering  the passes-stage rule that rewrites the op into its TensorRT plugins
            (``passes/lower_<op>.py``); the passes stage runs every row's lowering
  register  ``register(cc, config)``: registers those plugins with TensorRT for compute
            capability ``cc`` and the lowering's config (imports ``tensorrt`` lazily, through
            ``plugins/<op>/trt_plugin.py``); the build stage calls it for every row whose
            lowering rewrote something

A new op is one folder under ``plugins/`` (docs/OPS.md) and one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..passes.base import QcnRule
from ..passes.lower_cached_attention import LowerCachedAttention
from ..passes.lower_gated_deltanet import LowerGatedDeltaNet
from ..passes.lower_moe import LowerMoE


def _register_gated_deltanet(cc: int, config: dict) -> None:
    from .gated_deltanet import trt_plugin

    trt_plugin.register(cc)  # one kernel set for every activation dtype: config["act"] is not needed


def _register_moe(cc: int, config: dict) -> None:
    from .moe import trt_plugin

    trt_plugin.register_moe_plugins(cc, **config)


def _register_attention(cc: int, config: dict) -> None:
    from .attention import trt_plugin

    cfg = dict(config)
    act = cfg.pop("act")
    cache = cfg.pop("cache", act)  # "fp8": the FP8-cache split kernel (kv_fp8 pass)
    trt_plugin.register_attention_plugins(cc, act=act, caches=(cache,), **cfg)


@dataclass(frozen=True)
class OpEntry:
    name: str                                   # ONNX op_type in domain "qcn"
    package: str                                # plugins/<package>/
    lowering: type[QcnRule]
    register: Callable[[int, dict], None]

    @property
    def export(self):
        """The op's QcnOp (imports torch and onnxscript)."""
        return importlib.import_module(f"{__package__}.{self.package}.op").OP


OPS: tuple[OpEntry, ...] = (
    OpEntry("GatedDeltaNet", "gated_deltanet", LowerGatedDeltaNet, _register_gated_deltanet),
    OpEntry("MoE", "moe", LowerMoE, _register_moe),
    OpEntry("CachedAttention", "attention", LowerCachedAttention, _register_attention),
)
BY_NAME = {e.name: e for e in OPS}
BY_PASS = {e.lowering.pass_name: e for e in OPS}
