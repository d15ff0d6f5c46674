"""The build stage: ONNX -> TensorRT engine for a recipe's GPU target.

- `budget`: memory budget of a recipe (weights, KV, DeltaNet state, workspace) from config.json
- `preflight`: every check before work starts (budget, quantization passes, TensorRT module)
- `trt`: one build path over `tensorrt` and `tensorrt_rtx` (lazy imports, composable loaders)
- `engine_header`: what a serialized TensorRT-RTX engine says about itself without a GPU
- `stage`: the stage itself (engine + manifest, written atomically)
Importing this package imports no TensorRT module.
"""
