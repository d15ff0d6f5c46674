"""Ahead-of-time compilation of the GatedDeltaNet Triton kernels to PTX, on a machine without a GPU.

``compile_kernel`` compiles one kernel for one target with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; ``compile_targets``
does it for every target and returns ``{cc: AotKernel}`` (PTX text, kernel name, shared
memory bytes, num_warps, ...), which is what the TensorRT plugin (trt_plugin.py) embeds.

Kernel ABI (what the plugin launches): pointer parameters in docs/OPS.md order
``qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state``,
then the int32 scalars (prefill: ``T``; decode: none), then the outputs
``y, conv_state_out, recurrent_state_out``. Grid (Hv, B, 1), block (32*num_warps, 1, 1),
dynamic shared memory ``shared_mem`` bytes. Sizes and norm_eps are compiled in.

Compilation, hidden-parameter stripping and ptxas checks are the shared ``plugins/_triton.py``
(targets and shared-memory limits: the GPU table, compile/build/targets.py). The PTX ISA
version defaults to what the bundled ptxas supports (8.8 for < 90, 9.x above), which needs a
driver at least that new to JIT; ``ptx_version`` (e.g. 87) lowers it for older drivers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from .._triton import TARGETS, AotKernel, KernelSpec, compile_spec, interpreting, verify_ptx
from ...build.targets import smem_limit

__all__ = ["TARGETS", "AotKernel", "kernel_signature", "compile_kernel", "compile_targets", "verify_ptx"]

_TYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}
_FP32_PARAMS = ("A_log_ptr", "s_ptr", "so_ptr")
_SCALARS = {"T": "i32"}


def _kernel_and_meta(kind: str, cfg: dict, meta_kw: dict):
    if kind == "decode":
        from .decode import decode_meta, gdn_decode_kernel
        return gdn_decode_kernel, decode_meta(*cfg.values())
    if kind == "prefill":
        from .prefill import gdn_prefill_kernel, prefill_meta
        return gdn_prefill_kernel, prefill_meta(*cfg.values(), **meta_kw)  # act_dtype in meta_kw
    raise ValueError(f"unknown kernel kind {kind!r}")


def kernel_signature(kernel, constexprs: dict, act_dtype: str = "bf16") -> dict[str, str]:
    """Triton signature: activations/weights in ``act_dtype``, A_log and states fp32, T int32."""
    act = _TYPES[str(act_dtype).replace("torch.", "")]
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _SCALARS:
            sig[name] = _SCALARS[name]
        else:
            sig[name] = "*fp32" if name in _FP32_PARAMS else f"*{act}"
    return sig


def _compile_in_subprocess(kwargs: dict) -> AotKernel:
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects: compile in a clean process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json,sys,dataclasses\n"
            "from qcn.compile.plugins.gated_deltanet.aot import compile_kernel\n"
            "k = compile_kernel(**json.loads(sys.stdin.read()))\n"
            "sys.stdout.write(json.dumps(dataclasses.asdict(k)))\n")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(kwargs), capture_output=True, text=True,
                       env=env)
    if r.returncode:
        raise RuntimeError(f"AOT compile subprocess failed:\n{r.stderr[-4000:]}")
    d = json.loads(r.stdout)
    d["params"] = tuple(d["params"])
    return AotKernel(**d)


def compile_kernel(kind: str, *, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                   conv_kernel: int, norm_eps: float = 1e-6, act_dtype: str = "bf16", target: int = 90,
                   ptx_version: int | None = None, strip_hidden: bool = True, **meta_kw) -> AotKernel:
    """Compile the ``kind`` kernel ("decode" or "prefill") for compute capability ``target``.

    ``meta_kw`` goes to ``prefill_meta`` (block_v, dot_precision, inv_precision); without
    block_v the prefill tile configurations of ``prefill.CONFIG_FALLBACKS`` are tried in
    order until one fits the shared memory of ``target`` (the GPU table). Works with TRITON_INTERPRET=1 too
    (compiles in a subprocess without it).
    """
    if interpreting():
        return _compile_in_subprocess(dict(kind=kind, num_k_heads=num_k_heads, num_v_heads=num_v_heads,
                                           head_k_dim=head_k_dim, head_v_dim=head_v_dim, conv_kernel=conv_kernel,
                                           norm_eps=norm_eps, act_dtype=act_dtype, target=target,
                                           ptx_version=ptx_version, strip_hidden=strip_hidden, **meta_kw))
    import time

    cfg = dict(Hk=num_k_heads, Hv=num_v_heads, Dk=head_k_dim, Dv=head_v_dim, K=conv_kernel, norm_eps=norm_eps)
    limit = smem_limit(int(target))
    if kind == "prefill" and "block_v" not in meta_kw:
        from .prefill import CONFIG_FALLBACKS
        candidates = [dict(meta_kw, act_dtype=act_dtype, **fb) for fb in CONFIG_FALLBACKS]
    else:
        candidates = [dict(meta_kw, act_dtype=act_dtype) if kind == "prefill" else dict(meta_kw)]
    t0 = time.perf_counter()
    for i, kw in enumerate(candidates):
        kernel, meta = _kernel_and_meta(kind, cfg, kw)
        const = meta["constexprs"]
        spec = KernelSpec(f"gdn_{kind}", kernel, kernel_signature(kernel, const, act_dtype), const,
                          num_warps=meta["num_warps"], num_stages=meta["num_stages"])
        k = compile_spec(spec, int(target), strip_hidden=strip_hidden, ptx_version=ptx_version, check_smem=False)
        if k.shared_mem <= limit:
            break
        if i + 1 == len(candidates):
            raise RuntimeError(f"{kind} kernel needs {k.shared_mem} B shared memory > {limit} on sm_{target}")
    return dataclasses.replace(k, seconds=time.perf_counter() - t0)  # including configurations rejected for smem


def compile_targets(kind: str, targets=TARGETS, **cfg) -> dict[int, AotKernel]:
    """``{cc: AotKernel}`` for every target; ``cfg`` as for :func:`compile_kernel`."""
    return {int(cc): compile_kernel(kind, target=int(cc), **cfg) for cc in targets}


if __name__ == "__main__":  # python -m qcn.compile.plugins.gated_deltanet.aot [targets...]
    tg = [int(x) for x in sys.argv[1:]] or list(TARGETS)
    real = dict(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, conv_kernel=4)
    for kd in ("decode", "prefill"):
        for cc, k in compile_targets(kd, tg, **real).items():
            print(f"{kd:8s} sm_{cc:<4d} {k.ptx_target:8s} ptx {k.ptx_version} {k.seconds:6.1f}s "
                  f"shared {k.shared_mem:6d} B warps {k.num_warps} BV {k.constexprs.get('BV')} "
                  f"ptx {len(k.ptx) / 1e3:.0f} kB", flush=True)
