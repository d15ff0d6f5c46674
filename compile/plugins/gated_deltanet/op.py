"""qcn::GatedDeltaNet: one linear-attention (Gated DeltaNet) layer between its projections.

Shapes (docs/OPS.md): B batch, T tokens, C = 2*Hk*Dk + Hv*Dv conv channels, K conv kernel.
    qkv [B, T, C]  contiguous q | k | v after in_proj, before the conv
    z [B, T, Hv, Dv], b [B, T, Hv], a [B, T, Hv]
    conv_weight [C, K], A_log [Hv] fp32, dt_bias [Hv], norm_weight [Dv]
    conv_state [B, C, K-1] (activation dtype), recurrent_state [B, Hv, Dk, Dv] fp32
 -> y [B, T, Hv*Dv], conv_state_out [B, C, K-1], recurrent_state_out [B, Hv, Dk, Dv] fp32
Attributes: num_k_heads (Hk), norm_eps (epsilon of the gated RMSNorm).

Semantics are those of transformers' Qwen3NextGatedDeltaNet (per token t): depthwise causal
conv over [conv_state ; qkv] then SiLU; split q, k, v; L2-normalise q and k (eps 1e-6),
q *= Dk^-0.5; v head j reads qk head j // (Hv/Hk); beta = sigmoid(b);
g = -exp(A_log) * softplus(a + dt_bias); S = exp(g) S; S += k (x) beta (v - S^T k); o = S^T q;
y = norm_weight * rmsnorm(o) * silu(z). The torch op runs the naive per-token reference
(`reference.py`, shared with the kernel tests); the function body is the same math in standard
ONNX ops (a Scan over T).

qcn::GatedDeltaNetVerify is the verify form (speculative decoding, docs/MTP.md): the same inputs
and math, but it returns the state after *every* token, so the runtime can commit the state
after the last accepted token without replaying anything:
 -> y [B, T, Hv*Dv], conv_states [B, T, C, K-1], recurrent_states [B, T, Hv, Dk, Dv] fp32
where entry t is the state after token t (entry T-1 is qcn::GatedDeltaNet's state output).
It has no TensorRT plugin: TensorRT inlines its function body.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from .reference import gated_deltanet_reference
from ..onnx_function import DOMAIN, DOMAIN_VERSION, INT64_MAX, FunctionBuilder, QcnOp, register_schema

OP_NAME = "GatedDeltaNet"
L2_EPS = 1e-6  # as reference.py and transformers' l2norm
INPUTS = ["qkv", "z", "b", "a", "conv_weight", "A_log", "dt_bias", "norm_weight", "conv_state", "recurrent_state"]
OUTPUTS = ["y", "conv_state_out", "recurrent_state_out"]
VERIFY_OP_NAME = "GatedDeltaNetVerify"
VERIFY_OUTPUTS = ["y", "conv_states", "recurrent_states"]


def split_sizes(C: int, Hv: int, Dv: int, num_k_heads: int) -> tuple[int, int, int]:
    """(Hk*Dk, Hk*Dk, Hv*Dv): the q | k | v widths inside C, with the error a caller needs."""
    key_dim2 = C - Hv * Dv
    if key_dim2 <= 0 or key_dim2 % (2 * num_k_heads):
        raise ValueError(f"GatedDeltaNet: C={C} is not 2*Hk*Dk + Hv*Dv for Hk={num_k_heads}, Hv={Hv}, Dv={Dv}")
    return key_dim2 // 2, key_dim2 // 2, Hv * Dv


@torch.library.custom_op("qcn::gated_deltanet", mutates_args=())
def gated_deltanet(
    qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
    conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
    conv_state: torch.Tensor, recurrent_state: torch.Tensor, num_k_heads: int, norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    split_sizes(qkv.shape[2], z.shape[2], z.shape[3], num_k_heads)
    y, conv_state_out, recurrent_state_out = gated_deltanet_reference(
        qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
        num_k_heads=num_k_heads, norm_eps=norm_eps, compute_dtype=torch.float32)
    return y.to(qkv.dtype), conv_state_out.to(conv_state.dtype).contiguous(), recurrent_state_out.float()


@gated_deltanet.register_fake
def _(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, num_k_heads, norm_eps):
    B, T, _ = qkv.shape
    return (qkv.new_empty(B, T, z.shape[2] * z.shape[3]), torch.empty_like(conv_state),
            torch.empty_like(recurrent_state))


@torch.library.custom_op("qcn::gated_deltanet_verify", mutates_args=())
def gated_deltanet_verify(
    qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
    conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
    conv_state: torch.Tensor, recurrent_state: torch.Tensor, num_k_heads: int, norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    split_sizes(qkv.shape[2], z.shape[2], z.shape[3], num_k_heads)
    y, conv_states, recurrent_states = gated_deltanet_reference(
        qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
        num_k_heads=num_k_heads, norm_eps=norm_eps, compute_dtype=torch.float32, per_token_states=True)
    return y.to(qkv.dtype), conv_states.to(conv_state.dtype).contiguous(), recurrent_states.float().contiguous()


@gated_deltanet_verify.register_fake
def _(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, num_k_heads, norm_eps):
    B, T, _ = qkv.shape
    return (qkv.new_empty(B, T, z.shape[2] * z.shape[3]), conv_state.new_empty(B, T, *conv_state.shape[1:]),
            recurrent_state.new_empty(B, T, *recurrent_state.shape[1:]))


def _schema(name: str = OP_NAME) -> OpSchema:
    P = OpSchema.FormalParameter
    types = {"qkv": "T", "z": "T", "b": "T", "a": "T", "conv_weight": "T", "A_log": "F", "dt_bias": "T",
             "norm_weight": "T", "conv_state": "T", "recurrent_state": "F"}
    outs = VERIFY_OUTPUTS if name == VERIFY_OP_NAME else OUTPUTS
    return OpSchema(
        name, DOMAIN, DOMAIN_VERSION,
        doc=__doc__,
        inputs=[P(n, types[n]) for n in INPUTS],
        outputs=[P(outs[0], "T"), P(outs[1], "T"), P(outs[2], "F")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("F", ["tensor(float)"], "fp32 state and A_log")],
        attributes=[OpSchema.Attribute("num_k_heads", OpSchema.AttrType.INT, "Hk"),
                    OpSchema.Attribute("norm_eps", OpSchema.AttrType.FLOAT, "gated RMSNorm epsilon")],
    )


register_schema(_schema())
register_schema(_schema(VERIFY_OP_NAME))
_qcn = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


def _translation(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                 num_k_heads: int, norm_eps: float):
    return _qcn.GatedDeltaNet(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state,
                              recurrent_state, num_k_heads=num_k_heads, norm_eps=norm_eps)


def _verify_translation(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                        num_k_heads: int, norm_eps: float):
    return _qcn.GatedDeltaNetVerify(qkv, z, b, a, conv_weight, A_log, dt_bias, norm_weight, conv_state,
                                    recurrent_state, num_k_heads=num_k_heads, norm_eps=norm_eps)


def _scan_body(per_token: bool = False) -> onnx.GraphProto:
    """One token: S [B,Hv,Dk,Dv], q_t/k_t [B,Hv,Dk], v_t [B,Hv,Dv], g_t/beta_t [B,Hv] -> S', o_t
    (and S' again as a scan output when ``per_token``: the stacked states after every token)."""
    f = FunctionBuilder("gdn_step", 0, prefix="step_")
    last2 = f.const([-1, -2], "int64")
    decay = f.op("Unsqueeze", f.op("Exp", "g_t"), last2)  # [B,Hv,1,1]
    S = f.op("Mul", "S_in", decay)
    k_row = f.op("Unsqueeze", "k_t", f.const([-2], "int64"))  # [B,Hv,1,Dk]
    kv_mem = f.op("Squeeze", f.op("MatMul", k_row, S), f.const([-2], "int64"))  # [B,Hv,Dv]
    delta = f.op("Mul", f.op("Sub", "v_t", kv_mem), f.op("Unsqueeze", "beta_t", f.const([-1], "int64")))
    k_col = f.op("Unsqueeze", "k_t", f.const([-1], "int64"))  # [B,Hv,Dk,1]
    d_row = f.op("Unsqueeze", delta, f.const([-2], "int64"))  # [B,Hv,1,Dv]
    f.graph_op("Add", [S, f.op("Mul", k_col, d_row)], ["S_out"])
    q_row = f.op("Unsqueeze", "q_t", f.const([-2], "int64"))
    f.graph_op("Squeeze", [f.op("MatMul", q_row, "S_out"), f.const([-2], "int64")], ["o_t"])
    fl = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    outs = [vi("S_out", fl, [None] * 4), vi("o_t", fl, [None] * 3)]
    if per_token:
        f.graph_op("Identity", ["S_out"], ["S_t"])
        outs.append(vi("S_t", fl, [None] * 4))
    return helper.make_graph(
        f.nodes, "gdn_step",
        [vi("S_in", fl, [None] * 4), vi("q_t", fl, [None] * 3), vi("k_t", fl, [None] * 3),
         vi("v_t", fl, [None] * 3), vi("g_t", fl, [None] * 2), vi("beta_t", fl, [None] * 2)],
        outs,
    )


def verify_function_proto(opset: int) -> onnx.FunctionProto:
    return function_proto(opset, per_token=True)


def function_proto(opset: int, per_token: bool = False) -> onnx.FunctionProto:
    f = FunctionBuilder(VERIFY_OP_NAME if per_token else OP_NAME, opset)
    FLOAT = TensorProto.FLOAT
    i64 = lambda v: f.const(v, "int64")  # noqa: E731
    T = f.dim("qkv", 1)
    Hv, Dv = f.dim("z", 2), f.dim("z", 3)
    C = f.dim("qkv", 2)
    Hk = f.op("Unsqueeze", f.attr_const("num_k_heads", onnx.AttributeProto.INT), i64([0]))

    # causal depthwise conv: window[b, c, t, j] = x[b, c, t + j]
    x = f.op("Concat", f.op("CastLike", "conv_state", "qkv"), f.op("Transpose", "qkv", perm=[0, 2, 1]), axis=2)
    K = f.dim("conv_weight", 1)
    t_idx = f.op("Unsqueeze", f.op("Range", i64(0), f.op("Squeeze", T), i64(1)), i64([1]))  # [T,1]
    if per_token:  # the conv state after token t: x[b, c, t+1+j], j < K-1 -> [B,T,C,K-1]
        jm = f.op("Unsqueeze", f.op("Range", i64(1), f.op("Squeeze", K), i64(1)), i64([0]))  # [1,K-1]: 1..K-1
        after = f.op("Gather", x, f.op("Add", t_idx, jm), axis=2)  # [B,C,T,K-1]
        f.graph_op("Transpose", [after], ["conv_states"], perm=[0, 2, 1, 3])
    else:
        f.graph_op("Slice", [x, T, i64([INT64_MAX]), i64([2])], ["conv_state_out"])
    j_idx = f.op("Unsqueeze", f.op("Range", i64(0), f.op("Squeeze", K), i64(1)), i64([0]))  # [1,K]
    windows = f.op("Gather", x, f.op("Add", t_idx, j_idx), axis=2)  # [B,C,T,K]
    w = f.op("Unsqueeze", "conv_weight", i64([1]))  # [C,1,K]
    conv = f.op("ReduceSum", f.op("Mul", windows, w), i64([-1]), keepdims=0)  # [B,C,T]
    mixed = f.op("Transpose", f.op("Mul", conv, f.op("Sigmoid", conv)), perm=[0, 2, 1])  # [B,T,C]

    value_dim = f.op("Mul", Hv, Dv)
    key_dim = f.op("Div", f.op("Sub", C, value_dim), i64([2]))
    q, k, v = f.op("Split", mixed, f.op("Concat", key_dim, key_dim, value_dim, axis=0), axis=-1, outputs=3)

    def heads(t, rep):  # [B,T,Hk*Dk] -> fp32 [B,T,Hv,Dk], head j reads qk head j // rep
        t4 = f.op("Reshape", t, f.op("Concat", i64([0, 0]), Hk, i64([1, -1]), axis=0))  # [B,T,Hk,1,Dk]
        t5 = f.op("Expand", t4, f.op("Concat", i64([1, 1, 1]), rep, i64([1]), axis=0))
        return f.op("Cast", f.op("Reshape", t5, f.op("Concat", i64([0, 0]), Hv, i64([-1]), axis=0)), to=FLOAT)

    def l2norm(t):
        ss = f.op("ReduceSum", f.op("Mul", t, t), i64([-1]), keepdims=1)
        return f.op("Mul", t, f.op("Reciprocal", f.op("Sqrt", f.op("Add", ss, f.const(L2_EPS, "float32")))))

    rep = f.op("Div", Hv, Hk)
    qn, kn = l2norm(heads(q, rep)), l2norm(heads(k, rep))
    Dk = f.op("Cast", f.dim(qn, -1), to=FLOAT)
    qn = f.op("Mul", qn, f.op("Reciprocal", f.op("Sqrt", Dk)))
    vf = f.op("Cast", f.op("Reshape", v, f.op("Concat", i64([0, 0]), Hv, Dv, axis=0)), to=FLOAT)

    beta = f.op("Cast", f.op("Sigmoid", "b"), to=FLOAT)  # [B,T,Hv]
    dt = f.op("Add", f.op("Cast", "a", to=FLOAT), f.op("Cast", "dt_bias", to=FLOAT))
    g = f.op("Mul", f.op("Neg", f.op("Exp", f.op("Cast", "A_log", to=FLOAT))), f.op("Softplus", dt))

    tm = lambda t, perm: f.op("Transpose", t, perm=perm)  # noqa: E731  time-major for Scan
    scanned = f.op(
        "Scan", f.op("Cast", "recurrent_state", to=FLOAT),
        tm(qn, [1, 0, 2, 3]), tm(kn, [1, 0, 2, 3]), tm(vf, [1, 0, 2, 3]), tm(g, [1, 0, 2]), tm(beta, [1, 0, 2]),
        outputs=3 if per_token else 2, num_scan_inputs=5, body=_scan_body(per_token),
    )
    S_out, o_tm = scanned[0], scanned[1]
    if per_token:
        f.graph_op("Transpose", [scanned[2]], ["recurrent_states"], perm=[1, 0, 2, 3, 4])
    else:
        f.graph_op("Identity", [S_out], ["recurrent_state_out"])
    o = f.op("CastLike", tm(o_tm, [1, 0, 2, 3]), "qkv")  # [B,T,Hv,Dv] activation dtype

    # gated RMSNorm with transformers' casts
    of = f.op("Cast", o, to=FLOAT)
    var = f.op("ReduceMean", f.op("Mul", of, of), i64([-1]), keepdims=1)
    eps = f.attr_const("norm_eps", onnx.AttributeProto.FLOAT)
    normed = f.op("CastLike", f.op("Mul", of, f.op("Reciprocal", f.op("Sqrt", f.op("Add", var, eps)))), "qkv")
    zf = f.op("Cast", "z", to=FLOAT)
    gated = f.op("Mul", f.op("Cast", f.op("Mul", "norm_weight", normed), to=FLOAT), f.op("Mul", zf, f.op("Sigmoid", zf)))
    y = f.op("CastLike", gated, "qkv")
    f.graph_op("Reshape", [y, f.op("Concat", i64([0, 0]), value_dim, axis=0)], ["y"])
    return f.build(INPUTS, VERIFY_OUTPUTS if per_token else OUTPUTS, ["num_k_heads", "norm_eps"])


OP = QcnOp(OP_NAME, torch.ops.qcn.gated_deltanet.default, _schema(), _translation, function_proto)
VERIFY_OP = QcnOp(VERIFY_OP_NAME, torch.ops.qcn.gated_deltanet_verify.default, _schema(VERIFY_OP_NAME),
                  _verify_translation, verify_function_proto)
