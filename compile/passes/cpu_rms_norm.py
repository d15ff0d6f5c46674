"""Pass ``cpu_rms_norm``: the export's RMSNorm chain -> one ONNX ``RMSNormalization`` (opset 23),
for the cpu target.

The exporter writes each zero-centred RMSNorm of the model (the decoder layers' input / post
attention norms, ``q_norm``, ``k_norm``, the final norm; the ``1 + w`` already folded into the
weight) as seven kernels:

  Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1), eps)))), w)

ONNX Runtime does not fuse this form (its fusion wants ``Div``), so every norm costs seven
kernel launches per call: 21 norms = 147 of qcn-pico's ~880 decode kernels. This rule rewrites
it to ``RMSNormalization(x, w, axis=-1, epsilon=eps)``, the same computation in one kernel (equal
to fp32 rounding; tests/test_cpu_lowering.py).

Refused (left alone) when: the exponent is not the constant 2, the axes are not the last axis
alone, eps is not a constant scalar, x is not float32 (the CPU export's dtype; a 16-bit graph
computes the norm in fp32 between casts), the weight's shape is not x's last dim, or the
graph's opset is below 23.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import QcnRule, refuse


def _const(value: ir.Value | None):
    if value is None:
        return None
    c = value.const_value
    if c is None and value.producer() is not None and value.producer().op_type == "Constant":
        a = value.producer().attributes.get("value")
        c = a.value if a is not None else None
    return None if c is None else np.asarray(c.numpy())


class CpuRmsNorm(QcnRule):
    pass_name = "cpu_rms_norm"
    root_domain = ""
    root_op = "Mul"

    def pattern(self, op, x, two, axes, eps, w):
        ms = op.ReduceMean(op.Pow(x, two), axes, keepdims=1)
        return op.Mul(op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(ms, eps)))), w)

    def check_node(self, context, x, two, axes, eps, w, **_):
        if x.dtype != ir.DataType.FLOAT or w.dtype != ir.DataType.FLOAT:
            return refuse(f"x / weight are {x.dtype} / {w.dtype}, not float32")
        p = _const(two)
        if p is None or p.size != 1 or float(p.reshape(())) != 2.0:
            return refuse("the exponent is not the constant 2")
        rank = len(x.shape) if x.shape is not None else None
        ax = _const(axes)
        if rank is None or ax is None or ax.size != 1 or int(ax.reshape(())) not in (-1, rank - 1):
            return refuse(f"the mean is not over the last axis alone (axes {None if ax is None else ax.tolist()})")
        e = _const(eps)
        if e is None or e.size != 1:
            return refuse("eps is not a constant scalar")
        if w.shape is None or len(w.shape) != 1 or w.shape[0] != x.shape[-1] or not isinstance(w.shape[0], int):
            return refuse(f"weight shape {w.shape} is not [{x.shape[-1]}]")
        opset = context.model.opset_imports.get("", 0)
        if opset < 23:
            return refuse(f"graph opset {opset} < 23 (RMSNormalization is opset 23)")
        return {}

    def rewrite(self, op, x, two, axes, eps, w):
        epsilon = float(_const(eps).reshape(()))
        y = op.RMSNormalization(x, w, axis=-1, epsilon=epsilon)
        return self.count_rewrite(op, y, set())
