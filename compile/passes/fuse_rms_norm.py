"""Pass ``fuse_rms_norm``: the export's RMSNorm subgraph -> one opset-23 ``RMSNormalization``.

The exporter writes every RMSNorm (compile/export/modeling.py ``_rms``: zero-centred norms
whose weight already holds 1 + w) as seven nodes over the normalised axis, the last one::

    y = Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1), eps)))), w)

which is ``RMSNormalization(x, w, axis=-1, epsilon=eps)`` (stash_type 1: computed in fp32; x
is already fp32 here: a bf16 graph casts to fp32 before the norm and back after it, and those
Casts stay). Every RMSNorm of the main graph and of the qcn op function bodies (the
GatedDeltaNet output norm, the attention q/k norms) is a candidate.

Refused (left as is) when: the exponent is not the constant 2, ReduceMean does not reduce
exactly the last axis with keepdims, eps is not a constant scalar, w is not a constant 1-D
tensor of the normalised axis' size, the dtypes are not float, or the graph (function) does
not import the default opset >= 23. The rewriter also leaves a match alone when one of its
intermediate values is used outside it.

Measured (docs/PASSES.md "Fusions"): ONNX Runtime does not fuse this form itself (its
SimplifiedLayerNormalization fusion wants Div or a Pow(-0.5), not Sqrt + Reciprocal).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import QcnRule, refuse

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant (initializer or Constant node) as numpy, else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        a = value.producer().attributes.get("value")
        tensor = None if a is None else a.value
    return None if tensor is None else tensor.numpy()


def _default_opset(node: ir.Node) -> int | None:
    """The default-domain opset of the graph or function body the node is in."""
    return None if node.graph is None else node.graph.opset_imports.get("")


class FuseRmsNorm(QcnRule):
    pass_name = "fuse_rms_norm"
    root_domain = ""
    root_op = "Mul"

    def pattern(self, op, x, two, axes, eps, weight):
        mean = op.ReduceMean(op.Pow(x, two), axes, _outputs=["mean"])
        inv = op.Reciprocal(op.Sqrt(op.Add(mean, eps)))
        return op.Mul(op.Mul(x, inv), weight)

    def check_node(self, context, x, two, axes, eps, weight, mean, **_):
        p = _const(two)
        if p is None or p.size != 1 or float(p.reshape(())) != 2.0:
            return refuse(f"Pow exponent {p if p is None else p.tolist()} is not the constant 2")
        rank = None if x.shape is None else len(x.shape)
        if rank is None:
            return refuse("the input's rank is unknown")
        ax = _const(axes)
        if ax is None or ax.size != 1 or int(ax.reshape(())) % rank != rank - 1:
            return refuse(f"ReduceMean axes {ax if ax is None else ax.tolist()} are not the last axis only")
        red = mean.producer()
        if red.attributes.get("keepdims") is not None and red.attributes["keepdims"].value != 1:
            return refuse("ReduceMean keepdims is 0")
        e = _const(eps)
        if e is None or e.size != 1:
            return refuse("eps is not a constant scalar")
        hidden = x.shape[rank - 1]
        wshape = None if weight.shape is None else list(weight.shape)
        if weight.const_value is None or wshape != [hidden] or not isinstance(hidden, int):
            return refuse(f"the weight is not a constant [{hidden}] tensor "
                          f"({'not constant' if weight.const_value is None else wshape})")  # shape only: never loads it
        if x.dtype not in FLOATS or weight.dtype != x.dtype:
            return refuse(f"dtypes x {x.dtype}, weight {weight.dtype}: need one float dtype")
        opset = _default_opset(context.root)
        if opset is None or opset < 23:
            return refuse(f"the graph imports opset {opset}; RMSNormalization needs 23")
        return {}

    def rewrite(self, op, x, two, axes, eps, weight, mean, **_):
        out = op.RMSNormalization(x, weight, axis=-1, epsilon=float(_const(eps).reshape(())))
        return self.count_rewrite(op, out, set())
