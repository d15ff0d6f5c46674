"""The cpu target's lowering passes (compile/passes/cpu_*.py): each lowered graph against the op's
function body, both run by ONNX Runtime on fresh random inputs of odd sizes; plus what must
NOT be lowered and the pass table rows."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcn.compile.passes.base import apply, to_ir, to_proto
from qcn.compile.passes.cpu_gated_deltanet import CpuGatedDeltaNet
from qcn.compile.passes.plan import plan_for
from qcn.compile.plugins.gated_deltanet import op as gdn_op
from qcn.compile.plugins.moe import op as moe_op

F32, BF = TensorProto.FLOAT, TensorProto.BFLOAT16
NP = {F32: np.float32}


def vi(name, dt, shape):
    return helper.make_tensor_value_info(name, dt, shape)


def one_node_model(node, ins, outs, function, opset=23):
    g = helper.make_graph([node], "g", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("qcn", 1)],
                          functions=[function(opset)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def lower(model: onnx.ModelProto, rule):
    ir_model = to_ir(model, "test graph")
    res = apply(rule, ir_model)
    return to_proto(ir_model), res


# ---------------------------------------------------------------- GatedDeltaNet
def gdn_model(B, T, Hk, Hv, Dk, Dv, W, dt=F32, opset=23):
    C = 2 * Hk * Dk + Hv * Dv
    shapes = [[B, T, C], [B, T, Hv, Dv], [B, T, Hv], [B, T, Hv], [C, W], [Hv], [Hv], [Dv], [B, C, W - 1], [B, Hv, Dk, Dv]]
    dts = [dt] * 5 + [F32] + [dt] * 3 + [F32]
    names = list(gdn_op.INPUTS)
    node = helper.make_node("GatedDeltaNet", names, list(gdn_op.OUTPUTS), name="gdn", domain="qcn", num_k_heads=Hk,
                            norm_eps=1e-6)
    outs = [vi(gdn_op.OUTPUTS[0], dt, [B, T, Hv * Dv]), vi(gdn_op.OUTPUTS[1], dt, [B, C, W - 1]),
            vi(gdn_op.OUTPUTS[2], F32, [B, Hv, Dk, Dv])]
    return one_node_model(node, [vi(n, d, s) for n, d, s in zip(names, dts, shapes)], outs, gdn_op.function_proto,
                          opset)


def gdn_feeds(rng, B, T, Hk, Hv, Dk, Dv, W):
    C = 2 * Hk * Dk + Hv * Dv
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(qkv=r(B, T, C), z=r(B, T, Hv, Dv), b=r(B, T, Hv), a=r(B, T, Hv), conv_weight=r(C, W) * 0.5,
                A_log=np.log(rng.random(Hv) * 15 + 1).astype(np.float32), dt_bias=r(Hv), norm_weight=r(Dv),
                conv_state=r(B, C, W - 1), recurrent_state=r(B, Hv, Dk, Dv))


GDN_SIZES = [(2, 1, 3, 6, 5, 4, 4), (1, 1, 2, 2, 3, 5, 3), (3, 13, 1, 2, 8, 7, 4), (1, 65, 2, 4, 6, 3, 5),
             (2, 70, 2, 4, 16, 16, 4), (1, 2, 1, 3, 4, 4, 4)]


@pytest.mark.parametrize("B,T,Hk,Hv,Dk,Dv,W", GDN_SIZES)
def test_gated_deltanet_lowered_equals_body(B, T, Hk, Hv, Dk, Dv, W):
    m = gdn_model(B, T, Hk, Hv, Dk, Dv, W)
    lowered, res = lower(m, CpuGatedDeltaNet())
    assert res.counts()["rewritten"] == 1 and not res.refused
    ops = {(n.domain, n.op_type) for n in lowered.graph.node}
    assert ("com.microsoft", "LinearAttention") in ops and ("qcn", "GatedDeltaNet") not in ops
    assert ("", "Scan") not in ops
    feeds = gdn_feeds(np.random.default_rng(B * 1000 + T * 10 + Hv), B, T, Hk, Hv, Dk, Dv, W)
    ref = run(m, feeds)
    got = run(lowered, feeds)
    for name, g, r in zip(gdn_op.OUTPUTS, got, ref):
        assert g.shape == r.shape, name
        scale = max(1.0, float(np.abs(r).max()))
        assert np.abs(g - r).max() <= 2e-5 * scale, (name, np.abs(g - r).max())


def test_gated_deltanet_lowered_with_constant_A_log_folds_it_and_equals_body():
    """A_log as a weight (what the export gives): -exp(A_log) becomes a constant, no Exp/Neg runs."""
    B, T, Hk, Hv, Dk, Dv, W = 2, 1, 2, 4, 6, 5, 4
    feeds = gdn_feeds(np.random.default_rng(11), B, T, Hk, Hv, Dk, Dv, W)
    m = gdn_model(B, T, Hk, Hv, Dk, Dv, W)
    m.graph.initializer.append(numpy_helper.from_array(feeds.pop("A_log"), "A_log"))
    m.graph.input.remove(next(i for i in m.graph.input if i.name == "A_log"))
    lowered, res = lower(m, CpuGatedDeltaNet())
    assert res.counts()["rewritten"] == 1
    ops = [n.op_type for n in lowered.graph.node]
    assert "Exp" not in ops and "Neg" not in ops and ops.count("RMSNormalization") == 3  # l2(q), l2(k), norm
    for g, r in zip(run(lowered, feeds), run(m, feeds)):
        assert np.abs(g - r).max() <= 2e-5 * max(1.0, float(np.abs(r).max()))


def test_gated_deltanet_lowered_chunked_calls_equal_one_call():
    """Threading both states through three lowered calls (T = 5, 1, 9) gives one call's result."""
    B, Hk, Hv, Dk, Dv, W = 2, 2, 4, 6, 5, 4
    rng = np.random.default_rng(7)
    full = gdn_feeds(rng, B, 15, Hk, Hv, Dk, Dv, W)
    want = run(gdn_model(B, 15, Hk, Hv, Dk, Dv, W), full)
    conv, rec, ys, t0 = full["conv_state"], full["recurrent_state"], [], 0
    for T in (5, 1, 9):
        part = {k: (v[:, t0:t0 + T] if k in ("qkv", "z", "b", "a") else v) for k, v in full.items()}
        part.update(conv_state=conv, recurrent_state=rec)
        lowered, _ = lower(gdn_model(B, T, Hk, Hv, Dk, Dv, W), CpuGatedDeltaNet())
        y, conv, rec = run(lowered, part)
        ys.append(y)
        t0 += T
    for g, r in zip([np.concatenate(ys, axis=1), conv, rec], want):
        assert np.abs(g - r).max() <= 2e-5 * max(1.0, float(np.abs(r).max()))


@pytest.mark.parametrize("case", ["bf16", "opset22", "dynamic_value_heads"])
def test_gated_deltanet_must_not_lower(case):
    if case == "bf16":
        m = gdn_model(1, 1, 2, 4, 8, 8, 4, dt=BF)
        why = "not float32"
    elif case == "opset22":
        m = gdn_model(1, 1, 2, 4, 8, 8, 4, opset=22)
        why = "opset 22 < 23"
    else:
        m = gdn_model(1, 1, 2, 4, 8, 8, 4)
        m.graph.input[1].type.tensor_type.shape.dim[2].dim_param = "Hv"
        m.graph.input[1].type.tensor_type.shape.dim[2].ClearField("dim_value")
        why = "not static"
    lowered, res = lower(m, CpuGatedDeltaNet())
    assert res.counts() == {"matched": 1, "rewritten": 0, "refused": 1, "new_nodes": 0}
    assert why in res.refused[0][1]
    assert [n.op_type for n in lowered.graph.node] == ["GatedDeltaNet"]


# ---------------------------------------------------------------- MoE
def moe_model(N, H, E, I, Is, k, norm, dt=F32, fmt="float"):
    names = list(moe_op.INPUTS)
    shapes = [[N, H], [E, H], [E, 2 * I, H], [E, H, I], [2 * Is, H], [H, Is], [1, H]]
    node = helper.make_node("MoE", names, ["y"], name="moe", domain="qcn", top_k=k, norm_topk_prob=int(norm),
                            weight_format=fmt)
    return one_node_model(node, [vi(n, dt, s) for n, s in zip(names, shapes)], [vi("y", dt, [N, H])],
                          moe_op.function_proto)


def moe_feeds(rng, N, H, E, I, Is):
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(x=r(N, H), router_weight=r(E, H), gate_up=r(E, 2 * I, H) * 0.3, down=r(E, H, I) * 0.3,
                shared_gate_up=r(2 * Is, H) * 0.3, shared_down=r(H, Is) * 0.3, shared_gate=r(1, H))


@pytest.mark.parametrize("N,H,E,I,Is,k,norm", [(1, 12, 7, 6, 5, 3, True), (3, 9, 11, 3, 4, 2, False),
                                               (17, 10, 5, 4, 6, 2, True), (4, 8, 3, 5, 3, 3, False),
                                               (1, 33, 16, 7, 9, 1, True), (70, 16, 13, 5, 7, 4, True)])
def test_moe_lowered_equals_body(N, H, E, I, Is, k, norm):
    from qcn.compile.passes.cpu_moe import CpuMoE

    m = moe_model(N, H, E, I, Is, k, norm)
    lowered, res = lower(m, CpuMoE())
    assert res.counts()["rewritten"] == 1 and not res.refused
    ops = {(n.domain, n.op_type) for n in lowered.graph.node}
    assert ("", "Unique") in ops and ("qcn", "MoE") not in ops
    feeds = moe_feeds(np.random.default_rng(N * 100 + E), N, H, E, I, Is)
    ref, = run(m, feeds)
    got, = run(lowered, feeds)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max())), np.abs(got - ref).max()


def test_moe_lowered_reads_only_selected_experts():
    """An unselected expert's weights cannot reach y: NaN there leaves the output finite and equal
    (the body would turn it into NaN through 0 * NaN), while a selected expert's NaN shows."""
    from qcn.compile.passes.cpu_moe import CpuMoE

    N, H, E, I, Is, k = 1, 8, 6, 4, 3, 2
    feeds = moe_feeds(np.random.default_rng(3), N, H, E, I, Is)
    lowered, _ = lower(moe_model(N, H, E, I, Is, k, True), CpuMoE())
    clean, = run(lowered, feeds)
    logits = feeds["x"] @ feeds["router_weight"].T
    order = np.argsort(-logits[0], kind="stable")
    poisoned = dict(feeds, gate_up=feeds["gate_up"].copy())
    poisoned["gate_up"][order[k:]] = np.nan
    got, = run(lowered, poisoned)
    assert np.isfinite(got).all() and np.array_equal(got, clean)
    poisoned["gate_up"][order[0]] = np.nan
    assert np.isnan(run(lowered, poisoned)[0]).any()


@pytest.mark.parametrize("case", ["fp8_format", "mixed_dtypes", "bf16"])
def test_moe_must_not_lower(case):
    from qcn.compile.passes.cpu_moe import CpuMoE

    if case == "fp8_format":
        m = moe_model(2, 8, 4, 3, 3, 2, True, fmt="fp8")
        why = "weight_format 'fp8' has no routed CPU form"
    elif case == "mixed_dtypes":
        m = moe_model(2, 8, 4, 3, 3, 2, True)
        m.graph.input[2].type.tensor_type.elem_type = BF
        why = "['gate_up'] are not float32"
    else:
        m = moe_model(2, 8, 4, 3, 3, 2, True, dt=BF)
        why = "are not float32"
    lowered, res = lower(m, CpuMoE())
    assert res.counts() == {"matched": 1, "rewritten": 0, "refused": 1, "new_nodes": 0}
    assert why in res.refused[0][1]
    assert [n.op_type for n in lowered.graph.node] == ["MoE"]


@pytest.mark.parametrize("N,H,E,I,Is,k", [(1, 12, 7, 6, 5, 3), (17, 10, 5, 4, 6, 2), (1, 33, 16, 7, 9, 1),
                                          (70, 16, 13, 5, 7, 4), (4, 9, 11, 3, 4, 11)])
def test_moe_ort_equals_body(N, H, E, I, Is, k):
    """cpu_moe_ort (com.microsoft.MoE for the routed experts) against the op's function body."""
    from qcn.compile.passes.cpu_moe_ort import CpuMoeOrt

    m = moe_model(N, H, E, I, Is, k, True)
    feeds = moe_feeds(np.random.default_rng(N * 100 + E + 7), N, H, E, I, Is)
    weights = {n: feeds.pop(n) for n in moe_op.INPUTS[1:]}
    for name, w in weights.items():  # the rule needs constant weights: initializers, as in an export
        m.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    m.graph.ClearField("input")
    m.graph.input.extend([vi("x", F32, [N, H])])
    lowered, res = lower(m, CpuMoeOrt())
    assert res.counts()["rewritten"] == 1 and not res.refused
    ops = {(n.domain, n.op_type) for n in lowered.graph.node}
    assert ("com.microsoft", "MoE") in ops and ("qcn", "MoE") not in ops
    ref, = run(m, feeds)
    got, = run(lowered, feeds)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max())), np.abs(got - ref).max()


@pytest.mark.parametrize("case", ["norm_off", "not_constant", "bf16"])
def test_moe_ort_must_not_lower(case):
    from qcn.compile.passes.cpu_moe_ort import CpuMoeOrt

    m = moe_model(2, 8, 4, 3, 3, 2, case != "norm_off", dt=BF if case == "bf16" else F32)
    if case != "not_constant":
        rng = np.random.default_rng(0)
        for i in list(m.graph.input)[1:]:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            t = onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), i.name)
            if case == "bf16":
                t = onnx.helper.make_tensor(i.name, BF, shape, np.zeros(int(np.prod(shape)), np.uint16).tobytes(), raw=True)
            m.graph.initializer.append(t)
        keep = list(m.graph.input)[:1]
        m.graph.ClearField("input")
        m.graph.input.extend(keep)
    why = {"norm_off": "norm_topk_prob 0", "not_constant": "not constant", "bf16": "not float32"}[case]
    lowered, res = lower(m, CpuMoeOrt())
    assert res.counts() == {"matched": 1, "rewritten": 0, "refused": 1, "new_nodes": 0}
    assert why in res.refused[0][1], res.refused
    assert [n.op_type for n in lowered.graph.node] == ["MoE"]


def test_moe_ort_leaves_quantized_formats_to_their_rules():
    from qcn.compile.passes.cpu_moe_ort import CpuMoeOrt

    lowered, res = lower(moe_model(2, 8, 4, 3, 3, 2, True, fmt="fp8"), CpuMoeOrt())
    assert res.counts()["rewritten"] == 0 and [n.op_type for n in lowered.graph.node] == ["MoE"]


def test_cpu_rows_run_for_onnxruntime_only_and_before_the_plugin_lowerings():
    plan = {m: [(p.name, why) for p, why in plan_for(m)] for m in ("onnxruntime", "tensorrt", "tensorrt_rtx")}
    cpu = [n for n, why in plan["onnxruntime"] if why is None and n.startswith("cpu_")]
    assert {"cpu_gated_deltanet", "cpu_moe_ort", "cpu_moe"} <= set(cpu)
    names = [n for n, _ in plan["onnxruntime"]]
    assert max(names.index(n) for n in cpu) < names.index("lower_gated_deltanet")
    for m in ("tensorrt", "tensorrt_rtx"):
        assert all("a CPU lowering" in why for n, why in plan[m] if n in cpu)

