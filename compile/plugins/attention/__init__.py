"""qcn::CachedAttention: op definition (op.py) and kernels."""
