"""Quantization passes (docs/QUANTIZATION.md) and what they share.

- :mod:`.weights`: initializers a pass creates, streamed to ``weights.passes.bin`` (contract 1);
- :mod:`.fp8`: the FP8 E4M3 arithmetic (weight scales per output channel or 1x128 blocks along K,
  static per-tensor activation scales) that the rules and the tests share;
- :mod:`.fp8_projection`: ``MatMul(x, W)`` -> ``MatMul(DQ(Q(x)), DQ(W_fp8, s_w))`` (contract 2);
- :mod:`.fp8_activations`: ``MatMul(x, DQ(W_fp8, s))`` (the official FP8 release) -> activation Q/DQ only;
- :mod:`.calibrate`: token batches from the calibration source, the unquantized graph in ONNX
  Runtime with intermediates as outputs, activation ranges (contract 4);
- :mod:`.accuracy`: the accuracy gate (contract 5).
"""
