"""qcn.compile: HF checkpoint -> ONNX (export) -> passes -> engines (build)."""
