"""Which passes run for which target, in order: the pass table.

Each row is one pass (one rewrite rule in its own file). A target runs the rows whose
``modules`` include its module; for the others the passes stage still writes a report line
that names the pass, counts the nodes it would have matched, and says why it does not apply.

Today's table (docs/PASSES.md):
  lower_gated_deltanet, lower_moe, lower_cached_attention   full TensorRT only (`tensorrt`):
      qcn ops -> the ops' AOT TensorRT plugins (the op registry's rows, plugins/registry.py).
      onnxruntime (target cpu) and tensorrt_rtx (no plugin path) run the ops' ONNX function
      bodies, so these passes do not apply there.
  fuse_rms_norm (fusions, rtx), cpu_gated_deltanet, cpu_moe (cpu lowerings): onnxruntime rows
      (docs/PASSES.md).
Quantization (FP8/INT4), fusions and CPU
lowerings are rows to add here: ``PassSpec(name, rule factory, modules)``, placed before
the plugin lowerings (a lowering must see the final weight formats).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .base import QcnRule

WHY_NOT = {
    "onnxruntime": "onnxruntime runs the op's ONNX function body or a cpu_* lowering's form (no plugins on this target)",
    "tensorrt_rtx": "TensorRT-RTX has no plugin path; its ONNX parser inlines the op's function body",
}


@dataclass(frozen=True)
class PassSpec:
    name: str
    make: Callable[[dict | None], QcnRule]   # config pinned by earlier registrations (None: free)
    modules: tuple[str, ...]                  # target modules the pass runs for
    root: tuple[str, str]                     # (domain, op_type) its pattern roots at
    summary: str
    reasons: Mapping[str, str] = field(default_factory=dict)  # module -> why the pass does not run there

    def why_not(self, module: str) -> str | None:
        """None when the pass runs for ``module``; otherwise the reason it does not."""
        if module in self.modules:
            return None
        return self.reasons.get(module) or WHY_NOT.get(module, f"runs for {list(self.modules)} only, not {module}")


# --- fusions (rtx): first, before quantization (a quantization rule sees fused MatMuls) ----------
# Each is kept because it measurably helps a backend; docs/PASSES.md "Fusions" has the numbers.

def fusions() -> tuple[PassSpec, ...]:
    from .fuse_rms_norm import FuseRmsNorm

    return (
        PassSpec("fuse_rms_norm", FuseRmsNorm, ("onnxruntime",), ("", "Mul"),
                 "the export's 7-node RMSNorm -> opset-23 RMSNormalization",
                 reasons={"tensorrt_rtx": "no gain measured: TensorRT-RTX fuses the 7-node form itself (the tiny "
                                          "model's engine has 177 layers with or without this pass)",
                          "tensorrt": "not verified: full TensorRT cannot be installed here"}),
    )


# --- CPU lowerings (cpu): after fusions and quantization, before the plugin lowerings ----------
# qcn ops -> fast forms of standard ONNX ops and ONNX Runtime CPU contrib kernels, equal to the
# function bodies to fp32 rounding (tests/test_cpu_lowering.py); docs/PASSES.md "cpu lowerings".

CPU_ONLY = {m: "a CPU lowering: its fast forms are ONNX Runtime CPU kernels (this target keeps the op for its own "
              "lowering or parser)" for m in ("tensorrt", "tensorrt_rtx")}


def cpu_lowerings() -> tuple[PassSpec, ...]:
    from .cpu_gated_deltanet import CpuGatedDeltaNet
    from .cpu_moe import CpuMoE

    return (
        PassSpec(CpuGatedDeltaNet.pass_name, CpuGatedDeltaNet, ("onnxruntime",), ("qcn", CpuGatedDeltaNet.root_op),
                 "qcn::GatedDeltaNet -> com.microsoft.LinearAttention (gated_delta) + conv/norm in standard ops",
                 CPU_ONLY),
        PassSpec(CpuMoE.pass_name, CpuMoE, ("onnxruntime",), ("qcn", CpuMoE.root_op),
                 "qcn::MoE (float) -> only the selected experts (Unique + Gather + batched MatMul)", CPU_ONLY),
    )


def pass_table() -> tuple[PassSpec, ...]:
    from ..plugins.registry import OPS

    return fusions() + cpu_lowerings() + tuple(
        PassSpec(e.lowering.pass_name, e.lowering, ("tensorrt",), (e.lowering.root_domain, e.lowering.root_op),
                 f"qcn::{e.name} -> its TensorRT AOT plugins") for e in OPS)


def plan_for(module: str) -> list[tuple[PassSpec, str | None]]:
    """Every pass with None (runs) or the reason it does not run for target module ``module``."""
    return [(p, p.why_not(module)) for p in pass_table()]


def plan_identity(module: str) -> list[dict]:
    """What the passes stage's skip key depends on."""
    return [{"pass": p.name, "runs": why is None} for p, why in plan_for(module)]
