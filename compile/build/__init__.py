"""The build stage: ONNX -> TensorRT engine for a recipe's GPU target.

- `budget`: memory budget of a recipe (weights, KV, DeltaNet state, workspace) from config.json
- `preflight`: every check before work starts (budget, quantization passes, TensorRT module)
- `trt`: one build path over `tensorrt` and `tensorrt_rtx` (lazy imports, composable loaders)
- `targets`: the GPU architecture table (SM, PTX target, shared memory, engine-header bit)
- `plugins`: TensorRT plugin registration of what the passes stage lowered
- `stage`: the stage itself (engine + manifest, written atomically)
Importing this package imports no TensorRT module.
"""
