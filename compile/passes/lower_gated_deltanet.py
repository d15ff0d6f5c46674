"""Pass ``lower_gated_deltanet``: ``qcn::GatedDeltaNet`` -> the ``qcn::GatedDeltaNet`` AOT plugin
of ``plugins/gated_deltanet/trt_plugin.py`` (full TensorRT >= 10.9 only).

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

import onnx_ir as ir

from .base import ACT_DTYPES, QcnRule, attr, dims, plugin_op, refuse

PLUGIN_NAMESPACE = "qcn"
PLUGIN_NAME = "GatedDeltaNet"
NAMES = ("qkv", "z", "b", "a", "conv_weight", "A_log", "dt_bias", "norm_weight", "conv_state", "recurrent_state")
ACT_INPUTS = ("qkv", "z", "b", "a", "conv_weight", "dt_bias", "norm_weight", "conv_state")


class LowerGatedDeltaNet(QcnRule):
    pass_name = "lower_gated_deltanet"
    root_op = "GatedDeltaNet"

    def pattern(self, op, qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state):
        return op.GatedDeltaNet(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                                _domain="qcn", _outputs=3)

    def check_node(self, context, **values):
        hk = attr(context.root, "num_k_heads")
        if not isinstance(hk, int) or hk <= 0:
            return refuse(f"num_k_heads={hk!r}")
        act = values["qkv"].dtype
        if act not in ACT_DTYPES:
            return refuse(f"activation dtype {act} is not bf16/fp16/fp32")
        odd = [n for n in ACT_INPUTS if values[n].dtype != act]
        if odd:
            return refuse(f"inputs {odd} do not have the activation dtype {ACT_DTYPES[act]}")
        for n in ("A_log", "recurrent_state"):
            if values[n].dtype != ir.DataType.FLOAT:
                return refuse(f"{n} must be float32 (the kernels' state/A_log type), got {values[n].dtype}")
        shapes = [dims(values["qkv"], 3, "qkv", (2,)), dims(values["z"], 4, "z", (2, 3)),
                  dims(values["conv_weight"], 2, "conv_weight", (0, 1))]
        for s in shapes:
            if not isinstance(s, tuple):
                return s
        qkv, z, cw = shapes
        c, hv, dv = qkv[2], z[2], z[3]
        if cw[0] != c:
            return refuse(f"conv_weight has {cw[0]} channels, qkv {c}")
        if c - hv * dv <= 0 or (c - hv * dv) % (2 * hk) or hv % hk:
            return refuse(f"C={c} is not 2*Hk*Dk + Hv*Dv with Hk={hk} dividing Hv={hv} (Dv={dv})")
        return {"act": ACT_DTYPES[act]}

    def rewrite(self, op, qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                **_):
        node = self._root
        outs = plugin_op(op, PLUGIN_NAME, PLUGIN_NAMESPACE,
                         [qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state],
                         outputs=3, num_k_heads=int(attr(node, "num_k_heads")),
                         norm_eps=float(attr(node, "norm_eps", 1e-6)))
        return self.count_rewrite(op, outs, {f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"})
