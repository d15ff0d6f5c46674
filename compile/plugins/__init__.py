"""Custom ops in ONNX domain `qcn`: torch op, ONNX schema + function body, kernels, TRT plugin."""
