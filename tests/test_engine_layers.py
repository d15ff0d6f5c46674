"""What TensorRT-RTX builds for quantized MatMuls (CPU-only, no GPU), read from the engine's layer
report (compile/build/layers.py), on hand-made one-MatMul graphs: x [T, K] @ W [K, N].

These pin the graph forms the quantization passes emit (docs/BUILD.md, "Quantized graphs"):
FP8 W8A8 with per-tensor / per-output-channel / 1x128-along-K weight scales is an FP8 GEMM on SM89
and SM120; INT4 DQ(block_size 128, axis 0) is an INT4 weight-only GEMM on SM86/89/120; FP8 on SM86
and a Gather of an FP8 tensor fail with TensorRT's messages. Engines are built, never run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

trt = pytest.importorskip("tensorrt_rtx", reason="pip install tensorrt-rtx (the [test] extra) to build engines")

from qcn.compile.build import layers as lb  # noqa: E402
from qcn.compile.build import trt as trtb  # noqa: E402

K, N = 256, 384  # two 128-blocks along K


def _weights(seed=0):
    return np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)


def _fp8(name, arr):
    return h.make_tensor(name, TP.FLOAT8E4M3FN, arr.shape, arr.ravel().tolist())


def _graph(form: str, rank: int = 2) -> onnx.ModelProto:
    """One MatMul in the named form; fp32 activations x [T, K] (rank 3: [B, T, K]), opset 23 (the
    export's). ``fp8_block_flat``: fp8_block with the MatMul on x flattened to [B*T, K]."""
    flat = form.endswith("_flat")
    form = form.removesuffix("_flat")
    W = _weights()
    inits = []
    nodes = []
    x = "x"
    if form in ("fp8_tensor", "fp8_channel", "fp8_block", "fp8_gather"):
        inits += [nh.from_array(np.float32(0.05), "sx")]
        nodes += [h.make_node("QuantizeLinear", ["x", "sx"], ["xq"], output_dtype=TP.FLOAT8E4M3FN),
                  h.make_node("DequantizeLinear", ["xq", "sx"], ["xd"])]
        x = "xd"
    if form == "fp8_tensor":
        s = np.float32(np.abs(W).max() / 448)
        inits += [_fp8("wq", W / s), nh.from_array(s, "sw")]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "sw"], ["wd"]))
    elif form in ("fp8_channel", "fp8_weight_only"):
        s = (np.abs(W).max(0) / 448).astype(np.float32)
        inits += [_fp8("wq", W / s), nh.from_array(s, "sw")]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=1))
    elif form in ("fp8_block", "int4_block"):
        qmax = 448 if form == "fp8_block" else 7
        s = (np.abs(W.reshape(K // 128, 128, N)).max(1) / qmax).astype(np.float32)  # [K/128, N]
        q = W / np.repeat(s, 128, 0)
        inits += [_fp8("wq", q) if form == "fp8_block" else
                  h.make_tensor("wq", TP.INT4, q.shape, np.clip(np.round(q), -8, 7).astype(np.int8).ravel().tolist()),
                  nh.from_array(s, "sw")]
        nodes.append(h.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=0, block_size=128))
    elif form == "fp8_gather":  # a MoE body that gathers the FP8 expert before dequantizing it
        s = (np.abs(W).max(0) / 448).astype(np.float32)
        inits += [_fp8("wq", (W / s)[None]), nh.from_array(s, "sw"), nh.from_array(np.array(0, np.int64), "e")]
        nodes += [h.make_node("Gather", ["wq", "e"], ["wg"], axis=0),
                  h.make_node("DequantizeLinear", ["wg", "sw"], ["wd"], axis=1)]
    elif form == "float":
        inits.append(nh.from_array(W, "wd"))
    else:
        raise ValueError(form)
    lead = ["B", "T"][2 - (rank - 1):]
    if flat:  # Reshape to [B*T, K], MatMul, Reshape back to [B, T, N]
        inits += [nh.from_array(np.array([-1, K], np.int64), "flat_k"), nh.from_array(np.array([N], np.int64), "n")]
        nodes += [h.make_node("Reshape", [x, "flat_k"], ["x2"]), h.make_node("MatMul", ["x2", "wd"], ["y2"], name="matmul"),
                  h.make_node("Shape", ["x"], ["lead"], start=0, end=rank - 1),
                  h.make_node("Concat", ["lead", "n"], ["yshape"], axis=0), h.make_node("Reshape", ["y2", "yshape"], ["y"])]
    else:
        nodes.append(h.make_node("MatMul", [x, "wd"], ["y"], name="matmul"))
    g = h.make_graph(nodes, form, [h.make_tensor_value_info("x", TP.FLOAT, lead + [K])],
                     [h.make_tensor_value_info("y", TP.FLOAT, lead + [N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23)])
    m.ir_version = 10
    return m


def _build(tmp_path: Path, form: str, ccs: tuple[str, ...], rank: int = 2):
    """(engine bytes, parsed layers) through the build stage's own loaders."""
    path = tmp_path / f"{form}.onnx"
    onnx.save(_graph(form, rank), path)
    shapes = ((1, K), (4, K), (16, K)) if rank == 2 else ((1, 1, K), (4, 1, K), (4, 64, K))
    prof = trtb.Profile("all", ("prefill",), {"x": shapes})
    config = trtb.create_config(trt, [prof], workspace_gib=0.25, compute_capabilities=ccs)
    engine, _, report = trtb.engine_bytes(trt, trtb.NetworkFromOnnxPath(trt, path), config)
    assert report is not None, "the builder logged no layer report"
    return engine, lb.parse_layer_report(report)


@pytest.mark.parametrize("form", ["fp8_tensor", "fp8_channel", "fp8_block"])
def test_fp8_w8a8_matmul_is_an_fp8_gemm_on_sm89_and_sm120(tmp_path, form):
    onnx.checker.check_model(_graph(form), full_check=True)  # a valid ONNX graph, as ONNX Runtime gets it
    _, layers = _build(tmp_path, form, ("8.9", "12.0"))
    assert lb.gemm_precisions(layers) == {"fp8": 1}
    gemm = next(l for l in layers if lb.is_gemm(l))
    assert [t["dtype"] for t in gemm["inputs"]] == ["fp8"]
    assert {"name": gemm["constants"][0]["name"], "shape": [K, N], "dtype": "fp8"} == gemm["constants"][0]
    assert "matmul" in gemm["onnx_layers"]  # the ONNX node it came from


def test_int4_block_dq_matmul_is_an_int4_weight_only_gemm_on_sm86_sm89_sm120(tmp_path):
    onnx.checker.check_model(_graph("int4_block"), full_check=True)
    engine, layers = _build(tmp_path, "int4_block", ("8.6", "8.9", "12.0"))
    assert lb.gemm_precisions(layers) == {"int4_weight_only": 1}
    fc = next(l for l in layers if lb.is_gemm(l))
    assert {"shape": [K, N], "dtype": "int4"} in [{k: t[k] for k in ("shape", "dtype")} for t in fc["constants"]]
    float_engine, _ = _build(tmp_path, "float", ("8.6", "8.9", "12.0"))
    assert len(engine) < 0.3 * len(float_engine)  # the weights stay 4-bit in the engine (measured 66 KB vs 403 KB)


def test_fp8_block_scales_need_a_2d_matmul(tmp_path):
    """1x128 FP8 block scales with a rank-3 activation [B, T, K] crash Myelin (tensorrt_rtx 1.7.1);
    the same MatMul on x flattened to [B*T, K] is an FP8 GEMM. Per-channel scales build at rank 3."""
    with pytest.raises(trtb.BuildError, match=r"CHECK\(is_constant\(\)\) failed"):
        _build(tmp_path, "fp8_block", ("8.9",), rank=3)
    onnx.checker.check_model(_graph("fp8_block_flat", 3), full_check=True)
    _, layers = _build(tmp_path, "fp8_block_flat", ("8.9", "12.0"), rank=3)
    assert lb.gemm_precisions(layers) == {"fp8": 1}
    _, layers = _build(tmp_path, "fp8_channel", ("8.9",), rank=3)
    assert lb.gemm_precisions(layers) == {"fp8": 1}
    _, layers = _build(tmp_path, "int4_block", ("8.6", "12.0"), rank=3)
    assert lb.gemm_precisions(layers) == {"int4_weight_only": 1}


def test_must_not_report_float_or_weight_only_gemms_as_quantized(tmp_path):
    _, layers = _build(tmp_path, "float", ("8.9",))
    assert lb.gemm_precisions(layers) == {"float32": 1}
    _, layers = _build(tmp_path, "fp8_weight_only", ("8.9",))  # FP8 weights, fp32 activations: not W8A8
    assert lb.gemm_precisions(layers) == {"fp8_weight_only": 1}


def test_fp8_on_sm86_fails_naming_the_datatype(tmp_path):
    with pytest.raises(trtb.BuildError, match=r"Cannot compile for target\(s\) sm86.*fp8_e4m3"):
        _build(tmp_path, "fp8_channel", ("8.6", "8.9"))


def test_fp8_tensor_consumed_by_gather_fails(tmp_path):
    """TensorRT: an FP8/INT4 tensor may only feed DequantizeLinear (or Concat/Shuffle/Shape/Identity):
    an MoE body must dequantize the whole expert stack before gathering experts."""
    with pytest.raises(trtb.BuildError, match="has datatype FP8 but is not consumed by"):
        _build(tmp_path, "fp8_gather", ("8.9",))


def test_layer_report_parser_refuses_other_text():
    with pytest.raises(lb.LayerReportError):
        lb.parse_layer_report("Engine generation completed in 0.02 seconds.")
    with pytest.raises(lb.LayerReportError):
        lb.parse_layer_report("Layers:\n\nI/O Tensors:\n")
    assert lb.find_layer_report([(3, "something"), (4, "Layers:\nName: a, LayerType: gemm")]).startswith("Layers:")
    assert lb.find_layer_report([(3, "something")]) is None


def _int4_moe_model(n_nodes: int = 1, e=4, hid=256, i=128, si=64) -> onnx.ModelProto:
    """x -> n_nodes chained qcn::MoE weight_format "int4" (int4's body), one weight set per node."""
    import onnx_ir as ir
    import torch

    from qcn.compile.passes.quant.int4 import int4_tensor
    from qcn.compile.passes.quant.int4_experts import MoeWeights, quantize_moe
    from qcn.compile.plugins.moe import op as moe_op
    from qcn.compile.plugins.onnx_function import DOMAIN, DOMAIN_VERSION

    g = torch.Generator().manual_seed(0)
    names = ("gate_up", "down", "shared_gate_up", "shared_down")
    inits, nodes, x = [], [], "x"
    for j in range(n_nodes):
        w = MoeWeights(torch.randn(e, hid, generator=g), torch.randn(e, 2 * i, hid, generator=g) * 0.3,
                       torch.randn(e, hid, i, generator=g) * 0.3, torch.randn(2 * si, hid, generator=g) * 0.3,
                       torch.randn(hid, si, generator=g) * 0.3, 2, True)
        q = quantize_moe(f"l{j}", w, "rtn", None, torch.float32)
        inits += [nh.from_array(w.router.numpy(), f"router{j}"), nh.from_array(torch.randn(1, hid, generator=g).numpy(), f"sg{j}")]
        for nm in names:
            inits += [ir.serde.serialize_tensor(int4_tensor(q.q[nm], f"{nm}{j}.int4")), nh.from_array(q.scale[nm].numpy(), f"{nm}{j}.s")]
        node = h.make_node("MoE", [x, f"router{j}"] + [f"{n}{j}.int4" for n in names] + [f"sg{j}"] + [f"{n}{j}.s" for n in names],
                           [f"y{j}"], name=f"moe{j}", domain=DOMAIN, overload=moe_op.overload("int4"), top_k=2,
                           norm_topk_prob=1, weight_format="int4")
        nodes.append(node)
        x = f"y{j}"
    graph = h.make_graph(nodes, "moe", [h.make_tensor_value_info("x", TP.FLOAT, ["N", hid])],
                         [h.make_tensor_value_info(x, TP.FLOAT, ["N", hid])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                        functions=[moe_op.function_proto(23, "float"), moe_op.function_proto(23, "int4")])


def _build_moe(tmp_path: Path, model: onnx.ModelProto, name: str, ccs=("8.6", "12.0"), hid=256):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    prof = trtb.Profile("all", ("prefill",), {"x": ((1, hid), (4, hid), (16, hid))})
    config = trtb.create_config(trt, [prof], workspace_gib=0.5, compute_capabilities=ccs)
    return lb.parse_layer_report(trtb.engine_bytes(trt, trtb.NetworkFromOnnxPath(trt, path), config)[2])


def test_int4_moe_body_builds_with_int4_expert_weights_on_sm86_and_sm120(tmp_path):
    """One qcn::MoE weight_format "int4" (its body dequantizes each whole INT4 expert stack before
    gathering): builds for SM86 + SM120; every expert weight stays an Int4 constant."""
    e, hid, i, si = 4, 256, 128, 64
    model = _int4_moe_model(1)
    del model.functions[0]  # the int4 body only: the parser ignores overloads (next test)
    layers = _build_moe(tmp_path, model, "moe_int4")
    weights = [c for l in layers for c in l["constants"] if len(c["shape"]) >= 2]
    # the four expert weights are Int4 constants: routed [E, 2I, H] and [E, H, I], shared [2SI, H] and [H, SI]
    # (each as the builder lays it out); none of them was folded to a float constant
    assert sorted(c["shape"][-2] * c["shape"][-1] * (c["shape"][0] if len(c["shape"]) == 3 else 1)
                  for c in weights if c["dtype"] == "int4") == sorted([e * 2 * i * hid, e * hid * i, 2 * si * hid, hid * si])
    assert not [c for c in weights if c["dtype"] == "float32" and c["shape"][-2] * c["shape"][-1] >= hid * si]
    assert lb.gemm_precisions(layers).get("int4_weight_only", 0) >= 1


def test_two_int4_moe_need_lower_moe_rtx_and_keep_their_numbers(tmp_path):
    """TensorRT-RTX 1.7.1 cannot parse the int4 body twice (its Dequantize layer names collide) nor
    pick an overload; lower_moe_rtx moves the DequantizeLinear nodes into the graph: it builds,
    the expert weights stay Int4, and ONNX Runtime gives the same numbers as the int4 body."""
    import onnxruntime as ort

    from qcn.compile.passes.base import apply, to_ir, to_proto
    from qcn.compile.passes.lower_moe_rtx import LowerMoeRtx

    model = _int4_moe_model(2)
    with pytest.raises(trtb.BuildError, match=r"node.input\(\).size\(\) == function.input\(\).size\(\)"):
        _build_moe(tmp_path, model, "two_int4")  # the float body (listed first) is inlined for the int4 nodes
    only_int4 = onnx.ModelProto()
    only_int4.CopyFrom(model)
    del only_int4.functions[0]
    with pytest.raises(trtb.BuildError, match=r"\[Dequantize\].*already in use"):
        _build_moe(tmp_path, only_int4, "two_int4_only")
    m = to_ir(model, "test")
    res = apply(LowerMoeRtx(), m)
    lowered = to_proto(m)
    assert res.counts() == {"matched": 2, "rewritten": 2, "refused": 0, "new_nodes": 10}
    assert [(f.name, f.overload) for f in lowered.functions] == [("MoE", "")]  # the int4 body is gone
    assert [n.op_type for n in lowered.graph.node].count("DequantizeLinear") == 8
    onnx.checker.check_model(lowered, full_check=True)
    layers = _build_moe(tmp_path, lowered, "two_lowered")
    assert sum(1 for l in layers for c in l["constants"] if c["dtype"] == "int4" and len(c["shape"]) == 3) == 4
    x = np.random.default_rng(5).standard_normal((7, 256)).astype(np.float32)
    run = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(lowered), run(model), rtol=0, atol=1e-5 * max(1.0, float(np.abs(run(model)).max())))


def test_lower_moe_rtx_must_not_touch_a_float_moe_and_refuses_unknown_formats():
    from qcn.compile.passes.base import apply, to_ir, to_proto
    from qcn.compile.passes.lower_moe_rtx import DEQUANTIZE, LowerMoeRtx
    from qcn.compile.passes.plan import plan_for

    model = _int4_moe_model(1)
    node = model.graph.node[0]
    float_node = h.make_node("MoE", list(node.input[:7]), ["y_float"], name="moe_float", domain=node.domain,
                             top_k=2, norm_topk_prob=1, weight_format="float")
    model.graph.node.append(float_node)
    model.graph.output.append(h.make_tensor_value_info("y_float", TP.FLOAT, ["N", 256]))
    # the float node reads INT4 tensors here; only its arity matters for the matcher (7 inputs: no match)
    m = to_ir(model, "test")
    res = apply(LowerMoeRtx(), m)
    assert res.counts()["matched"] == 1 and res.rewritten == 1
    assert {n.name for n in to_proto(m).graph.node if n.op_type == "MoE"} >= {"moe_float"}
    saved = dict(DEQUANTIZE)
    DEQUANTIZE.pop("int4")
    try:
        res = apply(LowerMoeRtx(), to_ir(_int4_moe_model(1), "test"))
        assert res.rewritten == 0 and "no DequantizeLinear form" in res.refused[0][1]
    finally:
        DEQUANTIZE.update(saved)
    why = {mod: dict((p.name, w) for p, w in plan_for(mod))["lower_moe_rtx"] for mod in ("tensorrt_rtx", "onnxruntime")}
    assert why["tensorrt_rtx"] is None and "ONNX Runtime runs" in why["onnxruntime"]
