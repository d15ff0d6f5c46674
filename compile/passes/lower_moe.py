"""Pass: ``qcn::MoE`` -> the chain of AOT plugins of ``plugins/moe/trt_plugin.py``
(namespace ``qcn_moe``; full TensorRT >= 10.9 only), dense (unquantized) weights:

  router_logits(x, router_weight)                          -> logits
  router_topk(logits, x, shared_gate)                      -> ids, w, sw
  N static and <= 16 (decode path):
    decode_gate_up_dense(x, gate_up, shared_gate_up, ids)  -> act
    decode_down_dense(act, down, shared_down, ids)         -> inter
    combine_slots(inter, w, sw)                            -> y
  otherwise (N dynamic, e.g. the one engine built from prefill.onnx, or N > 16):
    align(ids)                                             -> sorted, slot_row, expert_off, tile_off
    prefill_gate_up_dense(x, gate_up, shared_gate_up, sorted, expert_off, tile_off) -> act
    prefill_down_dense(act, down, shared_down, sorted, expert_off, tile_off)        -> inter
    combine_sorted(inter, w, sw, slot_row)                 -> y

The ONNX weight layouts are the kernels' (gate_up [E, 2I, H] gate rows first, down [E, H, I],
shared_gate_up [2Is, H], shared_down [H, Is], shared_gate [1, H]). Sizes, top_k,
norm_topk_prob and the activation dtype are fixed at registration (the pass's config; the
first lowered node fixes it). Refused (node left alone; the parser inlines its function body)
when weight_format is not "float" (fp8/int4 need scale inputs the op does not have yet), H/E/
I/Is are not static, shapes are inconsistent, top_k is outside 1..E, or dtypes are not one
bf16/fp16/fp32 activation dtype. NOT EXECUTED: no full TensorRT here; checked only against a
stub of ``tensorrt.plugin`` (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

from ._lowering import ACT_DTYPES, Check, LoweringPass, attr, plugin_node, static_dims

PLUGIN_NAMESPACE = "qcn_moe"
DECODE_MAX_TOKENS = 16  # = plugins/moe/ops.DECODE_MAX_TOKENS (not imported: that module needs triton)
FORMATS = {"float": "dense"}


class LowerMoE(LoweringPass):
    op_type = "MoE"
    name = "lower_moe"

    def check(self, node, ctx) -> Check:
        if len(node.input) != 7 or len(node.output) != 1 or not all(node.input) or not all(node.output):
            return Check.refuse("needs all 7 inputs and 1 output")
        fmt = attr(node, "weight_format", b"float")
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        if fmt not in FORMATS:
            return Check.refuse(f"weight_format {fmt!r} unsupported by the lowering (supported: {list(FORMATS)})")
        infos = [ctx.get(n) for n in node.input]
        act = infos[0].dtype
        if act not in ACT_DTYPES:
            return Check.refuse(f"activation dtype {act} is not bf16/fp16/fp32")
        if any(t.dtype != act for t in infos):
            return Check.refuse("inputs do not all have the activation dtype")
        ranks = (2, 2, 3, 3, 2, 2, 2)
        names = ("x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate")
        shapes = []
        for info, r, n in zip(infos, ranks, names):
            s = static_dims(info, r, n, tuple(range(1 if n == "x" else 0, r)))
            if isinstance(s, str):
                return Check.refuse(s)
            shapes.append(s)
        x, rw, gu, dn, sgu, sdn, sg = shapes
        h, e = x[1], rw[0]
        i2, is2 = gu[1], sgu[0]
        if i2 % 2 or is2 % 2:
            return Check.refuse("gate_up widths must be even (gate rows then up rows)")
        inter, shared = i2 // 2, is2 // 2
        want = {"router_weight": (e, h), "gate_up": (e, i2, h), "down": (e, h, inter), "shared_gate_up": (is2, h),
                "shared_down": (h, shared), "shared_gate": (1, h)}
        for n, s in zip(names[1:], shapes[1:]):
            if tuple(s) != want[n]:
                return Check.refuse(f"{n} has shape {list(s)}, expected {list(want[n])}")
        top_k = attr(node, "top_k")
        if not isinstance(top_k, int) or not 1 <= top_k <= e:
            return Check.refuse(f"top_k={top_k!r} outside 1..{e}")
        return Check(True, config={"hidden": h, "experts": e, "top_k": top_k, "inter": inter, "shared_inter": shared,
                                   "act": ACT_DTYPES[act], "norm_topk_prob": bool(attr(node, "norm_topk_prob", 1)),
                                   "weight_formats": (FORMATS[fmt],)})

    def rewrite(self, node, ctx, config):
        x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate = node.input
        fmt = config["weight_formats"][0]
        base = node.name or "moe"
        t = lambda hint: ctx.fresh(f"{base}.{hint}")  # noqa: E731
        nodes = []

        def p(name, inputs, outputs):
            nodes.append(plugin_node(name, PLUGIN_NAMESPACE, inputs, outputs, t(name)))
            return outputs

        (logits,) = p("router_logits", [x, router_weight], [t("logits")])
        ids, w, sw = p("router_topk", [logits, x, shared_gate], [t("topk_ids"), t("topk_w"), t("shared_w")])
        n_tok = ctx.get(x).shape[0]
        if n_tok is not None and n_tok <= DECODE_MAX_TOKENS:
            (act,) = p(f"decode_gate_up_{fmt}", [x, gate_up, shared_gate_up, ids], [t("act")])
            (inter,) = p(f"decode_down_{fmt}", [act, down, shared_down, ids], [t("inter")])
            p("combine_slots", [inter, w, sw], [node.output[0]])
        else:
            sorted_, slot_row, expert_off, tile_off = p("align", [ids], [t("sorted"), t("slot_row"),
                                                                          t("expert_off"), t("tile_off")])
            route = [sorted_, expert_off, tile_off]
            (act,) = p(f"prefill_gate_up_{fmt}", [x, gate_up, shared_gate_up, *route], [t("act")])
            (inter,) = p(f"prefill_down_{fmt}", [act, down, shared_down, *route], [t("inter")])
            p("combine_sorted", [inter, w, sw, slot_row], [node.output[0]])
        return nodes, {f"{PLUGIN_NAMESPACE}::{n.op_type}" for n in nodes}
