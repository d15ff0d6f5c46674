"""Pass: ``qcn::GatedDeltaNet`` -> the ``qcn::GatedDeltaNet`` AOT plugin of
``plugins/gated_deltanet/trt_plugin.py`` (full TensorRT >= 10.9 only).

One node in, one plugin node out: op_type ``GatedDeltaNet``, plugin_namespace ``qcn``, the
same 10 inputs and 3 outputs in the same order (qkv, z, b, a, conv_weight, A_log, dt_bias,
norm_weight, conv_state, recurrent_state -> y, conv_state_out, recurrent_state_out) and the
attributes ``num_k_heads`` / ``norm_eps``. T may stay dynamic (the plugin embeds the chunked
prefill kernel then, the decode kernel when T == 1 is a build-time constant).

Refused (node left alone; the parser inlines its function body) when: C, Hv, Dv or K are not
static (the AOT kernels compile them in), an activation is not bf16/fp16/fp32 or not all the
same dtype, A_log / recurrent_state are not fp32, or C != 2*Hk*Dk + Hv*Dv, Hv % Hk != 0.
The plugin declares recurrent_state_out as aliased to recurrent_state (updated in place);
whether TensorRT accepts that for a graph input/output pair is unverified.
NOT EXECUTED: no full TensorRT here; the plugin node has been checked only against a stub of
``tensorrt.plugin`` (tests/test_plugin_lowering.py).
"""

from __future__ import annotations

from onnx import TensorProto

from ._lowering import ACT_DTYPES, Check, LoweringPass, attr, plugin_node, static_dims

PLUGIN_NAMESPACE = "qcn"
PLUGIN_NAME = "GatedDeltaNet"
ACT_INPUTS = ("qkv", "z", "b", "a", "conv_weight", "dt_bias", "norm_weight", "conv_state")


class LowerGatedDeltaNet(LoweringPass):
    op_type = "GatedDeltaNet"
    name = "lower_gated_deltanet"

    def check(self, node, ctx) -> Check:
        if len(node.input) != 10 or len(node.output) != 3 or not all(node.input) or not all(node.output):
            return Check.refuse("needs all 10 inputs and 3 outputs")
        hk = attr(node, "num_k_heads")
        if not isinstance(hk, int) or hk <= 0:
            return Check.refuse(f"num_k_heads={hk!r}")
        info = dict(zip(("qkv", "z", "b", "a", "conv_weight", "A_log", "dt_bias", "norm_weight", "conv_state",
                         "recurrent_state"), (ctx.get(n) for n in node.input)))
        act = info["qkv"].dtype
        if act not in ACT_DTYPES:
            return Check.refuse(f"activation dtype {act} is not bf16/fp16/fp32")
        odd = [n for n in ACT_INPUTS if info[n].dtype != act]
        if odd:
            return Check.refuse(f"inputs {odd} do not have the activation dtype {ACT_DTYPES[act]}")
        for n in ("A_log", "recurrent_state"):
            if info[n].dtype != TensorProto.FLOAT:
                return Check.refuse(f"{n} must be float32 (the kernels' state/A_log type)")
        qkv = static_dims(info["qkv"], 3, "qkv", (2,))
        z = static_dims(info["z"], 4, "z", (2, 3))
        cw = static_dims(info["conv_weight"], 2, "conv_weight", (0, 1))
        for s in (qkv, z, cw):
            if isinstance(s, str):
                return Check.refuse(s)
        c, hv, dv, kconv = qkv[2], z[2], z[3], cw[1]
        if cw[0] != c:
            return Check.refuse(f"conv_weight has {cw[0]} channels, qkv {c}")
        if c - hv * dv <= 0 or (c - hv * dv) % (2 * hk) or hv % hk:
            return Check.refuse(f"C={c} is not 2*Hk*Dk + Hv*Dv with Hk={hk} dividing Hv={hv} (Dv={dv})")
        return Check(True, config={"act": ACT_DTYPES[act]})

    def rewrite(self, node, ctx, config):
        n = plugin_node(PLUGIN_NAME, PLUGIN_NAMESPACE, node.input, node.output, node.name or ctx.fresh("gdn_plugin"),
                        num_k_heads=int(attr(node, "num_k_heads")), norm_eps=float(attr(node, "norm_eps", 1e-6)))
        return [n], {f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"}
