"""TensorRT (>= 10.9, full TensorRT, not TensorRT-RTX) plugins for the MoE kernels, AOT only.

UNTESTED: this repository's machines have no full TensorRT (``tensorrt.plugin`` with
``aot_impl``) and no GPU, so nothing here has ever run; the PTX it embeds is produced and
assembled (ptxas) by ``aot.py``, which the tests cover. ``tensorrt`` is imported lazily, inside
the functions. Follows the Quick Deployable Plugin (QDP) AOT contract of the TensorRT docs:
``@trtp.register`` describes outputs, ``@trtp.autotune`` pins the I/O dtypes, ``@trtp.aot_impl``
returns (kernel name, PTX, KernelLaunchParams, SymIntExprs); the kernel receives the input
pointers, then those int32 scalars, then the output pointers (our kernels' parameter order).
No annotations are strings here (no ``from __future__ import annotations``): QDP inspects them.

One QDP AOT plugin launches one kernel, so qcn::MoE lowers to a chain of plugins in namespace
``qcn_moe`` (X = weight format dense|fp8|int4; ws/sws exist only for fp8/int4):
  router_logits(x, router_weight)                      -> logits [N, E] f32
  router_topk(logits, x, shared_gate)                  -> ids [N, k] i32, w [N, k] f32, sw [N] f32
  decode (engine with N <= 16 tokens):
    decode_gate_up_X(x, w, ws, sw, sws, ids)           -> act [N*k+N, max(I, Is)]
    decode_down_X(act, w, ws, sw, sws, ids)            -> inter [N*k+N, H]
    combine_slots(inter, w, sw)                        -> y [N, H]
  prefill:
    align(ids)                                         -> sorted [N*k], slot_row [N*k], expert_off [E+1], tile_off [E+1]
    prefill_gate_up_X(x, w, ws, sw, sws, sorted, expert_off, tile_off)   -> act
    prefill_down_X(act, w, ws, sw, sws, sorted, expert_off, tile_off)    -> inter
    combine_sorted(inter, w, sw, slot_row)             -> y
(w/ws = gate_up or down and scales, sw/sws = the shared expert's.) Model sizes, top_k,
norm_topk_prob, the weight format and the target are fixed at registration: AOT plugin
attributes are not serialized, and PTX is per architecture (register with the cc of the GPU
the engine is built for). Open questions only a real TensorRT can answer: kernels needing more
than 48 KiB of shared memory (``shared`` in aot.py's report; the prefill GEMMs at num_stages 3)
require the launcher to raise cudaFuncAttributeMaxDynamicSharedMemorySize; FP8 plugin I/O on
sm_80 (the sm_80 kernels read the bytes, any 1-byte type works).
"""

from .._triton import register_kernel_plugin

__all__ = ["register_moe_plugins"]


def register_moe_plugins(cc: int, hidden: int = 2048, experts: int = 512, top_k: int = 10, inter: int = 512,
                         shared_inter: int = 512, act: str = "bf16", weight_formats=("dense", "fp8", "int4"),
                         group_size: int = 128, norm_topk_prob: bool = True, namespace: str = "qcn_moe"):
    """Register the chain above for one model and target compute capability ``cc``."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from .aot import moe_kernel_specs

    specs = moe_kernel_specs(hidden, experts, top_k, inter, shared_inter, act, tuple(weight_formats), group_size,
                             norm_topk_prob, cc=cc)
    specs = {s.name: s for s in specs}
    adt = {"bf16": trt.bfloat16, "fp16": trt.float16, "fp32": trt.float32}[act]
    f32, i32 = trt.float32, trt.int32
    E, H, k, imax = experts, hidden, top_k, max(inter, shared_inter)

    def out(shape, dt):
        return trtp.from_shape_expr(tuple(shape), dtype=dt)

    def n_of(x):
        return x.shape_expr[0]

    def reg(name, spec_name, outs, grid, scalars):
        register_kernel_plugin(f"{namespace}::{name}", specs[spec_name], cc, outs, grid, scalars)

    c = specs[f"moe_router_logits_{act}"].constexprs
    reg("router_logits", f"moe_router_logits_{act}", lambda i: [out((n_of(i[0]), E), f32)],
        lambda i: (trtp.cdiv(n_of(i[0]), c["BM"]), -(-E // c["BN"])), lambda i: (n_of(i[0]), E, H))
    reg("router_topk", f"moe_router_topk_{act}",
        lambda i: [out((n_of(i[0]), k), i32), out((n_of(i[0]), k), f32), out((n_of(i[0]),), f32)],
        lambda i: (n_of(i[0]), 1), lambda i: (n_of(i[0]), E, H))
    bm = specs["moe_align"].constexprs["BM"]
    reg("align", "moe_align",
        lambda i: [out((n_of(i[0]) * k,), i32), out((n_of(i[0]) * k,), i32), out((E + 1,), i32), out((E + 1,), i32)],
        lambda i: (E, 1), lambda i: (n_of(i[0]) * k, E))
    reg("combine_slots", f"moe_combine_{act}_slots", lambda i: [out((n_of(i[2]), H), adt)],
        lambda i: (n_of(i[2]), -(-H // specs[f"moe_combine_{act}_slots"].constexprs["BH"])),
        lambda i: (n_of(i[2]), H))
    reg("combine_sorted", f"moe_combine_{act}_sorted", lambda i: [out((n_of(i[2]), H), adt)],
        lambda i: (n_of(i[2]), -(-H // specs[f"moe_combine_{act}_sorted"].constexprs["BH"])),
        lambda i: (n_of(i[2]), H))
    for fmt in weight_formats:
        for stage, width in (("gate_up", imax), ("down", H)):
            dn = f"moe_decode_{stage}_{fmt}_{act}"
            bn = specs[dn].constexprs["BN"]
            # rows of act/inter: N*k + N where N = ids.shape[0] (ids is the last input)
            reg(f"decode_{stage}_{fmt}", dn, lambda i, w=width: [out((n_of(i[-1]) * (k + 1), w), adt)],
                lambda i, w=width, bn=bn: (n_of(i[-1]) * k + 1, -(-w // bn)),
                lambda i: (n_of(i[-1]), H, inter, shared_inter))
            pn = f"moe_prefill_{stage}_{fmt}_{act}"
            pbn = specs[pn].constexprs["BN"]
            # rows of act/inter: N*k + N where N = len(sorted) / k
            reg(f"prefill_{stage}_{fmt}", pn,
                lambda i, w=width: [out((n_of(i[-3]) + n_of(i[-3]) // k, w), adt)],
                lambda i, w=width, pbn=pbn: (trtp.cdiv(n_of(i[-3]), bm) + E + trtp.cdiv(n_of(i[-3]) // k, bm),
                                             -(-w // pbn)),
                lambda i: (n_of(i[-3]) // k, E, H, inter, shared_inter))
