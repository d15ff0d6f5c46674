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

Triton appends two hidden pointer parameters (global and profile scratch) to every kernel;
the GatedDeltaNet kernels use neither (checked: scratch sizes 0 and the parameters never
read), and ``strip_hidden_params`` removes them from the PTX entry so that the parameter
list is exactly what TensorRT passes. Targets: 80, 89, 90, 120 (Triton emits
``.target sm_90a`` / ``sm_120a`` for cc 90 / 120 on its own; there is no way to ask for
"90a" explicitly, GPUTarget wants a number). The PTX ISA version defaults to what the bundled ptxas
supports (8.8 for < 90, 9.x above), which needs a driver at least that new to JIT;
``ptx_version`` (e.g. 87) lowers it for older drivers.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time

__all__ = ["TARGETS", "SMEM_LIMIT", "AotKernel", "kernel_signature", "compile_kernel", "compile_targets",
           "strip_hidden_params", "ptxas_check"]

TARGETS: tuple[int, ...] = (80, 89, 90, 120)
# max dynamic shared memory per block (bytes) by compute capability
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 120: 99 * 1024}
_TYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}
_FP32_PARAMS = ("A_log_ptr", "s_ptr", "so_ptr")
_SCALARS = {"T": "i32"}


@dataclasses.dataclass(frozen=True)
class AotKernel:
    kind: str            # "decode" | "prefill"
    target: int          # compute capability, e.g. 90
    arch: str            # PTX .target, e.g. "sm_90a"
    name: str            # entry name in the PTX
    ptx: str
    shared_mem: int      # dynamic shared memory bytes to launch with
    num_warps: int       # block = 32 * num_warps threads
    ptx_version: str
    params: tuple[str, ...]  # parameters in launch order (after stripping hidden ones)
    compile_seconds: float   # including configurations rejected for shared memory
    constexprs: dict = dataclasses.field(default_factory=dict)  # compiled-in sizes / tile config


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


def strip_hidden_params(ptx: str, name: str, n_params: int) -> str:
    """Drop the entry parameters after the first ``n_params`` if the body never reads them."""
    head = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, flags=re.S)
    if head is None:
        raise ValueError(f"entry {name} not found in PTX")
    params = [p.strip() for p in head.group(1).split(",") if p.strip()]
    if len(params) <= n_params:
        return ptx
    body = ptx[head.end():]
    for p in params[n_params:]:
        pname = p.split()[-1]
        if re.search(rf"\b{re.escape(pname)}\b", body):
            raise ValueError(f"hidden parameter {pname} is used by the kernel; cannot strip it")
    new_head = f".entry {name}(\n\t" + ",\n\t".join(params[:n_params]) + "\n)"
    return ptx[:head.start()] + new_head + ptx[head.end():]


def ptxas_check(ptx: str, arch: str) -> str | None:
    """Assemble PTX with Triton's bundled ptxas (no GPU needed); return its stderr, or None if no ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        cc = int(re.sub(r"\D", "", arch))
        exe = get_ptxas(cc).path
    except Exception:  # noqa: BLE001 - optional tool
        exe = shutil.which("ptxas")
    if not exe:
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, f"-arch={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ptxas failed for {arch}: {r.stderr[-2000:]}")
        return r.stderr


def _interpreting() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # noqa: BLE001 - older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_in_subprocess(kwargs: dict) -> AotKernel:
    """Under TRITON_INTERPRET=1 the kernels are interpreter objects: compile in a clean process."""
    import json
    import sys

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
    order until one fits ``SMEM_LIMIT[target]``. Works with TRITON_INTERPRET=1 too
    (compiles in a subprocess without it).
    """
    if _interpreting():
        return _compile_in_subprocess(dict(kind=kind, num_k_heads=num_k_heads, num_v_heads=num_v_heads,
                                           head_k_dim=head_k_dim, head_v_dim=head_v_dim, conv_kernel=conv_kernel,
                                           norm_eps=norm_eps, act_dtype=act_dtype, target=target,
                                           ptx_version=ptx_version, strip_hidden=strip_hidden, **meta_kw))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = dict(Hk=num_k_heads, Hv=num_v_heads, Dk=head_k_dim, Dv=head_v_dim, K=conv_kernel, norm_eps=norm_eps)
    limit = SMEM_LIMIT.get(int(target), 99 * 1024)
    if kind == "prefill" and "block_v" not in meta_kw:
        from .prefill import CONFIG_FALLBACKS
        candidates = [dict(meta_kw, act_dtype=act_dtype, **fb) for fb in CONFIG_FALLBACKS]
    else:
        candidates = [dict(meta_kw, act_dtype=act_dtype) if kind == "prefill" else dict(meta_kw)]
    t0 = time.perf_counter()
    for i, kw in enumerate(candidates):
        kernel, meta = _kernel_and_meta(kind, cfg, kw)
        const = meta["constexprs"]
        sig = kernel_signature(kernel, const, act_dtype)
        opts = dict(num_warps=meta["num_warps"], num_stages=meta["num_stages"])
        if ptx_version is not None:
            opts["ptx_version"] = int(ptx_version)
        ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                            target=GPUTarget("cuda", int(target), 32), options=opts)
        if ck.metadata.shared <= limit:
            break
        if i + 1 == len(candidates):
            raise RuntimeError(f"{kind} kernel needs {ck.metadata.shared} B shared memory > {limit} on sm_{target}")
    secs = time.perf_counter() - t0
    md = ck.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, field, 0):
            raise RuntimeError(f"{kind} kernel needs {field}={getattr(md, field)}; the plugin cannot provide it")
    params = tuple(n for n in kernel.arg_names if sig[n] != "constexpr")
    ptx = ck.asm["ptx"]
    if strip_hidden:
        ptx = strip_hidden_params(ptx, md.name, len(params))
    arch = re.search(r"^\.target\s+(\S+)", ptx, flags=re.M).group(1)
    version = re.search(r"^\.version\s+(\S+)", ptx, flags=re.M).group(1)
    return AotKernel(kind=kind, target=int(target), arch=arch, name=md.name, ptx=ptx, shared_mem=int(md.shared),
                     num_warps=int(md.num_warps), ptx_version=version, params=params, compile_seconds=secs,
                     constexprs={k: v for k, v in const.items()})


def compile_targets(kind: str, targets=TARGETS, **cfg) -> dict[int, AotKernel]:
    """``{cc: AotKernel}`` for every target; ``cfg`` as for :func:`compile_kernel`."""
    return {int(cc): compile_kernel(kind, target=int(cc), **cfg) for cc in targets}


if __name__ == "__main__":  # python -m qcn.compile.plugins.gated_deltanet.aot [targets...]
    import sys
    tg = [int(x) for x in sys.argv[1:]] or list(TARGETS)
    real = dict(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, conv_kernel=4)
    for kd in ("decode", "prefill"):
        for cc, k in compile_targets(kd, tg, **real).items():
            print(f"{kd:8s} sm_{cc:<4d} {k.arch:8s} ptx {k.ptx_version} {k.compile_seconds:6.1f}s "
                  f"shared {k.shared_mem:6d} B warps {k.num_warps} BV {k.constexprs.get('BV')} "
                  f"ptx {len(k.ptx) / 1e3:.0f} kB", flush=True)
