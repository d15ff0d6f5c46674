"""The MoE Triton kernels as AOT specs (compiled to PTX by the shared ``plugins/_triton.py``).

CLI: ``python -m qcn.compile.plugins.moe.aot --out DIR [--targets 80,89,90,120]
[--formats dense,fp8,int4]`` writes ``<spec>.sm<cc>.ptx`` and ``aot_manifest.json``
(kernel name, warps, shared memory, compile seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._triton import TARGETS, KernelSpec, compile_all, write_outputs

__all__ = ["moe_kernel_specs", "main"]

_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


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
    from .launch import DECODE_MAX_TOKENS, WEIGHT_FORMATS, MoEConfig

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
