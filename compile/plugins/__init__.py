"""Custom ops in ONNX domain ``qcn``: one folder per op, the same files with the same meaning.

  <op>/op.py          the op's definition: torch custom op (it calls the reference), ONNX
                      schema, onnxscript translation, the function body that *defines* its
                      semantics; ``OP`` is its :class:`~.onnx_function.QcnOp`
  <op>/reference.py   the one naive PyTorch reference (float64 capable; ``compute_dtype=None``
                      is the op's own precision, which the torch op uses)
  <op>/launch.py      the Triton kernels' public entry points (shapes in docstrings); the
                      kernels themselves in kernels.py (gated_deltanet: decode.py, prefill.py)
  <op>/aot.py         the kernels as AOT specs (compiled by the shared ``_triton.py``)
  <op>/trt_plugin.py  TensorRT AOT plugin registration (full TensorRT; imports it lazily)

Shared: ``_triton.py`` (AOT compilation, PTX checks, plugin registration), ``onnx_function.py``
(schema registration, FunctionProto builder), ``registry.py`` (one row per op: export,
lowering pass, plugin registration). A new op is a folder with these files plus one registry
row; the GPU architectures it compiles for are compile/build/targets.py's rows.
"""
