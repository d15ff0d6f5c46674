"""The 8-bit lm_head (pass int8_cpu_lm_head, recipe quantization.lm_head: int8): the block format
against a naive reference, the rewritten graph in ONNX Runtime against x @ dequantized W, the
cases it must not touch, and the recipe checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcn.compile.build import preflight as pf
from qcn.compile.passes.base import apply, to_ir, to_proto
from qcn.compile.passes.quant.int8_cpu_lm_head import Int8CpuLmHead, dequantize_int8_blocks, quantize_int8_blocks
from qcn.compile.recipe import RecipeError, load_recipe, validate


@pytest.mark.parametrize("k,n", [(77, 5), (300, 33), (256, 16)])
def test_int8_blocks_round_trip_within_half_a_step(k, n):
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(k)) * 0.3
    w[:, 0] = 0.0                                    # an all-zero column: scale 1, q 0
    b, s = quantize_int8_blocks(w)
    g = -(-k // 128)
    assert b.dtype == np.uint8 and b.shape == (n, g, 128) and s.shape == (n, g) and s.dtype == np.float32
    # naive reference, one (column, block) at a time
    for c in (0, n // 2, n - 1):
        for j in range(g):
            blk = w[j * 128:(j + 1) * 128, c].numpy()
            amax = float(np.abs(blk).max())
            want = amax / 127 if amax > 0 else 1.0
            assert s[c, j] == pytest.approx(want, rel=1e-6)
            q = b[c, j].astype(np.int32) - 128
            assert np.abs(q).max() <= 127 and (q[len(blk):] == 0).all()   # padding of a partial block is 0
            assert np.array_equal(q[:len(blk)], np.clip(np.round(blk / want), -127, 127).astype(np.int32))
    back = dequantize_int8_blocks(b, s, k)
    assert back.shape == (k, n)
    step = np.repeat(s.T, 128, axis=0)[:k]
    assert (np.abs(back - w.numpy()) <= step / 2 + 1e-7).all()


def _graph(k: int, n: int, seed: int, lm_head_const: bool = True):
    """x [T, K] -> MatMul(x, other [K, K]) = h -> MatMul(h, lm_head [K, N]) = logits."""
    rng = np.random.default_rng(seed)
    other = (rng.standard_normal((k, k)) * 0.1).astype(np.float32)
    lm = (rng.standard_normal((k, n)) * 0.2).astype(np.float32)
    inits = [numpy_helper.from_array(other, "other")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])]
    if lm_head_const:
        inits.append(numpy_helper.from_array(lm, "lm_head"))
    else:
        inputs.append(helper.make_tensor_value_info("lm_head", TensorProto.FLOAT, [k, n]))
    nodes = [helper.make_node("MatMul", ["x", "other"], ["h"]), helper.make_node("MatMul", ["h", "lm_head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), other, lm


def _run(proto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("k,n", [(77, 40), (300, 129), (256, 64)])
def test_rewritten_lm_head_in_ort_equals_x_times_dequantized_weight(k, n):
    proto, other, lm = _graph(k, n, seed=k)
    model = to_ir(proto, "test")
    res = apply(Int8CpuLmHead(), model)
    assert (res.matched, res.rewritten, res.refused) == (1, 1, [])
    out = to_proto(model)
    ops = [nd.op_type for nd in out.graph.node]
    assert ops == ["MatMul", "MatMulNBits"]            # the other MatMul is not touched
    nb = out.graph.node[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in nb.attribute}
    assert attrs == {"K": k, "N": n, "bits": 8, "block_size": 128, "accuracy_level": 4}
    assert "lm_head" not in [i.name for i in out.graph.initializer]   # the fp32 weight is gone
    x = np.random.default_rng(k + 1).standard_normal((3, k)).astype(np.float32)
    got = _run(out, {"x": x})
    h = x @ other
    b, s = quantize_int8_blocks(torch.from_numpy(lm))
    ref_q = h @ dequantize_int8_blocks(b, s, k)       # the weights MatMulNBits holds
    ref = h @ lm                                       # the fp32 lm_head
    scale = float(np.abs(ref).max())
    # int8 activations per block inside the kernel: within ~1 % of the logits' range, and really used
    assert np.abs(got - ref_q).max() <= 2e-2 * scale, np.abs(got - ref_q).max() / scale
    assert np.abs(got - ref).max() <= 3e-2 * scale
    assert np.abs(got - ref).max() > 1e-6 * scale


def test_must_not_fire_on_other_matmuls_or_a_non_constant_lm_head():
    proto, *_ = _graph(64, 16, seed=0, lm_head_const=False)
    res = apply(Int8CpuLmHead(), to_ir(proto, "test"))
    assert (res.matched, res.rewritten) == (0, 0)
    proto, *_ = _graph(64, 16, seed=0)
    proto.graph.initializer[1].name = "lm_head_not"
    proto.graph.node[1].input[1] = "lm_head_not"
    res = apply(Int8CpuLmHead(), to_ir(proto, "test"))
    assert (res.matched, res.rewritten) == (0, 0)


def test_refuses_a_non_fp32_lm_head_with_the_reason():
    proto, *_ = _graph(64, 16, seed=0)
    lm = numpy_helper.to_array(proto.graph.initializer[1]).astype(np.float16)
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(lm, "lm_head"))
    proto.graph.node.insert(1, helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16))
    proto.graph.node[2].input[0] = "h16"
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    res = apply(Int8CpuLmHead(), to_ir(proto, "test"))
    assert res.rewritten == 0 and "not a 2-D fp32 constant" in res.refused[0][1]


def test_recipe_lm_head_values_keep_conflict_and_target():
    r = load_recipe("recipes/pico_int4_cpu.yaml")
    with pytest.raises(RecipeError, match=r"quantization.lm_head: 'int4' is not valid; choose one of \['none', 'int8'\]"):
        validate(dataclasses.replace(r, quantization=dataclasses.replace(r.quantization, lm_head="int4")))
    with pytest.raises(RecipeError, match=r"quantization.keep pattern 'lm_\*' keeps lm_head unquantized"):
        validate(dataclasses.replace(r, quantization=dataclasses.replace(r.quantization, lm_head="int8",
                                                                            keep=("lm_*",))))
    gpu = load_recipe("recipes/h100_fp8.yaml")
    gpu = dataclasses.replace(gpu, quantization=dataclasses.replace(gpu.quantization, lm_head="int8"))
    assert pf.quantization_problems(gpu) == [
        "quantization.lm_head: int8 needs a quantization pass for it, and it exists for ['onnxruntime'] targets only, "
        "not tensorrt (h100); qcn will not fake it: use none (the activation dtype) or a target whose module has the pass"]
