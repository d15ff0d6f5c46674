"""Pass ``int4_awq_fold``: AWQ's 1/s folded into the constant Mul that produces the INT4
projections' input (the RMSNorm weight): ``Mul(a, g [K])`` -> ``Mul(a, <g>.awq = g / s)``.

Only for the groups the plan marked foldable: every consumer of that Mul is an INT4
projection quantized with the same s (q/k/v; DeltaNet's in_proj_qkvz and in_proj_ba). The
check refuses (and the projections then refuse too, keeping their float weights) if the
graph does not have that shape, so a fold can never silently change another consumer.
Runs before ``int4_projections``, which checks the fold is there.
"""

from __future__ import annotations

import torch

from onnxscript.rewriter import MatchResult

from ..base import QcnRule, refuse
from .int4 import float_tensor
from .int4_projection import const_weight


class Int4AwqFold(QcnRule):
    root_domain = ""
    root_op = "Mul"
    pass_name = "int4_awq_fold"

    def __init__(self, folds: dict[str, tuple[torch.Tensor, frozenset[str]]]):
        """folds: norm weight name -> (its new value g / s, the projection weights that read it)."""
        super().__init__()
        self.folds = folds

    def pattern(self, op, a, g):
        return op.Mul(a, g)

    def check(self, context, a, g):
        # candidates: the Muls by a norm weight the plan folds into (no other Mul is counted)
        if const_weight(g) is None or g.name not in self.folds:
            return MatchResult().fail("not a norm weight the INT4 plan folds AWQ scales into")
        return super().check(context, a=a, g=g)

    def check_node(self, context, a, g):
        new, readers = self.folds[g.name]
        if tuple(g.shape or ()) != tuple(new.shape):
            return refuse(f"{g.name} has shape {g.shape}, the fold has {list(new.shape)}")
        out = context.root.outputs[0]
        got = set()
        for use in out.uses():
            node = use.node
            w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
            if use.idx != 0 or const_weight(w) is None:
                return refuse(f"{out.name} has a consumer {node.op_type} {node.name} that is not a projection "
                              "reading it as x")
            got.add(w.name)
        if got != set(readers):
            return refuse(f"{out.name} feeds {sorted(got)}, the AWQ group is {sorted(readers)}")
        return {}

    def rewrite(self, op, a, g):
        new, _ = self.folds[g.name]
        t = float_tensor(new, f"{g.name}.awq", g.dtype)
        return self.count_rewrite(op, op.Mul(a, op.initializer(t, t.name)), set())


__all__ = ["Int4AwqFold"]
