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


def _graph(form: str) -> onnx.ModelProto:
    """One MatMul in the named form; fp32 activations, opset 23 (the export's)."""
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
    nodes.append(h.make_node("MatMul", [x, "wd"], ["y"], name="matmul"))
    g = h.make_graph(nodes, form, [h.make_tensor_value_info("x", TP.FLOAT, ["T", K])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["T", N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23)])
    m.ir_version = 10
    return m


def _build(tmp_path: Path, form: str, ccs: tuple[str, ...]):
    """(engine bytes, parsed layers) through the build stage's own loaders."""
    path = tmp_path / f"{form}.onnx"
    onnx.save(_graph(form), path)
    prof = trtb.Profile("all", ("prefill",), {"x": ((1, K), (4, K), (16, K))})
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
