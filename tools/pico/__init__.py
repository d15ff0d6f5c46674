"""qcn-pico: a small Qwen3-Next trained on the Python standard library (see tools/train_pico.py)."""
