"""Full TensorRT (>= 10.9) only: lower the qcn nodes to the kernels' AOT plugins, register them.

The exported ONNX has single nodes ``qcn::GatedDeltaNet`` / ``qcn::MoE`` /
``qcn::CachedAttention`` with function bodies. The kernels are registered with
``tensorrt.plugin`` (+ ``aot_impl``: PTX embedded in the engine) under other names, and MoE
and attention as chains of plugins (``plugins/*/trt_plugin.py``). Before parsing,
:func:`lower_for_tensorrt` runs the three passes of ``compile/passes`` (lower_gated_deltanet,
lower_moe, lower_cached_attention): each rewrites the nodes its kernels support into the
plugin nodes and leaves the others alone, so the parser inlines their function bodies.
:func:`register_plugins` then registers exactly the plugins the lowered graph uses, for the
recipe's compute capability, importing ``tensorrt`` lazily. :func:`prepare` does both for the
build stage and gives the lowered model as bytes (parsed with the original path, so the
external weights resolve).

tensorrt_rtx targets: nothing (no plugin path in TensorRT-RTX, shared/design/FINDINGS.md).

NOT EXECUTED: full TensorRT is not installable here and there is no GPU, so no engine was
ever parsed or built with these plugins; the plugin nodes and registrations were checked on
CPU against a stub of ``tensorrt.plugin`` only (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from ..passes._lowering import PLUGIN_DOMAIN, GraphContext, PassResult
from ..passes.lower_cached_attention import LowerCachedAttention
from ..passes.lower_gated_deltanet import LowerGatedDeltaNet
from ..passes.lower_moe import LowerMoE

__all__ = ["LoweringReport", "PluginBuild", "lower_for_tensorrt", "register_plugins", "prepare", "cc_int"]

PASSES = {"GatedDeltaNet": LowerGatedDeltaNet, "MoE": LowerMoE, "CachedAttention": LowerCachedAttention}
_REGISTERED: dict[str, tuple] = {}  # op -> (cc, config): TensorRT registers a plugin id once per process


@dataclass
class LoweringReport:
    results: dict[str, PassResult] = field(default_factory=dict)  # op -> its pass's result

    @property
    def plugins(self) -> list[str]:
        return sorted(set().union(*(r.plugins for r in self.results.values())))

    def counts(self) -> dict[str, dict[str, int]]:
        return {op: r.counts() for op, r in self.results.items()}

    def to_dict(self) -> dict:
        return {"counts": self.counts(), "plugins": self.plugins,
                "refused": [{"op": op, "node": n, "reason": why} for op, r in self.results.items() for n, why in r.refused],
                "configs": {op: r.config for op, r in self.results.items() if r.config is not None}}


def lower_for_tensorrt(model: onnx.ModelProto, configs: dict | None = None) -> LoweringReport:
    """Rewrite ``model`` in place; ``configs`` (op -> registration config) pins what is already
    registered in this process. Functions no node uses any more are dropped."""
    configs = configs or {}
    ctx = GraphContext(model)
    report = LoweringReport()
    for op, cls in PASSES.items():
        report.results[op] = cls(configs.get(op))(model, ctx)
    if any(r.rewritten for r in report.results.values()):
        if not any(o.domain == PLUGIN_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
        used = {(n.domain, n.op_type) for n in model.graph.node}
        keep = [f for f in model.functions if (f.domain, f.name) in used]
        del model.functions[:]
        model.functions.extend(keep)
    return report


def cc_int(compute_capability: str | int) -> int:
    """"9.0" -> 90, "12.0" -> 120, 89 -> 89."""
    if isinstance(compute_capability, int):
        return compute_capability
    major, _, minor = str(compute_capability).partition(".")
    return int(major) * 10 + int(minor or 0)


def register_plugins(report: LoweringReport, cc: int) -> list[str]:
    """Register the plugins ``report``'s graph uses for compute capability ``cc`` (imports
    ``tensorrt`` lazily, through the trt_plugin modules). Returns the plugin ids."""
    for op, res in report.results.items():
        if not res.rewritten:
            continue
        key = (cc, tuple(sorted(res.config.items())))
        if op in _REGISTERED:
            if _REGISTERED[op] != key:
                raise RuntimeError(f"{op} plugins are already registered in this process with {_REGISTERED[op]}; "
                                   f"this graph needs {key} (TensorRT registers a plugin id once: use a new process)")
            continue
        cfg = dict(res.config)
        if op == "GatedDeltaNet":
            from ..plugins.gated_deltanet import trt_plugin as gdn

            gdn.register(cc)
        elif op == "MoE":
            from ..plugins.moe.trt_plugin import register_moe_plugins

            register_moe_plugins(cc, **cfg)
        elif op == "CachedAttention":
            from ..plugins.attention.trt_plugin import register_attention_plugins

            act = cfg.pop("act")
            register_attention_plugins(cc, act=act, caches=(act,), **cfg)
        _REGISTERED[op] = key
    return report.plugins


@dataclass
class PluginBuild:
    model_bytes: bytes
    report: LoweringReport
    cc: int

    @property
    def plugins(self) -> list[str]:
        return self.report.plugins

    def manifest(self) -> dict:
        return dict(self.report.to_dict(), compute_capability=self.cc, domain=PLUGIN_DOMAIN)


def prepare(module: str, onnx_path: Path, compute_capability: str | int) -> PluginBuild | None:
    """For a full-TensorRT build: the lowered ONNX (bytes; external data still referenced
    relative to ``onnx_path``) with its plugins registered. None for tensorrt_rtx."""
    if module != "tensorrt":
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    cc = cc_int(compute_capability)
    report = lower_for_tensorrt(model, {op: dict(k[1]) for op, k in _REGISTERED.items() if k[0] == cc})
    register_plugins(report, cc)
    return PluginBuild(model.SerializeToString(), report, cc)
