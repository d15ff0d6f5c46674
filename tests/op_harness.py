"""Run one qcn op through onnxruntime (its function body inlined) for op-level tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from qcn.compile.plugins.onnx_function import DOMAIN, DOMAIN_VERSION

OPSET = 23
_NP_TO_ONNX = {np.dtype("float32"): onnx.TensorProto.FLOAT, np.dtype("int64"): onnx.TensorProto.INT64,
               np.dtype("float16"): onnx.TensorProto.FLOAT16}


def run_op_in_ort(op, inputs: dict[str, torch.Tensor], attrs: dict, out_ranks: list[int],
                  function: onnx.FunctionProto | None = None) -> list[np.ndarray]:
    """A one-node model `qcn.<op.name>` with the op's function body (or `function`), run by
    onnxruntime on CPU. float8_e4m3fn inputs travel as their bytes (numpy has no float8)."""
    fp8 = {k for k, v in inputs.items() if v.dtype == torch.float8_e4m3fn}
    arrays = {k: (v.view(torch.uint8) if k in fp8 else v).detach().numpy() for k, v in inputs.items()}
    outs = [f"out{i}" for i in range(len(out_ranks))]
    function = function or op.function(OPSET)
    node = helper.make_node(op.name, list(arrays), outs, domain=DOMAIN, overload=function.overload, **attrs)
    graph = helper.make_graph(
        [node], "single_op",
        [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT8E4M3FN if k in fp8 else _NP_TO_ONNX[a.dtype],
                                       list(a.shape)) for k, a in arrays.items()],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [None] * r) for o, r in zip(outs, out_ranks)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=[function])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, onnx.TensorProto.FLOAT8E4M3FN) if k in fp8 else a
             for k, a in arrays.items()}
    return sess.run(None, feeds)
