"""qcn::MoE: op definition (op.py) and kernels."""
