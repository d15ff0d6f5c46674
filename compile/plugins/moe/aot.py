"""Ahead-of-time compilation of the MoE Triton kernels to PTX, no GPU needed.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``
for cc in 80, 89, 90, 120. Triton emits ``.target sm_90a`` for cc 90 and ``sm_120a`` for
cc 120 (the arch-specific variants; the PTX then runs only on that exact architecture).

Must run WITHOUT ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` yields
interpreter functions that cannot be compiled); tests call this module in a subprocess.

Every kernel's runtime parameters follow TensorRT's AOT-plugin convention (input pointers,
int32 scalars, output pointers). Triton appends two hidden pointer parameters
(global_scratch, profile_scratch) that TensorRT's launcher does not know about; our kernels
need neither (checked: both sizes are 0), and ``strip_scratch=True`` deletes the two unused
parameters from the PTX entry so the PTX parameter list is exactly what TensorRT passes.
``verify_ptx`` assembles the PTX with the ptxas that ships with Triton.

CLI: ``python -m qcn.compile.plugins.moe.aot --out DIR [--targets 80,89,90,120]
[--formats dense,fp8,int4]`` writes ``<spec>.sm<cc>.ptx`` and ``aot_manifest.json``
(kernel name, warps, shared memory, compile seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TARGETS", "KernelSpec", "AOTKernel", "compile_spec", "verify_ptx", "strip_scratch_params",
    "moe_kernel_specs", "compile_all", "main",
]

TARGETS = (80, 89, 90, 120)

_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


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


@dataclass
class AOTKernel:
    spec: str
    cc: int
    kernel_name: str
    ptx: str
    num_warps: int
    shared_mem: int
    seconds: float
    ptx_target: str


def _attrs(spec: KernelSpec) -> dict:
    names = list(spec.fn.arg_names)
    unknown = set(spec.div16) - set(names)
    if unknown:
        raise ValueError(f"{spec.name}: div16 names unknown parameters {sorted(unknown)}")
    return {(names.index(a),): [["tt.divisibility", 16]] for a in spec.div16}


def strip_scratch_params(ptx: str, kernel_name: str, n: int = 2) -> str:
    """Remove Triton's trailing hidden (global_scratch, profile_scratch) parameters from the
    entry's parameter list; refuses if the body references them."""
    m = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError(f"entry {kernel_name} not found in PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    dropped = [p.split()[-1] for p in params[-n:]]
    body = ptx[m.end():]
    for name in dropped:
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            raise ValueError(f"PTX uses hidden parameter {name}; cannot strip it")
    new = "\n\t" + ",\n\t".join(params[:-n]) + "\n"
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


def compile_spec(spec: KernelSpec, cc: int, *, strip_scratch: bool = True, ptx_version: int | None = None) -> AOTKernel:
    """Compile one spec for compute capability ``cc`` (80, 89, 90, 120) -> PTX.

    ptx_version (e.g. 88 = PTX ISA 8.8, CUDA 12.9): None keeps Triton's choice, which for
    cc >= 90 is its bundled CUDA 13 toolchain's PTX 9.x: loading that PTX needs a CUDA 13
    driver. Pass 88 (or lower; sm_90a needs >= 80, sm_120a >= 87) for CUDA 12 drivers."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run it in a subprocess)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = set(spec.fn.arg_names) ^ set(spec.signature)
    if missing:
        raise ValueError(f"{spec.name}: signature does not match parameters: {sorted(missing)}")
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=_attrs(spec))
    t0 = time.perf_counter()
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                 **({"ptx_version": ptx_version} if ptx_version else {})})
    dt = time.perf_counter() - t0
    md = ck.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{spec.name}: kernel needs global/profile scratch, unsupported by TensorRT AOT plugins")
    ptx = ck.asm["ptx"]
    if strip_scratch:
        ptx = strip_scratch_params(ptx, md.name)
    tgt = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    return AOTKernel(spec.name, cc, md.name, ptx, md.num_warps, md.shared, dt, tgt)


def compile_all(make_specs, targets=TARGETS, *, strip_scratch: bool = True, ptx_version: int | None = None,
                verify: bool = False) -> list[AOTKernel]:
    """make_specs(cc) -> specs for that target; compiles each for its target."""
    out = []
    for cc in targets:
        for s in make_specs(cc):
            k = compile_spec(s, cc, strip_scratch=strip_scratch, ptx_version=ptx_version)
            if verify:
                verify_ptx(k.ptx, k.ptx_target)
            out.append(k)
    return out


# ----------------------------------------------------------------------------- MoE specs


def moe_kernel_specs(
    hidden: int = 2048,
    experts: int = 512,
    top_k: int = 10,
    inter: int = 512,
    shared_inter: int = 512,
    act: str = "bf16",
    weight_formats: tuple[str, ...] = ("dense", "fp8", "int4"),
    group_size: int = 128,
    norm_topk_prob: bool = True,
    config=None,
    cc: int = 89,
) -> list[KernelSpec]:
    """Specs of every MoE kernel for one model (sizes fixed; N dynamic), real Qwen3-Next sizes
    by default, for target ``cc``. ``act`` is the activation dtype (bf16/fp16/fp32); dense
    weights share it. FP8 weights use the native e4m3 type from sm_89 on and the byte-decoding
    variant (WFMT 3, weights passed as uint8) below."""
    import triton

    from . import kernels as K
    from .ops import DECODE_MAX_TOKENS, WEIGHT_FORMATS, MoEConfig

    cfg = config or MoEConfig()
    p2 = triton.next_power_of_2
    a = "*" + act
    warps = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dot_f32 = act == "fp32"
    sizes16 = tuple(n for n, v in (("H", hidden), ("E", experts), ("INTER", inter), ("INTER_S", shared_inter))
                    if v % 16 == 0)
    specs = [
        KernelSpec(
            f"moe_router_logits_{act}", K._router_logits_kernel,
            {"x_ptr": a, "wr_ptr": a, "N": "i32", "E": "i32", "H": "i32", "logits_ptr": "*fp32",
             "DOT_F32": "constexpr", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
            {"DOT_F32": dot_f32, "BM": cfg.router_bm, "BN": cfg.router_bn, "BK": cfg.router_bk},
            div16=("x_ptr", "wr_ptr", "logits_ptr") + tuple(s for s in sizes16 if s in ("E", "H")),
            inputs=("x_ptr", "wr_ptr"), scalars=("N", "E", "H"), outputs=("logits_ptr",), **warps),
        KernelSpec(
            f"moe_router_topk_{act}", K._router_topk_kernel,
            {"logits_ptr": "*fp32", "x_ptr": a, "sg_ptr": a, "N": "i32", "E": "i32", "H": "i32",
             "ids_ptr": "*i32", "w_ptr": "*fp32", "sw_ptr": "*fp32", "TOP_K": "constexpr", "NORM": "constexpr",
             "BE": "constexpr", "KP": "constexpr", "BH": "constexpr"},
            {"TOP_K": top_k, "NORM": norm_topk_prob, "BE": p2(experts), "KP": p2(top_k),
             "BH": min(cfg.topk_bh, p2(hidden))},
            div16=("logits_ptr", "x_ptr", "sg_ptr") + tuple(s for s in sizes16 if s in ("E", "H")),
            inputs=("logits_ptr", "x_ptr", "sg_ptr"), scalars=("N", "E", "H"),
            outputs=("ids_ptr", "w_ptr", "sw_ptr"), num_warps=cfg.num_warps, num_stages=1),
        KernelSpec(
            "moe_align", K._moe_align_kernel,
            {"topk_ids_ptr": "*i32", "NK": "i32", "E": "i32", "sorted_ptr": "*i32", "slot_row_ptr": "*i32",
             "expert_off_ptr": "*i32", "tile_off_ptr": "*i32", "BM": "constexpr", "EP": "constexpr",
             "BLOCK": "constexpr"},
            {"BM": cfg.prefill_bm, "EP": p2(experts), "BLOCK": cfg.align_block},
            div16=("topk_ids_ptr",), inputs=("topk_ids_ptr",), scalars=("NK", "E"),
            outputs=("sorted_ptr", "slot_row_ptr", "expert_off_ptr", "tile_off_ptr"),
            num_warps=cfg.num_warps, num_stages=1),
    ]
    for has_map in (False, True):
        specs.append(KernelSpec(
            f"moe_combine_{act}_{'sorted' if has_map else 'slots'}", K._moe_combine_kernel,
            {"inter_ptr": a, "topk_w_ptr": "*fp32", "shared_w_ptr": "*fp32",
             "slot_row_ptr": "*i32" if has_map else "constexpr", "N": "i32", "H": "i32", "y_ptr": a,
             "TOP_K": "constexpr", "HAS_MAP": "constexpr", "BH": "constexpr"},
            {"TOP_K": top_k, "HAS_MAP": has_map, "BH": cfg.combine_bh, **({} if has_map else {"slot_row_ptr": None})},
            div16=("inter_ptr", "y_ptr") + tuple(s for s in sizes16 if s == "H"),
            inputs=("inter_ptr", "topk_w_ptr", "shared_w_ptr") + (("slot_row_ptr",) if has_map else ()),
            scalars=("N", "H"), outputs=("y_ptr",), num_warps=cfg.num_warps, num_stages=1))
    for fmt in weight_formats:
        soft_fp8 = fmt == "fp8" and cc < 89
        wt = {"dense": a, "fp8": "*u8" if soft_fp8 else "*fp8e4nv", "int4": "*u8"}[fmt]
        st = {"dense": "constexpr", "fp8": "*fp32", "int4": "*bf16"}[fmt]
        scale_none = {"ws_ptr": None, "sws_ptr": None} if fmt == "dense" else {}
        group = group_size if fmt == "int4" else 1
        wfmt = 3 if soft_fp8 else WEIGHT_FORMATS[fmt]

        def bk(v, group=group, fmt=fmt):
            return min(v, group) if fmt == "int4" else v

        base = {"TOP_K": top_k, "WFMT": wfmt, "GROUP": group, "DOT_F32": dot_f32}
        weights = {"w_ptr": wt, "ws_ptr": st, "sw_ptr": wt, "sws_ptr": st}
        w_in = ("w_ptr", "ws_ptr", "sw_ptr", "sws_ptr") if fmt != "dense" else ("w_ptr", "sw_ptr")
        ptr16 = tuple(k for k, v in weights.items() if v != "constexpr")
        dec = {"BM": DECODE_MAX_TOKENS, "BK": bk(cfg.decode_bk), "BS": p2(DECODE_MAX_TOKENS * top_k), "KP": p2(top_k)}
        pre = {"BM": cfg.prefill_bm, "BN": cfg.prefill_bn, "BK": bk(cfg.prefill_bk), "EP": p2(experts)}
        dsig = {"N": "i32", "H": "i32", "INTER": "i32", "INTER_S": "i32"}
        dsizes = tuple(x for x in sizes16 if x != "E")
        csig = {k: "constexpr" for k in ("TOP_K", "WFMT", "GROUP", "DOT_F32", "BM", "BN", "BK")}
        specs += [
            KernelSpec(
                f"moe_decode_gate_up_{fmt}_{act}", K._moe_decode_gate_up_kernel,
                {"x_ptr": a, **weights, "topk_ids_ptr": "*i32", **dsig, "act_ptr": a, **csig, "BS": "constexpr",
                 "KP": "constexpr"},
                {**base, **dec, "BN": cfg.decode_bn_gate_up, **scale_none},
                div16=("x_ptr", "act_ptr") + ptr16 + dsizes,
                inputs=("x_ptr",) + w_in + ("topk_ids_ptr",), scalars=tuple(dsig), outputs=("act_ptr",), **warps),
            KernelSpec(
                f"moe_decode_down_{fmt}_{act}", K._moe_decode_down_kernel,
                {"act_ptr": a, **weights, "topk_ids_ptr": "*i32", **dsig, "out_ptr": a, **csig, "BS": "constexpr",
                 "KP": "constexpr"},
                {**base, **dec, "BN": cfg.decode_bn_down, **scale_none},
                div16=("act_ptr", "out_ptr") + ptr16 + dsizes,
                inputs=("act_ptr",) + w_in + ("topk_ids_ptr",), scalars=tuple(dsig), outputs=("out_ptr",), **warps),
        ]
        psig = {"N": "i32", "E": "i32", "H": "i32", "INTER": "i32", "INTER_S": "i32"}
        route = {"sorted_ptr": "*i32", "expert_off_ptr": "*i32", "tile_off_ptr": "*i32"}
        specs += [
            KernelSpec(
                f"moe_prefill_gate_up_{fmt}_{act}", K._moe_prefill_gate_up_kernel,
                {"x_ptr": a, **weights, **route, **psig, "act_ptr": a, **csig, "EP": "constexpr"},
                {**base, **pre, **scale_none},
                div16=("x_ptr", "act_ptr") + ptr16 + sizes16,
                inputs=("x_ptr",) + w_in + tuple(route), scalars=tuple(psig), outputs=("act_ptr",), **warps),
            KernelSpec(
                f"moe_prefill_down_{fmt}_{act}", K._moe_prefill_down_kernel,
                {"act_ptr": a, **weights, **route, **psig, "out_ptr": a, **csig, "EP": "constexpr"},
                {**base, **pre, **scale_none},
                div16=("act_ptr", "out_ptr") + ptr16 + sizes16,
                inputs=("act_ptr",) + w_in + tuple(route), scalars=tuple(psig), outputs=("out_ptr",), **warps),
        ]
    return specs


def write_outputs(kernels: list[AOTKernel], out: Path) -> Path:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--formats", default="dense,fp8,int4")
    ap.add_argument("--act", default="bf16", choices=sorted(set(_TORCH_TO_TRITON.values())))
    ap.add_argument("--verify", action="store_true", help="assemble every PTX with Triton's ptxas")
    ap.add_argument("--ptx-version", type=int, default=None, help="e.g. 88 for CUDA 12.9 drivers")
    args = ap.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    ks = compile_all(lambda cc: moe_kernel_specs(act=args.act, weight_formats=tuple(args.formats.split(",")), cc=cc),
                     targets, ptx_version=args.ptx_version, verify=args.verify)
    for k in ks:
        print(f"{k.spec:40s} sm{k.cc:<4d} {k.ptx_target:8s} {k.seconds:6.2f}s warps={k.num_warps} smem={k.shared_mem}")
    print(write_outputs(ks, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
