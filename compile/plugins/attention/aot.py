"""Ahead-of-time compilation of the decode-attention Triton kernels to PTX, no GPU needed.

Compiled by the shared ``plugins/_triton.py`` (KernelSpec, compile_spec, verify_ptx) for the
AOT targets of the GPU table; run without TRITON_INTERPRET.

CLI: ``python -m qcn.compile.plugins.attention.aot --out DIR [--targets 80,89,90,120]
[--cache bf16,fp8]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._triton import TARGETS, KernelSpec, compile_all, write_outputs

__all__ = ["attention_kernel_specs", "main"]


def attention_kernel_specs(
    num_heads: int = 16,
    num_kv_heads: int = 2,
    head_dim: int = 256,
    act: str = "bf16",
    caches: tuple[str, ...] = ("bf16", "fp8"),
    softmax_scale: float | None = None,
    config=None,
    cc: int = 89,
) -> list[KernelSpec]:
    """Specs of the split and reduce kernels for one model (Qwen3-Next: 16 / 2 / 256).
    ``caches``: KV-cache dtypes to build the split kernel for ("bf16"/"fp16"/"fp32" = the
    activation dtype, "fp8" = float8_e4m3fn with per-tensor scales; below sm_89 the cache is
    read as bytes and decoded with integer ops, KV_FP8 = 2)."""
    import triton

    from . import kernels as K
    from .launch import DecodeAttentionConfig

    cfg = config or DecodeAttentionConfig()
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    d_pad = triton.next_power_of_2(head_dim)
    a = "*" + act
    common = {"HQ": num_heads, "KVH": num_kv_heads, "D": head_dim, "SM_SCALE": scale, "D_PAD": d_pad,
              "PARTITION": cfg.partition}
    cexp = {k: "constexpr" for k in common}
    specs = []
    for cache in caches:
        fp8 = cache == "fp8"
        ct = ("*u8" if cc < 89 else "*fp8e4nv") if fp8 else "*" + cache
        kv_mode = (2 if cc < 89 else 1) if fp8 else 0
        specs.append(KernelSpec(
            f"attn_decode_split_{act}_kv{cache}", K._attn_decode_split_kernel,
            {"q_ptr": a, "k_ptr": ct, "v_ptr": ct, "past_len_ptr": "*i64",
             "k_scale_ptr": "*fp32" if fp8 else "constexpr", "v_scale_ptr": "*fp32" if fp8 else "constexpr",
             "P": "i32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", **cexp,
             "KV_FP8": "constexpr", "DOT_F32": "constexpr", "G_PAD": "constexpr", "BLOCK_N": "constexpr"},
            {**common, "KV_FP8": kv_mode, "DOT_F32": act == "fp32" or cache == "fp32",
             "G_PAD": max(16, triton.next_power_of_2(num_heads // num_kv_heads)), "BLOCK_N": cfg.block_n,
             **({} if fp8 else {"k_scale_ptr": None, "v_scale_ptr": None})},
            div16=("q_ptr", "k_ptr", "v_ptr", "past_len_ptr", "m_ptr", "l_ptr", "acc_ptr"),
            inputs=("q_ptr", "k_ptr", "v_ptr", "past_len_ptr") + (("k_scale_ptr", "v_scale_ptr") if fp8 else ()),
            scalars=("P",), outputs=("m_ptr", "l_ptr", "acc_ptr"),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    specs.append(KernelSpec(
        f"attn_decode_reduce_{act}", K._attn_decode_reduce_kernel,
        {"q_ptr": a, "k_new_ptr": a, "v_new_ptr": a, "past_len_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32",
         "acc_ptr": "*fp32", "P": "i32", "S": "i32", "out_ptr": a, **cexp, "BLOCK_S": "constexpr"},
        {**common, "BLOCK_S": cfg.block_s},
        div16=("q_ptr", "k_new_ptr", "v_new_ptr", "past_len_ptr", "m_ptr", "l_ptr", "acc_ptr", "out_ptr"),
        inputs=("q_ptr", "k_new_ptr", "v_new_ptr", "past_len_ptr", "m_ptr", "l_ptr", "acc_ptr"),
        scalars=("P", "S"), outputs=("out_ptr",), num_warps=cfg.reduce_num_warps, num_stages=1))
    return specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--cache", default="bf16,fp8")
    ap.add_argument("--act", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--verify", action="store_true", help="assemble every PTX with Triton's ptxas")
    ap.add_argument("--ptx-version", type=int, default=None, help="e.g. 88 for CUDA 12.9 drivers")
    args = ap.parse_args(argv)
    ks = compile_all(lambda cc: attention_kernel_specs(act=args.act, caches=tuple(args.cache.split(",")), cc=cc),
                     [int(t) for t in args.targets.split(",")], ptx_version=args.ptx_version, verify=args.verify)
    for k in ks:
        print(f"{k.spec:40s} sm{k.cc:<4d} {k.ptx_target:8s} {k.seconds:6.2f}s warps={k.num_warps} smem={k.shared_mem}")
    print(write_outputs(ks, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
