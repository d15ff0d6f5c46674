"""Graph passes over exported ONNX (fusion, quantization). None ship yet."""
