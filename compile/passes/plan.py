"""Which passes run for which target and recipe, in order: the pass table.

Each row is one pass (one rewrite rule in its own file). A target runs the rows whose
``modules`` include its module and whose ``wanted`` (a function of the recipe's quantization
options) says yes; for the others the passes stage still writes a report line that names the
pass, counts the nodes it would have matched, and says why it does not run.

Order (docs/PASSES.md): fusions -> quantization -> CPU lowerings -> TensorRT plugin lowerings
(a lowering must see the final weight formats). Each helper adds its rows in its own section of
:func:`pass_table`.

What a precision needs is data too: a row's ``provides`` lists the recipe settings it
implements (``("weights", "fp8")``); preflight refuses a recipe setting no row of the target's
module provides (:func:`missing_passes`), so a pass that lands is usable without touching
preflight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from .base import QcnRule

if TYPE_CHECKING:
    from ..recipe import QuantizationOptions
    from .context import PassContext

WHY_NOT = {
    "onnxruntime": "onnxruntime runs the op's ONNX function body or a cpu_* lowering's form (no plugins on this target)",
    "tensorrt_rtx": "TensorRT-RTX has no plugin path; its ONNX parser inlines the op's function body",
}
ALL_MODULES = ("onnxruntime", "tensorrt", "tensorrt_rtx")


def _always(q: "QuantizationOptions") -> str | None:
    return None


@dataclass(frozen=True)
class PassSpec:
    name: str
    make: Callable[["PassContext"], QcnRule]  # the rule for one graph (ctx: recipe options, weights, ranges)
    modules: tuple[str, ...]                  # target modules the pass runs for
    root: tuple[str, str]                     # (domain, op_type) its pattern roots at
    summary: str
    wanted: Callable[["QuantizationOptions"], str | None] = _always  # None: wanted; else why not
    provides: tuple[tuple[str, str], ...] = ()  # recipe settings (quantization.<key>, value) it implements
    # activation tensors to calibrate before the rule runs on the prefill graph: model -> {key: tensor}
    calibrate: Callable | None = field(default=None)
    reasons: Mapping[str, str] = field(default_factory=dict)  # module -> why the pass does not run there

    def why_not(self, module: str, quant: "QuantizationOptions | None" = None) -> str | None:
        """None when the pass runs for ``module`` and these options; otherwise the reason it does not."""
        if module not in self.modules:
            return self.reasons.get(module) or WHY_NOT.get(module, f"runs for {list(self.modules)} only, not {module}")
        if quant is not None:
            return self.wanted(quant)
        return None


def _lowerings() -> tuple[PassSpec, ...]:
    from ..plugins.registry import OPS

    return tuple(PassSpec(e.lowering.pass_name, lambda ctx, cls=e.lowering: cls(None), ("tensorrt",),
                          (e.lowering.root_domain, e.lowering.root_op), f"qcn::{e.name} -> its TensorRT AOT plugins")
                 for e in OPS)


def _quantization() -> tuple[PassSpec, ...]:
    # --- quant (issue #10 parts 1, 4): FP8 W8A8 projections, FP8 experts ---
    from .quant import fp8_activations, fp8_experts, fp8_projection

    rows = [fp8_projection.SPEC, fp8_activations.SPEC, fp8_experts.SPEC]
    # --- int4 (issue #11): INT4 weight-only projections and experts, then their CPU forms ---
    from .quant import int4_rows

    rows += list(int4_rows.ROWS)
    # --- the 8-bit lm_head (issue #12): its own row, after the INT4 ones (which keep lm_head) ---
    from .quant import int8_cpu_lm_head

    rows.append(int8_cpu_lm_head.SPEC)
    # --- fp8x (issue #10 part 3): the FP8 KV cache, after the weight rows (it calibrates the new K/V of the
    # graph with quantized weights: what the cache will hold) ---
    from .quant import kv_fp8

    rows.append(kv_fp8.SPEC)
    return tuple(rows)


# --- fusions (rtx): first, before quantization (a quantization rule sees fused MatMuls) ----------
# Each is kept because it measurably helps a backend; docs/PASSES.md "Fusions" has the numbers.

def fusions() -> tuple[PassSpec, ...]:
    from .fuse_rms_norm import FuseRmsNorm

    return (
        PassSpec("fuse_rms_norm", lambda ctx: FuseRmsNorm(None), ("onnxruntime",), ("", "Mul"),
                 "the export's 7-node RMSNorm -> opset-23 RMSNormalization",
                 reasons={"tensorrt_rtx": "no gain measured: TensorRT-RTX fuses the 7-node form itself (the tiny "
                                          "model's engine has 177 layers with or without this pass)",
                          "tensorrt": "not verified: full TensorRT cannot be installed here"}),
    )


# --- TensorRT-RTX lowerings (rtx): after quantization, for the forms TensorRT-RTX's parser cannot inline ---

def rtx_lowerings() -> tuple[PassSpec, ...]:
    from .lower_moe_rtx import LowerMoeRtx

    return (
        PassSpec("lower_moe_rtx", lambda ctx: LowerMoeRtx(None), ("tensorrt_rtx",), ("qcn", "MoE"),
                 "quantized qcn::MoE -> its weights' DequantizeLinear in the graph + the float qcn::MoE "
                 "(TensorRT-RTX cannot inline a body with DequantizeLinear twice, nor pick an overload)",
                 reasons={"onnxruntime": "ONNX Runtime runs the quantized MoE body (function overloads) as it is",
                          "tensorrt": "full TensorRT lowers qcn::MoE to its plugins (lower_moe)"}),
    )


# --- CPU lowerings (cpu): after fusions and quantization, before the plugin lowerings ----------
# qcn ops -> fast forms of standard ONNX ops and ONNX Runtime CPU contrib kernels, equal to the
# function bodies to fp32 rounding (tests/test_cpu_lowering.py); docs/PASSES.md "cpu lowerings".

CPU_ONLY = {m: "a CPU lowering: its fast forms are ONNX Runtime CPU kernels (this target keeps the op for its own "
              "lowering or parser)" for m in ("tensorrt", "tensorrt_rtx")}


def cpu_lowerings() -> tuple[PassSpec, ...]:
    from .cpu_gated_deltanet import CpuGatedDeltaNet
    from .cpu_moe import CpuMoE
    from .cpu_moe_ort import CpuMoeOrt

    return (
        PassSpec(CpuGatedDeltaNet.pass_name, lambda ctx: CpuGatedDeltaNet(None), ("onnxruntime",), ("qcn", CpuGatedDeltaNet.root_op),
                 "qcn::GatedDeltaNet -> com.microsoft.LinearAttention (gated_delta) + conv/norm in standard ops",
                 reasons=CPU_ONLY),
        PassSpec(CpuMoeOrt.pass_name, lambda ctx: CpuMoeOrt(add=lambda op, t: ctx.weights.add_tensor(op, t)),
                 ("onnxruntime",), ("qcn", CpuMoeOrt.root_op),
                 "qcn::MoE (float) -> com.microsoft.MoE (routed experts read in place) + the shared expert",
                 reasons=CPU_ONLY),
        PassSpec(CpuMoE.pass_name, lambda ctx: CpuMoE(None), ("onnxruntime",), ("qcn", CpuMoE.root_op),
                 "qcn::MoE (float) -> only the selected experts (Unique + Gather + batched MatMul)",
                 reasons=CPU_ONLY),
    )


def pass_table() -> tuple[PassSpec, ...]:
    return fusions() + _quantization() + cpu_lowerings() + rtx_lowerings() + _lowerings()


def plan_for(module: str, quant: "QuantizationOptions | None" = None) -> list[tuple[PassSpec, str | None]]:
    """Every pass with None (runs) or the reason it does not run for target module ``module``
    and the recipe's quantization options ``quant`` (default: nothing quantized)."""
    if quant is None:
        from ..recipe import QuantizationOptions

        quant = QuantizationOptions()
    return [(p, p.why_not(module, quant)) for p in pass_table()]


def plan_identity(module: str, quant: "QuantizationOptions | None" = None) -> list[dict]:
    """What the passes stage's skip key depends on (which passes run, in order)."""
    return [{"pass": p.name, "runs": why is None} for p, why in plan_for(module, quant)]


QUANT_DEFAULTS = {"weights": "none", "experts": "none", "kv_cache": "activation", "lm_head": "none"}


def missing_passes(module: str, quant: "QuantizationOptions") -> list[tuple[str, str, list[str]]]:
    """(recipe key, value, modules that have a pass for it) for each quantization setting no
    pass of target module ``module`` implements."""
    table = pass_table()
    out = []
    for key, default in QUANT_DEFAULTS.items():
        value = getattr(quant, key)
        if value == default:
            continue
        rows = [p for p in table if (key, value) in p.provides]
        if not any(module in p.modules for p in rows):
            out.append((key, value, sorted({m for p in rows for m in p.modules})))
    return out
