"""Pass ``cpu_gated_deltanet``: ``qcn::GatedDeltaNet`` -> standard ONNX ops around ONNX Runtime's
CPU contrib op ``com.microsoft.LinearAttention`` (update_rule ``gated_delta``), for the cpu
target (ONNX Runtime >= 1.32).

Why: the op's function body runs the recurrence as a per-token ``Scan`` (about 30 kernels per
token and head group, the biggest item of the prefill profile) plus ~60 kernels of layout work
(conv windows by ``Gather``, the time-major transposes the Scan needs). ONNX Runtime's
``LinearAttention`` kernel runs the same recurrence in one kernel (chunk-parallel WY form for
T > 1), and the rest is written for the sizes the check pins:

  x         = Concat(conv_state, qkv^T)                     [B, C, W-1+T]
  conv      = Conv(x, conv_weight[C, 1, W], group=C)        [B, C, T]    (T = 1: ReduceSum(x * w))
  mixed     = silu(conv)^T                                  [B, T, C]
  q, k, v   = Split(mixed)                                  L2-normalised per K-head, q * K^-0.5,
                                                            q/k repeated to the HV value heads
            (u / sqrt(sum u^2 + eps) as RMSNormalization(u, scale, eps / K) with scale K^-0.5 for k,
            K^-1 for q: one kernel for seven)
  g, beta   = -exp(A_log) * softplus(a + dt_bias), sigmoid(b)   (-exp(A_log) folded when A_log is a
                                                                 constant)
  o, S_out  = LinearAttention(q, k, v, recurrent_state, g, beta; q_num_heads = kv_num_heads = HV,
                              scale 1, update_rule gated_delta)
  y         = RMSNormalization(o, norm_weight, norm_eps) * silu(z)   (opset 23)

``LinearAttention``'s gated_delta rule is ``S = exp(g) S + beta k (x) (v - exp(g) S^T k)``,
``o = scale q^T S`` (its schema), i.e. docs/OPS.md step 6 with the decay applied first: the same
recurrence, fp32 state [B, HV, K, V]. The results equal the function body up to fp32 rounding
(other summation orders; tests/test_cpu_lowering.py compares them on odd sizes, T = 1 and T > 1,
chunked calls).

Refused (node left alone: ONNX Runtime inlines the body) when: the activation dtype is not
float32 (the CPU export's; the body's casts for 16-bit activations are not reproduced), A_log /
recurrent_state are not fp32, C, HV, V or W are not static, the sizes are inconsistent, or the
graph's opset is below 23.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import QcnRule, attr, dims, refuse
from .quant.weights import PassWeights

MS_DOMAIN = "com.microsoft"
NAMES = ("qkv", "z", "b", "a", "conv_weight", "A_log", "dt_bias", "norm_weight", "conv_state", "recurrent_state")
L2_EPS = 1e-6  # docs/OPS.md step 3 (fixed, not norm_eps); = plugins/gated_deltanet/op.L2_EPS


def _i64(op, values):
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def _f32(op, value):
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32)))


class CpuGatedDeltaNet(QcnRule):
    pass_name = "cpu_gated_deltanet"
    root_op = "GatedDeltaNet"

    def pattern(self, op, qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state):
        return op.GatedDeltaNet(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                                _domain="qcn", _outputs=3)

    def check_node(self, context, **values):
        hk = attr(context.root, "num_k_heads")
        if not isinstance(hk, int) or hk <= 0:
            return refuse(f"num_k_heads={hk!r}")
        f32 = ir.DataType.FLOAT
        odd = [n for n in NAMES if values[n].dtype != f32]
        if odd:
            return refuse(f"inputs {odd} are not float32 (this lowering is for the CPU export's fp32 activations)")
        shapes = [dims(values["qkv"], 3, "qkv", (2,)), dims(values["z"], 4, "z", (2, 3)),
                  dims(values["conv_weight"], 2, "conv_weight", (0, 1))]
        for s in shapes:
            if not isinstance(s, tuple):
                return s
        (_, t, c), (_, _, hv, dv), (cw, w) = shapes
        if cw != c:
            return refuse(f"conv_weight has {cw} channels, qkv {c}")
        if w < 2:
            return refuse(f"conv width {w} < 2")
        if hv % hk or (c - hv * dv) <= 0 or (c - hv * dv) % (2 * hk):
            return refuse(f"C={c}, HV={hv}, V={dv} and num_k_heads={hk} are inconsistent")
        opset = context.model.opset_imports.get("", 0)
        if opset < 23:
            return refuse(f"graph opset {opset} < 23 (the lowering uses RMSNormalization, opset 23)")
        return {}

    def rewrite(self, op, qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state):
        node = self._root
        hk = attr(node, "num_k_heads")
        eps = float(attr(node, "norm_eps"))
        t = qkv.shape[1] if isinstance(qkv.shape[1], int) else None
        c = qkv.shape[2]
        hv, dv = z.shape[2], z.shape[3]
        w = conv_weight.shape[1]
        dk = (c - hv * dv) // (2 * hk)
        rep = hv // hk

        # causal depthwise conv over [conv_state ; qkv^T]
        if t == 1:
            x = op.Concat(conv_state, op.Reshape(qkv, _i64(op, [0, c, 1])), axis=2)           # [B, C, W]
            conv = op.ReduceSum(op.Mul(x, conv_weight), _i64(op, [-1]), keepdims=1)          # [B, C, 1]
            conv_out = op.Slice(x, _i64(op, [1]), _i64(op, [w]), _i64(op, [2]))
            mixed = op.Reshape(op.Mul(conv, op.Sigmoid(conv)), _i64(op, [0, 1, c]))         # [B, 1, C]
        else:
            x = op.Concat(conv_state, op.Transpose(qkv, perm=[0, 2, 1]), axis=2)              # [B, C, W-1+T]
            conv = op.Conv(x, op.Unsqueeze(conv_weight, _i64(op, [1])), group=c)             # [B, C, T]
            conv_out = op.Slice(x, _i64(op, [-(w - 1)]), _i64(op, [np.iinfo(np.int64).max]), _i64(op, [2]))
            mixed = op.Transpose(op.Mul(conv, op.Sigmoid(conv)), perm=[0, 2, 1])             # [B, T, C]
        q, k, v = op.Split(mixed, _i64(op, [hk * dk, hk * dk, hv * dv]), axis=-1, _outputs=3)

        def l2_heads(u, scale):  # [B, T, Hk*Dk] -> normalised * scale, repeated: [B, T, Hv*Dk]
            # u / sqrt(sum u^2 + eps) = RMSNorm(u, eps / Dk) / sqrt(Dk): one kernel instead of seven
            u4 = op.Reshape(u, _i64(op, [0, 0, hk, 1, dk]))
            w = np.full(dk, np.float32(scale) / np.sqrt(np.float32(dk)), dtype=np.float32)
            un = op.RMSNormalization(u4, _f32(op, w), axis=-1, epsilon=L2_EPS / dk)
            if rep > 1:
                un = op.Expand(un, _i64(op, [1, 1, 1, rep, 1]))
            return op.Reshape(un, _i64(op, [0, 0, hv * dk]))

        qn = l2_heads(q, np.float32(1.0) / np.sqrt(np.float32(dk)))  # the attention scale folded in
        kn = l2_heads(k, 1.0)
        beta = op.Sigmoid(b)
        if A_log.const_value is not None:  # a weight: -exp(A_log) once, here, not on every call
            neg_a = _f32(op, -np.exp(PassWeights.torch(A_log).numpy().astype(np.float32)))
        else:
            neg_a = op.Neg(op.Exp(A_log))
        g = op.Mul(neg_a, op.Softplus(op.Add(a, dt_bias)))
        o, state_out = op.LinearAttention(qn, kn, v, recurrent_state, g, beta, _domain=MS_DOMAIN, _outputs=2,
                                          q_num_heads=hv, kv_num_heads=hv, scale=1.0, update_rule="gated_delta")
        o4 = op.Reshape(o, _i64(op, [0, 0, hv, dv]))
        normed = op.RMSNormalization(o4, norm_weight, axis=-1, epsilon=eps)
        y = op.Reshape(op.Mul(normed, op.Mul(z, op.Sigmoid(z))), _i64(op, [0, 0, hv * dv]))
        outputs = [y, conv_out, state_out]
        return self.count_rewrite(op, outputs, set())
