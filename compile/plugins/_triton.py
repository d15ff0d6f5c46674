"""Shared Triton machinery of the op folders: ahead-of-time compilation to PTX (no GPU needed),
PTX checks, and registration of one kernel as a TensorRT AOT plugin. Every op folder's
``aot.py`` describes its kernels as KernelSpec objects and compiles them here; its
``trt_plugin.py`` registers them with :func:`register_kernel_plugin`.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
for the AOT targets of the GPU table (compile/build/targets.py). Triton emits ``.target sm_90a``
for cc 90 and ``sm_120a`` for cc 120 (the arch-specific variants; the PTX then runs only on
that exact architecture). Must run WITHOUT ``TRITON_INTERPRET=1`` (under the interpreter
``@triton.jit`` yields interpreter functions that cannot be compiled): tests compile in a
subprocess.

Every kernel's runtime parameters follow TensorRT's AOT-plugin convention (input pointers,
int32 scalars, output pointers). Triton appends two hidden pointer parameters (global_scratch,
profile_scratch) that TensorRT's launcher does not know about; our kernels need neither
(checked: both sizes are 0), and :func:`strip_hidden_params` deletes them from the PTX entry so
the PTX parameter list is exactly what TensorRT passes. :func:`verify_ptx` assembles the PTX
with the ptxas that ships with Triton.

No annotations are strings in :func:`register_kernel_plugin`'s signatures: TensorRT's QDP
inspects them (they are built with ``inspect.Signature``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Tuple, Union

from ..build.targets import AOT_TARGETS, smem_limit

__all__ = ["TARGETS", "KernelSpec", "AotKernel", "interpreting", "compile_spec", "compile_all", "strip_hidden_params",
           "verify_ptx", "write_outputs", "register_kernel_plugin"]

TARGETS = AOT_TARGETS


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter in this process (no AOT compilation then)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except ImportError:  # older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialization. signature maps EVERY parameter of ``fn`` to a Triton type
    ("*bf16", "*fp8e4nv", "*u8", "*i32", "*i64", "i32", ...) or "constexpr" (value in
    ``constexprs``; a constexpr pointer is None: absent). ``div16``: parameters known to be
    multiples of 16 (pointers: 16-byte aligned; model-fixed sizes)."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    div16: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    # TensorRT plugin layout: names of the runtime inputs / scalars / outputs in order
    inputs: tuple[str, ...] = field(default=())
    scalars: tuple[str, ...] = field(default=())
    outputs: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class AotKernel:
    """One compiled kernel: what a TensorRT AOT plugin embeds and launches."""

    spec: str                # the KernelSpec's name
    cc: int                  # compute capability, e.g. 90
    kernel_name: str         # entry name in the PTX
    ptx: str
    num_warps: int           # block = 32 * num_warps threads
    shared_mem: int          # dynamic shared memory bytes to launch with
    seconds: float           # compile time
    ptx_target: str          # PTX .target, e.g. "sm_90a"
    ptx_version: str = ""    # PTX ISA, e.g. "8.8"
    params: tuple[str, ...] = ()  # runtime parameters in launch order (hidden ones stripped)
    constexprs: dict = field(default_factory=dict)


def _attrs(spec: KernelSpec) -> dict:
    names = list(spec.fn.arg_names)
    unknown = set(spec.div16) - set(names)
    if unknown:
        raise ValueError(f"{spec.name}: div16 names unknown parameters {sorted(unknown)}")
    return {(names.index(a),): [["tt.divisibility", 16]] for a in spec.div16}


def strip_hidden_params(ptx: str, kernel_name: str, n_keep: int) -> str:
    """Keep the entry's first ``n_keep`` parameters (the kernel's own); drop Triton's trailing
    hidden ones (global_scratch, profile_scratch), refusing if the body reads any of them."""
    m = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError(f"entry {kernel_name} not found in PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    if len(params) <= n_keep:
        return ptx
    body = ptx[m.end():]
    for p in params[n_keep:]:
        name = p.split()[-1]
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            raise ValueError(f"PTX uses hidden parameter {name}; cannot strip it")
    new = "\n\t" + ",\n\t".join(params[:n_keep]) + "\n"
    return ptx[: m.start(1)] + new + ptx[m.end(1):]


def _ptxas(ptx: str) -> str | None:
    """Triton's bundled ptxas able to read this PTX (``ptxas``: CUDA 12.9, PTX <= 8.8;
    ``ptxas-blackwell``: CUDA 13, which Triton 3.9 uses for sm_90+ and PTX 9.x)."""
    import triton

    ver = re.search(r"^\.version\s+(\d+)\.(\d+)", ptx, re.M)
    new = ver is not None and (int(ver.group(1)), int(ver.group(2))) > (8, 8)
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / ("ptxas-blackwell" if new else "ptxas")
    return str(p) if p.exists() else None


def verify_ptx(ptx: str, ptx_target: str) -> bool:
    """Assemble with Triton's bundled ptxas for ``ptx_target`` (e.g. "sm_90a"). Returns False
    when no ptxas is available; raises on assembly errors."""
    exe = _ptxas(ptx)
    if exe is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([exe, f"-arch={ptx_target}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ptxas failed for {ptx_target}:\n{r.stderr}")
    return True


def compile_spec(spec: KernelSpec, cc: int, *, strip_hidden: bool = True, ptx_version: int | None = None,
                 check_smem: bool = True) -> AotKernel:
    """Compile one spec for compute capability ``cc`` (an AOT target of the GPU table) -> PTX.

    ptx_version (e.g. 88 = PTX ISA 8.8, CUDA 12.9): None keeps Triton's choice, which for
    cc >= 90 is its bundled CUDA 13 toolchain's PTX 9.x: loading that PTX needs a CUDA 13
    driver. Pass 88 (or lower; sm_90a needs >= 80, sm_120a >= 87) for CUDA 12 drivers.
    ``check_smem``: a kernel needing more dynamic shared memory than the architecture has is
    an error (callers trying smaller tiles pass False and check ``shared_mem`` themselves)."""
    if interpreting():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run it in a subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = set(spec.fn.arg_names) ^ set(spec.signature)
    if missing:
        raise ValueError(f"{spec.name}: signature does not match parameters: {sorted(missing)}")
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=_attrs(spec))
    t0 = time.perf_counter()
    ck = triton.compile(src, target=GPUTarget("cuda", int(cc), 32),
                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                 **({"ptx_version": int(ptx_version)} if ptx_version else {})})
    dt = time.perf_counter() - t0
    md = ck.metadata
    for what in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, what, 0):
            raise RuntimeError(f"{spec.name}: kernel needs {what}={getattr(md, what)}, which TensorRT AOT plugins "
                               "cannot provide")
    if check_smem and md.shared > smem_limit(cc):
        raise RuntimeError(f"{spec.name}: needs {md.shared} B shared memory > {smem_limit(cc)} on sm_{cc}")
    params = tuple(n for n in spec.fn.arg_names if spec.signature[n] != "constexpr")
    ptx = ck.asm["ptx"]
    if strip_hidden:
        ptx = strip_hidden_params(ptx, md.name, len(params))
    tgt = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    version = re.search(r"^\.version\s+(\S+)", ptx, re.M).group(1)
    return AotKernel(spec.name, int(cc), md.name, ptx, md.num_warps, md.shared, dt, tgt, version, params,
                     dict(spec.constexprs))


def compile_all(make_specs, targets=TARGETS, *, strip_hidden: bool = True, ptx_version: int | None = None,
                verify: bool = False) -> list[AotKernel]:
    """make_specs(cc) -> specs for that target; compiles each for its target."""
    out = []
    for cc in targets:
        for s in make_specs(cc):
            k = compile_spec(s, cc, strip_hidden=strip_hidden, ptx_version=ptx_version)
            if verify:
                verify_ptx(k.ptx, k.ptx_target)
            out.append(k)
    return out


def write_outputs(kernels: list[AotKernel], out: Path) -> Path:
    """``<spec>.sm<cc>.ptx`` per kernel and ``aot_manifest.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in kernels:
        f = out / f"{k.spec}.sm{k.cc}.ptx"
        f.write_text(k.ptx)
        rows.append({"spec": k.spec, "cc": k.cc, "ptx_target": k.ptx_target, "kernel_name": k.kernel_name,
                     "file": f.name, "num_warps": k.num_warps, "shared_mem": k.shared_mem,
                     "compile_seconds": round(k.seconds, 3)})
    man = out / "aot_manifest.json"
    man.write_text(json.dumps(rows, indent=1))
    return man


_TRT_TYPE = {"bf16": "BF16", "fp16": "FP16", "fp32": "FP32", "fp8e4nv": "FP8", "u8": "UINT8", "i32": "INT32",
             "i64": "INT64"}


def register_kernel_plugin(plugin_id, spec: KernelSpec, cc, out_descs, grid, scalars):
    """Register one Triton kernel as a QDP AOT plugin.

    out_descs(inputs) -> list of output TensorDesc (shapes as symbolic expressions);
    grid(inputs) -> (grid_x, grid_y) symbolic; scalars(inputs) -> values for ``spec.scalars``
    (ints or symbolic shape expressions), in order. ``inputs`` are the TensorDescs in
    ``spec.inputs`` order.
    """
    import tensorrt.plugin as trtp

    P = inspect.Parameter
    tensor_params = [P(n.removesuffix("_ptr"), P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
                     for n in spec.inputs]
    n_out = len(spec.outputs)
    ret = Tuple[tuple([trtp.TensorDesc] * n_out)] if n_out > 1 else trtp.TensorDesc
    io_types = ", ".join(_TRT_TYPE[spec.signature[n].lstrip("*")] for n in spec.inputs + spec.outputs)

    def desc(*inputs):
        outs = out_descs(inputs)
        return tuple(outs) if n_out > 1 else outs[0]

    desc.__signature__ = inspect.Signature(tensor_params, return_annotation=ret)
    trtp.register(plugin_id)(desc)

    def autotune(*args):
        return [trtp.AutoTuneCombination(io_types, "LINEAR")]

    autotune.__signature__ = inspect.Signature(
        tensor_params + [P("outputs", P.POSITIONAL_OR_KEYWORD)], return_annotation=List[trtp.AutoTuneCombination])
    trtp.autotune(plugin_id)(autotune)

    def aot_impl(*args):
        inputs = args[: len(spec.inputs)]
        k = compile_spec(spec, cc)  # PTX with Triton's hidden scratch parameters stripped
        if k.shared_mem > 48 * 1024:
            import warnings

            warnings.warn(f"{plugin_id}: {k.shared_mem} B shared memory > 48 KiB needs the opt-in attribute; "
                          "unverified whether TensorRT's AOT launcher sets it", stacklevel=2)
        lp = trtp.KernelLaunchParams()
        gx, gy = grid(inputs)
        lp.grid_x, lp.grid_y = gx, gy
        lp.block_x = k.num_warps * 32
        lp.shared_mem = k.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars(inputs)])
        return k.kernel_name, k.ptx, lp, extra

    aot_impl.__signature__ = inspect.Signature(
        tensor_params + [P("outputs", P.POSITIONAL_OR_KEYWORD), P("tactic", P.POSITIONAL_OR_KEYWORD)],
        return_annotation=Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs])
    trtp.aot_impl(plugin_id)(aot_impl)
