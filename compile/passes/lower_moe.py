"""Pass ``lower_moe``: ``qcn::MoE`` -> the chain of AOT plugins of ``plugins/moe/trt_plugin.py``
(namespace ``qcn_moe``; full TensorRT >= 10.9 only), dense (unquantized) weights:

  router_logits(x, router_weight)                          -> logits
  router_topk(logits, x, shared_gate)                      -> ids, w, sw
  N static and <= DECODE_MAX_TOKENS (decode path):
    decode_gate_up_dense(x, gate_up, shared_gate_up, ids)  -> act
    decode_down_dense(act, down, shared_down, ids)         -> inter
    combine_slots(inter, w, sw)                            -> y
  otherwise (N dynamic, e.g. the one engine built from prefill.onnx, or N larger):
    align(ids)                                             -> sorted, slot_row, expert_off, tile_off
    prefill_gate_up_dense(x, gate_up, shared_gate_up, sorted, expert_off, tile_off) -> act
    prefill_down_dense(act, down, shared_down, sorted, expert_off, tile_off)        -> inter
    combine_sorted(inter, w, sw, slot_row)                 -> y

The ONNX weight layouts are the kernels' (gate_up [E, 2I, H] gate rows first, down [E, H, I],
shared_gate_up [2Is, H], shared_down [H, Is], shared_gate [1, H]). Sizes, top_k,
norm_topk_prob and the activation dtype are fixed at registration (the pass's config).
weight_format "fp8" with one scale per output row (scale inputs [..., R, 1]) lowers to the
kernels' fp8 plugins (``*_fp8``; the scales, squeezed to [..., R], follow each weight).
Refused (node left alone; the parser inlines its function body) when weight_format is neither
(int4 is not wired to the plugins yet), when fp8 scales are 1x128 blocks (G > 1: the MoE
kernels take FP8 with one fp32 scale per output row only), H/E/I/Is are not static,
shapes are inconsistent, top_k is outside 1..E, or dtypes are not one bf16/fp16/fp32
activation dtype. NOT EXECUTED: no full TensorRT here; checked only against a stub of
``tensorrt.plugin`` (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

import onnx_ir as ir

from .base import ACT_DTYPES, QcnRule, attr, dims, plugin_op, refuse

PLUGIN_NAMESPACE = "qcn_moe"
DECODE_MAX_TOKENS = 16  # = plugins/moe/launch.DECODE_MAX_TOKENS (that module needs triton; a test pins them equal)
FORMATS = {"float": "dense", "fp8": "fp8"}
WEIGHT_INPUTS = ("gate_up", "down", "shared_gate_up", "shared_down")  # the ones an fp8 node stores as E4M3
NAMES = ("x", "router_weight", "gate_up", "down", "shared_gate_up", "shared_down", "shared_gate")
RANKS = (2, 2, 3, 3, 2, 2, 2)


class LowerMoE(QcnRule):
    pass_name = "lower_moe"
    root_op = "MoE"

    def pattern(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        return op.MoE(x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate, _domain="qcn",
                      _allow_other_inputs=True)

    def check_node(self, context, **values):
        node = context.root
        fmt = attr(node, "weight_format", "float")
        if fmt not in FORMATS:
            return refuse(f"weight_format {fmt!r} unsupported by the lowering (supported: {list(FORMATS)})")
        vals = [values[n] for n in NAMES]
        act = vals[0].dtype
        if act not in ACT_DTYPES:
            return refuse(f"activation dtype {act} is not bf16/fp16/fp32")
        want_w = ir.DataType.FLOAT8E4M3FN if fmt == "fp8" else act
        if any(v.dtype != (want_w if n in WEIGHT_INPUTS else act) for v, n in zip(vals, NAMES)):
            return refuse("inputs do not all have the activation dtype" + (" (fp8: the four expert weights E4M3)"
                                                                          if fmt == "fp8" else ""))
        scales = list(node.inputs[len(NAMES):])
        if fmt == "fp8":
            if len(scales) != 4 or any(s is None or s.dtype != ir.DataType.FLOAT for s in scales):
                return refuse("weight_format 'fp8' needs four fp32 *_scale inputs")
            g = [s.shape[-1] if s.shape is not None else None for s in scales]
            if any(x != 1 for x in g):
                return refuse(f"fp8 scales with {g} blocks along K (1x128 blocks): the MoE kernels take FP8 with one "
                              "fp32 scale per output row only (quantization.fp8_granularity: channel)")
        shapes = []
        for v, r, n in zip(vals, RANKS, NAMES):
            s = dims(v, r, n, tuple(range(1 if n == "x" else 0, r)))
            if not isinstance(s, tuple):
                return s
            shapes.append(s)
        x, rw, gu, dn, sgu, sdn, sg = shapes
        h, e = x[1], rw[0]
        i2, is2 = gu[1], sgu[0]
        if i2 % 2 or is2 % 2:
            return refuse("gate_up widths must be even (gate rows then up rows)")
        inter, shared = i2 // 2, is2 // 2
        want = {"router_weight": (e, h), "gate_up": (e, i2, h), "down": (e, h, inter), "shared_gate_up": (is2, h),
                "shared_down": (h, shared), "shared_gate": (1, h)}
        for n, s in zip(NAMES[1:], shapes[1:]):
            if tuple(s) != want[n]:
                return refuse(f"{n} has shape {list(s)}, expected {list(want[n])}")
        top_k = attr(node, "top_k")
        if not isinstance(top_k, int) or not 1 <= top_k <= e:
            return refuse(f"top_k={top_k!r} outside 1..{e}")
        return {"hidden": h, "experts": e, "top_k": top_k, "inter": inter, "shared_inter": shared,
                "act": ACT_DTYPES[act], "norm_topk_prob": bool(attr(node, "norm_topk_prob", 1)),
                "weight_formats": [FORMATS[fmt]]}

    def rewrite(self, op, x, router_weight, gate_up, down, shared_gate_up, shared_down, shared_gate):
        fmt = self.config["weight_formats"][0]
        names = []
        if fmt == "fp8":  # each weight followed by its scales, [..., R, 1] -> [..., R] (the kernels' layout)
            axis = op.Constant(value_ints=[-1])
            gs, ds, sgs, sds = (op.Squeeze(s, axis) for s in self._root.inputs[len(NAMES):])
            gate_up, shared_gate_up = (gate_up, gs), (shared_gate_up, sgs)
            down, shared_down = (down, ds), (shared_down, sds)
        else:
            gate_up, down, shared_gate_up, shared_down = (gate_up,), (down,), (shared_gate_up,), (shared_down,)

        def p(name, inputs, outputs=1):
            names.append(name)
            return plugin_op(op, name, PLUGIN_NAMESPACE, inputs, outputs=outputs)

        logits = p("router_logits", [x, router_weight])
        ids, w, sw = p("router_topk", [logits, x, shared_gate], 3)
        n_tok = x.shape[0] if x.shape is not None else None
        if isinstance(n_tok, int) and n_tok <= DECODE_MAX_TOKENS:
            act = p(f"decode_gate_up_{fmt}", [x, *gate_up, *shared_gate_up, ids])
            inter = p(f"decode_down_{fmt}", [act, *down, *shared_down, ids])
            y = p("combine_slots", [inter, w, sw])
        else:
            sorted_, slot_row, expert_off, tile_off = p("align", [ids], 4)
            route = [sorted_, expert_off, tile_off]
            act = p(f"prefill_gate_up_{fmt}", [x, *gate_up, *shared_gate_up, *route])
            inter = p(f"prefill_down_{fmt}", [act, *down, *shared_down, *route])
            y = p("combine_sorted", [inter, w, sw, slot_row])
        return self.count_rewrite(op, y, {f"{PLUGIN_NAMESPACE}::{n}" for n in names})
