"""Fusion passes (compile/passes/fuse_*.py): each one's positive and "must NOT fuse" cases, on
small hand-made graphs of the exporter's form, compared with ONNX Runtime before/after."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from qcn.compile.passes.base import apply, to_ir, to_proto
from qcn.compile.passes.fuse_rms_norm import FuseRmsNorm
from qcn.compile.passes.plan import plan_for


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _fuse(rule, model: onnx.ModelProto):
    m = to_ir(model, "test")
    res = apply(rule, m)
    return to_proto(m), res


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- fuse_rms_norm -----------------------------------------------------------------------

def _rms_graph(shape=(2, 3, 5, 24), *, exponent=2.0, axes=(-1,), keepdims=1, weight_const=True, opset=23,
               reuse_inv=False, two_norms=False) -> onnx.ModelProto:
    """x -> the exporter's RMSNorm (compile/export/modeling.py _rms) -> y, weight 1 + w."""
    hidden = shape[-1]
    rng = np.random.default_rng(7)
    inits = [nh.from_array(np.float32(exponent), "two"), nh.from_array(np.array(axes, np.int64), "axes"),
             nh.from_array(np.float32(1e-6), "eps")]
    inputs = [h.make_tensor_value_info("x", TP.FLOAT, list(shape))]
    if weight_const:
        inits.append(nh.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), "w"))
    else:
        inputs.append(h.make_tensor_value_info("w", TP.FLOAT, [hidden]))

    def norm(x, w, tag):
        return [h.make_node("Pow", [x, "two"], [f"p{tag}"]),
                h.make_node("ReduceMean", [f"p{tag}", "axes"], [f"m{tag}"], keepdims=keepdims),
                h.make_node("Add", [f"m{tag}", "eps"], [f"a{tag}"]),
                h.make_node("Sqrt", [f"a{tag}"], [f"s{tag}"]),
                h.make_node("Reciprocal", [f"s{tag}"], [f"r{tag}"]),
                h.make_node("Mul", [x, f"r{tag}"], [f"xm{tag}"]),
                h.make_node("Mul", [f"xm{tag}", w], [f"y{tag}"])]

    nodes = norm("x", "w", "0")
    outputs = [h.make_tensor_value_info("y0", TP.FLOAT, None)]
    if two_norms:
        nodes += norm("y0", "w", "1")
        outputs = [h.make_tensor_value_info("y1", TP.FLOAT, None)]
    if reuse_inv:  # the 1/rms value is used outside the norm too
        outputs.append(h.make_tensor_value_info("r0", TP.FLOAT, None))
    g = h.make_graph(nodes, "rms", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def test_fuse_rms_norm_fuses_the_export_form_and_keeps_the_numbers():
    shape = (2, 3, 5, 24)
    model = _rms_graph(shape, two_norms=True)
    fused, res = _fuse(FuseRmsNorm(), model)
    assert res.counts() == {"matched": 2, "rewritten": 2, "refused": 0, "new_nodes": 2}
    assert _ops(fused) == ["RMSNormalization", "RMSNormalization"]
    node = fused.graph.node[0]
    attrs = {a.name: h.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and attrs["epsilon"] == pytest.approx(1e-6)
    onnx.checker.check_model(fused, full_check=True)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32) * 3
    want, got = _run(model, {"x": x})[0], _run(fused, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case, kwargs, reason", [
    ("exponent 3", dict(exponent=3.0), "exponent"),
    ("mean over axis -2", dict(axes=(-2,)), "not the last axis"),
    ("mean over two axes", dict(axes=(-2, -1)), "not the last axis"),
    ("keepdims 0", dict(keepdims=0, shape=(6, 6)), "keepdims"),  # [6, 6] * [6] still broadcasts
    ("weight is a graph input", dict(weight_const=False), "not a constant"),
    ("opset 22", dict(opset=22), "needs 23"),
])
def test_fuse_rms_norm_must_not_fuse(case, kwargs, reason):
    model = _rms_graph(**kwargs)
    fused, res = _fuse(FuseRmsNorm(), model)
    assert res.rewritten == 0 and "RMSNormalization" not in _ops(fused), case
    assert _ops(fused) == _ops(model)
    if reason is not None:
        assert res.refused and reason in res.refused[0][1], res.refused


def test_fuse_rms_norm_leaves_a_norm_whose_intermediate_is_used_elsewhere():
    fused, res = _fuse(FuseRmsNorm(), _rms_graph(reuse_inv=True))
    assert res.rewritten == 0 and "RMSNormalization" not in _ops(fused)


def test_fuse_rms_norm_runs_for_onnxruntime_only():
    runs = {m: dict((p.name, why) for p, why in plan_for(m))["fuse_rms_norm"] for m in
            ("onnxruntime", "tensorrt_rtx", "tensorrt")}
    assert runs["onnxruntime"] is None
    assert "no gain measured" in runs["tensorrt_rtx"] and "not verified" in runs["tensorrt"]
