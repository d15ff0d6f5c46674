"""INT4 weight-only projections (compile/passes/quant/int4*.py, awq.py): the numbers, the
graph form run by ONNX Runtime against a naive torch simulation, AWQ vs RTN."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcn.compile.passes.base import apply, to_ir, to_proto
from qcn.compile.passes.quant.awq import awq_search
from qcn.compile.passes.quant.int4 import (GROUP, ORT_SESSION_CONFIG, dequantize_kn, int4_tensor, quantize_kn, rtn)
from qcn.compile.passes.quant.int4_fold import Int4AwqFold
from qcn.compile.passes.quant.int4_projection import Int4Projection
from qcn.compile.plugins.moe.quant import pack_int4, unpack_int4

ODD = [(1, 1), (3, 5), (127, 9), (129, 7), (300, 33), (257, 2)]


@pytest.mark.parametrize("k,n", ODD)
def test_pack_unpack_round_trip_odd_shapes(k, n):
    g = torch.Generator().manual_seed(k * 1000 + n)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q), k), q)
    # the ONNX INT4 initializer carries the same values (ONNX packs the flattened tensor)
    t = int4_tensor(q.T.contiguous(), "w")
    proto = ir.serde.serialize_tensor(t)
    assert proto.data_type == TensorProto.INT4 and len(proto.raw_data) == -(-k * n // 2)
    assert np.array_equal(numpy_helper.to_array(proto).astype(np.int8), q.T.numpy())


@pytest.mark.parametrize("k,n", ODD)
def test_quantize_kn_is_symmetric_groupwise(k, n):
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(k + n)) * 3
    q, s = quantize_kn(w)
    assert q.shape == (k, n) and s.shape == (-(-k // GROUP), n) and s.dtype == torch.float32
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    # naive reference: each group of 128 rows of each column, scale = amax / 7, round to nearest
    for gi in range(s.shape[0]):
        blk = w[gi * GROUP:(gi + 1) * GROUP]
        ref_s = blk.abs().amax(dim=0) / 7
        torch.testing.assert_close(s[gi], torch.where(ref_s > 0, ref_s, torch.ones_like(ref_s)))
        torch.testing.assert_close(q[gi * GROUP:(gi + 1) * GROUP].float(),
                                   torch.round(blk / s[gi]).clamp(-8, 7))
    err = (dequantize_kn(q, s) - w).abs()
    assert bool((err <= s.repeat_interleave(GROUP, 0)[:k] / 2 + 1e-6).all())  # half a step at most


def _model(k: int, n1: int, n2: int, n3: int, seed: int = 0):
    """x -> norm Mul(x, g) -> MatMul W1, W2 (a group); x -> MatMul W3; y = MatMul(a, b) activation-only."""
    rng = np.random.default_rng(seed)
    w = {name: (rng.standard_normal((k, n)) * 0.2).astype(np.float32)
         for name, n in (("w1", n1), ("w2", n2), ("w3", n3))}
    g = (rng.random(k) + 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(v, name) for name, v in w.items()] + [numpy_helper.from_array(g, "norm")]
    nodes = [helper.make_node("Mul", ["x", "norm"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["y1"]),
             helper.make_node("MatMul", ["h", "w2"], ["y2"]),
             helper.make_node("MatMul", ["x", "w3"], ["y3"]),
             helper.make_node("Transpose", ["y1"], ["y1t"], perm=[1, 0]),
             helper.make_node("MatMul", ["y1t", "y2"], ["y4"])]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y1", "y2", "y3", "y4")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), w, g


def _session(proto, level, config=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    for key, v in (config or {}).items():
        so.add_session_config_entry(key, v)
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k", [300, 256, 77])
def test_int4_graph_in_ort_equals_torch_simulation(k):
    proto, w, g = _model(k, 33, 8, 65, seed=k)
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    xt = torch.from_numpy(x).double()
    # w1/w2: AWQ folded into the norm; w3: AWQ with an explicit Mul (its x has no constant producer)
    h = torch.from_numpy(x * g)
    grp = awq_search(h * torch.linspace(0.1, 8, k), {"w1": torch.from_numpy(w["w1"]), "w2": torch.from_numpy(w["w2"])},
                     fold="norm")
    assert grp.alpha > 0, "outlier channels: AWQ should pick a non-trivial scale"
    s = grp.scale
    solo = awq_search(torch.from_numpy(x) * torch.linspace(8, 0.1, k), {"w3": torch.from_numpy(w["w3"])})
    assert solo.alpha > 0
    plan = {**grp.weights, **solo.weights}
    model = to_ir(proto, "test")
    fold = apply(Int4AwqFold({"norm": (torch.from_numpy(g) / s, frozenset({"w1", "w2"}))}), model)
    res = apply(Int4Projection(plan), model)
    assert (fold.matched, fold.rewritten, res.matched, res.rewritten) == (1, 1, 3, 3)   # y4's MatMul is no candidate
    assert not res.refused and not fold.refused
    out = to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("DequantizeLinear") == 3 and ops.count("Mul") == 2
    # naive torch simulation: dequantize, compute in fp64
    hq = xt * (torch.from_numpy(g).double() / s.double())
    ref = {"y1": hq @ dequantize_kn(plan["w1"].q, plan["w1"].scale).double(),
           "y2": hq @ dequantize_kn(plan["w2"].q, plan["w2"].scale).double(),
           "y3": (xt / solo.scale.double()) @ dequantize_kn(plan["w3"].q, plan["w3"].scale).double()}
    ref["y4"] = ref["y1"].T @ ref["y2"]
    for level, cfg in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None),
                       (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ORT_SESSION_CONFIG)):
        got = dict(zip(["y1", "y2", "y3", "y4"], _session(out, level, cfg).run(None, {"x": x})))
        for name, r in ref.items():
            scale = float(r.abs().max())
            np.testing.assert_allclose(got[name], r.numpy(), rtol=0, atol=2e-5 * max(scale, 1.0) * (k / 64),
                                       err_msg=f"{name} at {level}")
    # the float graph and the INT4 graph differ by quantization, not by a mistake in the form
    fl = dict(zip(["y1", "y2", "y3", "y4"], _session(proto, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"x": x})))
    rel = np.abs(fl["y1"] - got["y1"]).max() / np.abs(fl["y1"]).max()
    assert 1e-4 < rel < 0.2


def test_ort_default_fusion_uses_int8_activations_unless_configured():
    """The finding behind ORT_SESSION_CONFIG: ORT fuses DQ+MatMul into MatMulNBits with
    accuracy_level 4 (int8 activations) by default; the config keeps it exact."""
    proto, w, _ = _model(256, 64, 8, 64)
    model = to_ir(proto, "test")
    apply(Int4Projection({n: rtn(n, torch.from_numpy(v)) for n, v in w.items()}), model)
    out = to_proto(model)
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    exact = _session(out, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["y3"], {"x": x})[0]
    cfg = _session(out, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ORT_SESSION_CONFIG).run(["y3"], {"x": x})[0]
    dflt = _session(out, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["y3"], {"x": x})[0]
    assert np.abs(cfg - exact).max() < 1e-4 * np.abs(exact).max()
    assert np.abs(dflt - exact).max() > 1e-3 * np.abs(exact).max()


def test_projection_rule_must_not_fire_on_kept_or_unplanned_weights():
    proto, w, _ = _model(130, 16, 8, 4)
    model = to_ir(proto, "test")
    res = apply(Int4Projection({"w3": rtn("w3", torch.from_numpy(w["w3"]))}, kept={"w1": "quantization.keep 'w1'"}),
                model)
    assert res.rewritten == 1
    assert sorted(r for _, r in res.refused) == ["w1 kept unquantized: quantization.keep 'w1'",
                                                 "w2 kept unquantized: not in the INT4 plan"], res.refused
    ops = [n.op_type for n in to_proto(model).graph.node]
    assert ops.count("DequantizeLinear") == 1


def test_projection_refuses_awq_weight_whose_fold_is_missing():
    proto, w, g = _model(128, 16, 8, 4)
    h = torch.randn(64, 128) * torch.linspace(0.1, 10, 128)
    grp = awq_search(h, {"w1": torch.from_numpy(w["w1"]), "w2": torch.from_numpy(w["w2"])}, fold="norm")
    model = to_ir(proto, "test")
    res = apply(Int4Projection(grp.weights), model)   # no fold pass ran
    assert res.rewritten == 0 and len(res.refused) == 3
    assert sum("the fold pass must run first" in r for _, r in res.refused) == 2


def test_fold_must_not_fire_when_the_norm_feeds_something_else():
    proto, w, g = _model(128, 16, 8, 4)
    model = to_ir(proto, "test")
    res = apply(Int4AwqFold({"norm": (torch.ones(128), frozenset({"w1"}))}), model)  # the group misses w2
    assert res.rewritten == 0 and "the AWQ group is ['w1']" in res.refused[0][1]


def test_awq_never_increases_a_layers_calibration_error_vs_rtn():
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        k, n = [(256, 40), (300, 17), (128, 128)][trial % 3]
        x = torch.randn(512, k, generator=g)
        if trial % 2:   # activation outliers: AWQ's case; it must help there
            x[:, torch.randperm(k, generator=g)[:4]] *= 30
        ws = {"a": torch.randn(k, n, generator=g), "b": torch.randn(k, 3, generator=g) * 0.1}
        res = awq_search(x, ws)
        for name in ws:
            # recompute both errors independently of the search
            w = ws[name]
            e_rtn = float((x @ dequantize_kn(*quantize_kn(w)) - x @ w).pow(2).mean())
            e_awq = float((x @ res.weights[name].dequantized() - x @ w).pow(2).mean())
            assert res.err_rtn[name] == pytest.approx(e_rtn, rel=1e-4)
            assert res.err_awq[name] == pytest.approx(e_awq, rel=1e-4)
            assert e_awq <= e_rtn * (1 + 1e-5), (trial, name)
        assert sum(res.err_awq.values()) <= sum(res.err_rtn.values()) * (1 + 1e-6)
        if trial % 2:
            assert res.alpha > 0 and sum(res.err_awq.values()) < 0.9 * sum(res.err_rtn.values())


def test_scales_are_in_the_weights_activation_dtype():
    """bf16 graphs get bf16 scales (TensorRT-RTX fails INT4 with fp32 scales on bf16 activations);
    q is computed against the rounded scale."""
    k, n = 200, 24
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(3))
    inits = [helper.make_tensor("w", TensorProto.BFLOAT16, [k, n],
                                w.to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16).tobytes(), raw=True)]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model = to_ir(proto, "test")
    wb = w.to(torch.bfloat16)
    assert apply(Int4Projection({"w": rtn("w", wb, scale_dtype=torch.float32)}), model).rewritten == 0  # fp32 plan refused
    p = rtn("w", wb, scale_dtype=torch.bfloat16)
    assert p.scale.dtype == torch.bfloat16
    torch.testing.assert_close(p.q.float(), torch.round(wb.float() / p.scale.float().repeat_interleave(GROUP, 0)[:k])
                               .clamp(-8, 7))
    assert apply(Int4Projection({"w": p}), model).rewritten == 1
    out = to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    scale = next(i for i in out.graph.initializer if i.name == "w.int4_scale")
    assert scale.data_type == TensorProto.BFLOAT16 and list(scale.dims) == [2, n]


# --- experts ------------------------------------------------------------------------------

def _moe(e=5, h=300, i=130, si=70, seed=0):
    from qcn.compile.passes.quant.int4_experts import MoeWeights
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(e, h, generator=g)
    router[e - 1] = -10.0   # with x >= 0 (see _calib_x) the last expert never wins a top-k slot
    return MoeWeights(router, torch.randn(e, 2 * i, h, generator=g) * 0.1, torch.randn(e, h, i, generator=g) * 0.1,
                      torch.randn(2 * si, h, generator=g) * 0.1, torch.randn(h, si, generator=g) * 0.1, 2, True)


def _calib_x(n, h, seed=1):
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(seed)).abs()
    x[:, :6] *= 20   # outlier channels
    return x


def test_expert_with_no_calibration_tokens_falls_back_to_rtn_with_a_warning(caplog):
    from qcn.compile.passes.quant.int4_experts import MoeStats, quantize_moe
    w = _moe()
    st = MoeStats(w)
    for chunk in _calib_x(600, 300).split(128):
        st.add(chunk)
    assert int(st.routed[4]) == 0 and int(st.routed.sum()) == 600 * 2
    with caplog.at_level("WARNING"):
        got = quantize_moe("layers.3.moe", w, "awq", st, torch.float32)
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    few = [e for e in range(5) if int(st.routed[e]) < 16]
    assert 4 in few and len(few) < 5
    assert len(msgs) == 1 and f"layers.3.moe: experts {few} saw fewer than 16" in msgs[0]
    rows = got.report["experts"]
    assert all(rows[e]["method"] == "rtn" and "fewer than 16 routed" in rows[e]["why"] for e in few)
    assert got.report["fallback_rtn"] == few
    # the fallback expert's weights are exactly RTN's
    rtn = quantize_moe("layers.3.moe", w, "rtn", None, torch.float32)
    for key in ("gate_up", "down"):
        assert torch.equal(got.q[key][4], rtn.q[key][4]) and torch.equal(got.scale[key][4], rtn.scale[key][4])
    # and AWQ never made an expert's calibration error larger than RTN's
    assert any(r["method"] == "awq" for r in rows)
    for r in rows:
        if r["expert"] in few:
            continue
        assert r["calib_mse_awq"] <= r["calib_mse_rtn"]
        if r["method"] == "awq":
            assert r["expert_mse_awq"] <= r["expert_mse_rtn"]


def test_moe_int4_layer_error_awq_not_above_rtn_and_storage_is_groupwise():
    from qcn.compile.passes.quant.int4_experts import MoeStats, quantize_moe
    from qcn.compile.plugins.moe.reference import moe_reference
    w = _moe(seed=4)
    x = _calib_x(512, 300, seed=5)
    st = MoeStats(w)
    st.add(x)
    sg = torch.zeros(1, 300)
    ref = moe_reference(x, w.router, w.gate_up, w.down, w.shared_gate_up, w.shared_down, sg, 2, True)
    errs = {}
    for method in ("rtn", "awq"):
        q = quantize_moe("l", w, method, st if method == "awq" else None, torch.float32)
        assert q.q["gate_up"].shape == w.gate_up.shape and q.scale["gate_up"].shape == (5, 260, 3)
        assert q.scale["down"].shape == (5, 300, 2) and int(q.q["down"].abs().max()) <= 8
        y = moe_reference(x, w.router, q.dequantized("gate_up"), q.dequantized("down"), q.dequantized("shared_gate_up"),
                          q.dequantized("shared_down"), sg, 2, True)
        errs[method] = float((y - ref).pow(2).mean())
    assert errs["awq"] <= errs["rtn"], errs


def _moe_model(fmts, n, h, e, i, si, top_k, seed=0):
    """One graph with a qcn::MoE node per format in ``fmts``, all on the same x; weights as initializers."""
    from qcn.compile.plugins.moe import op as moe_op
    from qcn.compile.plugins.onnx_function import DOMAIN, DOMAIN_VERSION
    from qcn.compile.passes.quant.int4_experts import MoeWeights, quantize_moe
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = MoeWeights(r(e, h), r(e, 2 * i, h) * 0.3, r(e, h, i) * 0.3, r(2 * si, h) * 0.3, r(h, si) * 0.3, top_k, True)
    sg = r(1, h)
    q = quantize_moe("l", w, "rtn", None, torch.float32)
    inits = [numpy_helper.from_array(t.numpy(), nm) for nm, t in
             (("router_weight", w.router), ("shared_gate", sg), ("gate_up", w.gate_up), ("down", w.down),
              ("shared_gate_up", w.shared_gate_up), ("shared_down", w.shared_down))]
    for nm in ("gate_up", "down", "shared_gate_up", "shared_down"):
        inits.append(ir.serde.serialize_tensor(int4_tensor(q.q[nm], f"{nm}.int4")))
        inits.append(numpy_helper.from_array(q.scale[nm].numpy(), f"{nm}.int4_scale"))
    nodes, outs = [], []
    for j, fmt in enumerate(fmts):
        ws = ["gate_up", "down", "shared_gate_up", "shared_down"]
        ins = ["x", "router_weight"] + [f"{x}.int4" if fmt == "int4" else x for x in ws[:4]] + ["shared_gate"]
        if fmt == "int4":
            ins += [f"{x}.int4_scale" for x in ws]
        nodes.append(helper.make_node("MoE", ins, [f"y{j}"], domain=DOMAIN, overload=moe_op.overload(fmt),
                                      top_k=top_k, norm_topk_prob=1, weight_format=fmt))
        outs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, ["N", h]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=[moe_op.function_proto(23, f) for f in sorted(set(fmts))])
    return model, w, sg, q


@pytest.mark.parametrize("n,h,e,i,si,k", [(5, 300, 6, 130, 70, 2), (1, 128, 4, 64, 32, 1), (9, 77, 3, 5, 9, 3)])
def test_moe_int4_body_in_ort_equals_dequantized_reference(n, h, e, i, si, k):
    from qcn.compile.plugins.moe.reference import moe_reference
    model, w, sg, q = _moe_model(["float", "int4"], n, h, e, i, si, k, seed=n + h)
    onnx.checker.check_model(model, full_check=True)
    to_ir(model, "test")   # strict shape inference through both overloads
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(7))
    y_float, y_int4 = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"x": x.numpy()})
    ref_f = moe_reference(x, w.router, w.gate_up, w.down, w.shared_gate_up, w.shared_down, sg, k, True)
    ref_q = moe_reference(x, w.router, q.dequantized("gate_up"), q.dequantized("down"), q.dequantized("shared_gate_up"),
                          q.dequantized("shared_down"), sg, k, True)
    tol = 2e-5 * max(float(ref_f.abs().max()), 1.0)
    np.testing.assert_allclose(y_float, ref_f.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(y_int4, ref_q.numpy(), rtol=0, atol=tol)
    assert np.abs(y_int4 - y_float).max() > 10 * tol   # the two overloads really differ


def test_int4_experts_rule_in_ort_equals_dequantized_reference_and_keeps_unplanned():
    from qcn.compile.passes.quant.int4_moe import Int4Experts
    from qcn.compile.plugins.moe.reference import moe_reference
    model, w, sg, q = _moe_model(["float", "float"], 6, 200, 5, 64, 48, 2, seed=11)
    # two layers reading the same weights would collide; give the second its own names (a "kept" layer)
    proto = model
    for init in list(proto.graph.initializer):
        if init.name in ("gate_up", "down", "shared_gate_up", "shared_down"):
            c = onnx.TensorProto()
            c.CopyFrom(init)
            c.name = init.name + "_b"
            proto.graph.initializer.append(c)
    nb = proto.graph.node[1]
    for j in range(2, 6):
        nb.input[j] = nb.input[j] + "_b"
    ir_model = to_ir(proto, "test")
    res = apply(Int4Experts({"gate_up": q}, kept={"gate_up_b": "matches quantization.keep pattern 'layers.0.*'"}),
                ir_model)
    assert (res.matched, res.rewritten) == (2, 1)
    assert res.refused[0][1] == "gate_up_b kept unquantized: matches quantization.keep pattern 'layers.0.*'"
    out = to_proto(ir_model)
    onnx.checker.check_model(out, full_check=True)
    assert sorted(f.overload for f in out.functions) == ["", "int4"]
    assert {n.overload for n in out.graph.node} == {"", "int4"}
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(3))
    y_q, y_f = _session(out, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"x": x.numpy()})
    ref_q = moe_reference(x, w.router, q.dequantized("gate_up"), q.dequantized("down"), q.dequantized("shared_gate_up"),
                          q.dequantized("shared_down"), sg, 2, True)
    ref_f = moe_reference(x, w.router, w.gate_up, w.down, w.shared_gate_up, w.shared_down, sg, 2, True)
    tol = 2e-5 * max(float(ref_f.abs().max()), 1.0)
    np.testing.assert_allclose(y_q, ref_q.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(y_f, ref_f.numpy(), rtol=0, atol=tol)


@pytest.mark.parametrize("n,h,e,i,si,k", [(1, 256, 16, 128, 256, 4), (7, 128, 5, 256, 128, 2)])
def test_cpu_qmoe_lowering_equals_the_int4_body(n, h, e, i, si, k):
    from qcn.compile.passes.quant.int4_cpu_moe import Int4CpuMoE
    model, w, sg, q = _moe_model(["int4"], n, h, e, i, si, k, seed=n)
    ir_model = to_ir(model, "test")
    res = apply(Int4CpuMoE(), ir_model)
    assert (res.matched, res.rewritten, res.refused) == (1, 1, [])
    out = to_proto(ir_model)
    assert "QMoE" in [nd.op_type for nd in out.graph.node] and not out.functions   # the int4 body is gone
    x = np.random.default_rng(n).standard_normal((n, h)).astype(np.float32)
    body = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"x": x})[0]
    low = _session(out, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ORT_SESSION_CONFIG).run(None, {"x": x})[0]
    np.testing.assert_allclose(low, body, rtol=0, atol=2e-5 * max(float(np.abs(body).max()), 1.0))


def test_cpu_qmoe_lowering_must_not_fire_on_float_or_unaligned_moe():
    from qcn.compile.passes.quant.int4_cpu_moe import Int4CpuMoE
    model, *_ = _moe_model(["float"], 3, 256, 4, 128, 128, 2)
    assert apply(Int4CpuMoE(), to_ir(model, "test")).matched == 0
    model, *_ = _moe_model(["int4"], 3, 200, 4, 128, 128, 2)
    res = apply(Int4CpuMoE(), to_ir(model, "test"))
    assert res.rewritten == 0 and "must be multiples of 128" in res.refused[0][1]
