"""TensorRT (>= 10.9, full TensorRT, not TensorRT-RTX) AOT plugin for ``qcn::GatedDeltaNet``.

UNTESTED HERE: this machine has neither a GPU nor full TensorRT, so this module has only
been imported, never built into an engine. It follows the Quickly Deployable Plugin API
(``tensorrt.plugin``: ``@trtp.register`` + ``@trtp.aot_impl``, as in TensorRT's
``quickly_deployable_plugins`` sample): the Triton kernel is compiled to PTX at engine
build time and embedded in the engine, so the engine runs without Python.

Use: call :func:`register` once (before parsing the ONNX); the ONNX node needs
``op_type="GatedDeltaNet"``, attribute ``plugin_namespace="qcn"`` and ``aot=1`` for the
parser to pick the AOT implementation. T == 1 (constant) embeds the decode kernel,
anything else the chunked prefill kernel. ``register(cc, ptx_version)`` takes the recipe's
target compute capability (the build stage passes it; None = the build GPU's) and optionally a
PTX ISA version (e.g. 84) for drivers older than the CUDA 13 one Triton 3.9 targets by default (checked with
ptxas: 8.4 for sm_90a, 8.7 for sm_120a, 8.0 for sm_80 assemble). Outputs: y, conv_state_out (a separate buffer: it
must not alias conv_state), recurrent_state_out (aliased to recurrent_state: updated in
place). Points to check on a real build: the hidden Triton scratch parameters are stripped
from the PTX (_triton.strip_hidden_params), and the prefill kernel's dynamic shared memory
above 48 KiB must be accepted by TensorRT's launcher for the target.
"""
from __future__ import annotations

__all__ = ["PLUGIN_ID", "register"]

PLUGIN_ID = "qcn::GatedDeltaNet"
_registered: tuple | None = None


def _build_gpu_cc() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def register(cc: int | None = None, ptx_version: int | None = None) -> None:
    """Register ``qcn::GatedDeltaNet`` with TensorRT's plugin registry for compute capability
    ``cc`` (None: the GPU the engine is built on). TensorRT registers a plugin id once per
    process, so a second call with other arguments is an error."""
    global _registered
    if _registered is not None:
        if _registered != (cc, ptx_version):
            raise RuntimeError(f"{PLUGIN_ID} is already registered for (cc, ptx_version) = {_registered}; "
                               f"asked for {(cc, ptx_version)}: use a new process")
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from .aot import TARGETS, compile_kernel

    @trtp.register(PLUGIN_ID)
    def _desc(qkv: trtp.TensorDesc, z: trtp.TensorDesc, b: trtp.TensorDesc, a: trtp.TensorDesc,
              conv_weight: trtp.TensorDesc, A_log: trtp.TensorDesc, dt_bias: trtp.TensorDesc,
              norm_weight: trtp.TensorDesc, conv_state: trtp.TensorDesc, recurrent_state: trtp.TensorDesc,
              num_k_heads: int, norm_eps: float):
        hv, dv = z.shape_expr[2], z.shape_expr[3]
        y = trtp.from_shape_expr((qkv.shape_expr[0], qkv.shape_expr[1], hv * dv), dtype=qkv.dtype)
        return y, conv_state.like(), recurrent_state.aliased()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                  outputs):
        act = "BF16|FP16|FP32"
        # positions: 10 inputs then y, conv_state_out, recurrent_state_out
        types = [act] * 5 + ["FP32"] + [act] * 3 + ["FP32", act, act, "FP32"]
        return [trtp.AutoTuneCombination(", ".join(types))]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
             num_k_heads: int, norm_eps: float, outputs, tactic):
        def const(e, what):
            if not e.is_constant:
                raise ValueError(f"qcn::GatedDeltaNet needs a build-time constant {what}")
            return int(e.constant_value())

        hv, dv = const(z.shape_expr[2], "Hv"), const(z.shape_expr[3], "Dv")
        c, kconv = const(qkv.shape_expr[2], "C"), const(conv_weight.shape_expr[1], "K")
        hk = int(num_k_heads)
        dk = (c - hv * dv) // (2 * hk)
        t_expr = qkv.shape_expr[1]
        kind = "decode" if (t_expr.is_constant and t_expr.constant_value() == 1) else "prefill"
        act = {trt.bfloat16: "bf16", trt.float16: "fp16", trt.float32: "fp32"}[qkv.dtype]
        target = cc if cc is not None else _build_gpu_cc()
        if target not in TARGETS:
            target = max((t for t in TARGETS if t <= target), default=TARGETS[0])
        k = compile_kernel(kind, num_k_heads=hk, num_v_heads=hv, head_k_dim=dk, head_v_dim=dv,
                           conv_kernel=kconv, norm_eps=float(norm_eps), act_dtype=act, target=target,
                           ptx_version=ptx_version)

        launch = trtp.KernelLaunchParams()
        launch.grid_x = hv
        launch.grid_y = qkv.shape_expr[0]
        launch.block_x = k.num_warps * 32
        launch.shared_mem = k.shared_mem
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(t_expr)])  # the kernels' one scalar: T
        return k.kernel_name.encode(), k.ptx.encode(), launch, extra_args

    _registered = (cc, ptx_version)
