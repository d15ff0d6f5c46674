"""The INT4 plan for the projections of one model: which weights become INT4, how (RTN or
AWQ), which are kept and why, and where AWQ's 1/s goes. Computed once (from the prefill graph
and the calibration activations) and applied to every graph by the rules
``int4_awq_fold`` and ``int4_projections``: prefill and decode share the weights file, so
they must get identical initializers.

Candidates: every graph-level ``MatMul(x, W)`` with a constant 2-D weight. Kept (not
quantized), with the reason the report shows: names matching a ``quantization.keep``
pattern (fnmatch over initializer names: ``lm_head``, ``"layers.0.*"``), and lm_head by
default (the logits' precision; issue #11: lm_head, router, norms and embeddings stay
unquantized unless asked). The router, norms and embeddings are no candidates at all (the
router lives inside qcn::MoE; norms and embeddings are no MatMul weights).

Groups (AWQ shares one s per group): the projections that read the same x. A group is
foldable when x = Mul(a, g const [K]) (the RMSNorm weight) and every consumer of x is an
INT4 projection of the group; otherwise each projection gets its own s and an explicit Mul.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable

import onnx_ir as ir
import torch

from .awq import awq_search
from .int4 import GROUP, TORCH_DTYPES, Int4Weight, rtn, torch_threads
from .int4_projection import const_weight, producer_constant

log = logging.getLogger(__name__)

METHODS = ("rtn", "awq")
LM_HEAD = "lm_head"  # the export's name of the logits projection's weight [H, V]
DEFAULT_KEEP = {LM_HEAD: "default: lm_head stays unquantized by INT4 (the logits' precision; quantization.lm_head: int8 is its own pass)"}


@dataclass(frozen=True)
class Group:
    """Projections reading one x (a value of the prefill graph: what calibration records)."""

    x: str
    weights: tuple[str, ...]
    fold: str | None          # the norm weight absorbing 1/s (None: explicit Mul per projection)


@dataclass
class ProjectionPlan:
    weights: dict[str, Int4Weight] = field(default_factory=dict)
    folds: dict[str, tuple[torch.Tensor, frozenset[str]]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    groups: list[Group] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)    # per weight: method, alpha, calibration errors

    def report(self) -> dict:
        return {"quantized": self.rows, "kept": [{"weight": k, "why": v} for k, v in sorted(self.kept.items())]}


def kept_reason(name: str, keep: tuple[str, ...], quantize_lm_head: bool = False) -> str | None:
    for pat in keep:
        if fnmatch.fnmatchcase(name, pat):
            return f"matches quantization.keep pattern {pat!r}"
    if name in DEFAULT_KEEP and not quantize_lm_head:
        return DEFAULT_KEEP[name]
    return None


def projections(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value, ir.Value]]:
    """(node, x, W) of every graph-level MatMul with a constant 2-D weight, in graph order."""
    out = []
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            x, w = node.inputs
            if const_weight(w) is not None and w.shape is not None and len(w.shape) == 2:
                out.append((node, x, w))
    return out


def groups(graph: ir.Graph, quantized: set[str]) -> list[Group]:
    by_x: dict[str, list[str]] = {}
    xs: dict[str, ir.Value] = {}
    for _, x, w in projections(graph):
        if w.name in quantized:
            by_x.setdefault(x.name, []).append(w.name)
            xs[x.name] = x
    out = []
    for name, ws in by_x.items():
        x = xs[name]
        g = producer_constant(x)
        consumers = {u.node for u in x.uses()}
        readers_ok = all(n.op_type == "MatMul" and len(n.inputs) == 2 and n.inputs[0] is x
                         and n.inputs[1] is not None and n.inputs[1].name in ws for n in consumers)
        gval = None if g is None else next(v for v in x.producer().inputs if v.name == g)
        fold = g if (g is not None and readers_ok and gval.shape is not None and len(gval.shape) == 1
                     and gval.shape[0] == x.shape[-1] and len(gval.uses()) == 1
                     and x not in graph.outputs) else None
        out.append(Group(name, tuple(ws), fold))
    return out


def plan_projections(graph: ir.Graph, load: Callable[[ir.Value], torch.Tensor], *, method: str = "rtn",
                     keep: tuple[str, ...] = (), quantize_lm_head: bool = False, group_size: int = GROUP,
                     activations: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                     progress: Callable | None = None) -> ProjectionPlan:
    """The plan for ``graph`` (the prefill graph). ``load(W value)`` gives a weight as a torch
    tensor; ``activations(names)`` the calibration inputs [T, K] of the named values (AWQ)."""
    if method not in METHODS:
        raise ValueError(f"INT4 method {method!r}; valid: {list(METHODS)}")
    with torch_threads(1):
        return _plan(graph, load, method, keep, quantize_lm_head, group_size, activations, progress)


def _plan(graph, load, method, keep, quantize_lm_head, group_size, activations, progress) -> ProjectionPlan:
    plan = ProjectionPlan()
    values: dict[str, ir.Value] = {}
    for _, _, w in projections(graph):
        why = kept_reason(w.name, keep, quantize_lm_head)
        if why is not None:
            plan.kept[w.name] = why
        elif w.dtype not in TORCH_DTYPES:
            plan.kept[w.name] = f"weight dtype {w.dtype} is not fp32/fp16/bf16"
        else:
            values[w.name] = w
    plan.groups = groups(graph, set(values))
    acts = activations([g.x for g in plan.groups]) if method == "awq" else {}
    items = plan.groups if progress is None else progress(plan.groups)
    for grp in items:
        ws = {n: load(values[n]) for n in grp.weights}
        sdt = TORCH_DTYPES[values[grp.weights[0]].dtype]
        if method == "rtn":
            for n, w in ws.items():
                plan.weights[n] = rtn(n, w, group_size, sdt)
                plan.rows.append({"weight": n, "method": "rtn", "shape": list(w.shape)})
            continue
        if grp.fold is None and len(ws) > 1:   # no shared fold: each projection gets its own s
            results = [(n, awq_search(acts[grp.x], {n: w}, group=group_size, scale_dtype=sdt)) for n, w in ws.items()]
        else:
            results = [(None, awq_search(acts[grp.x], ws, group=group_size, fold=grp.fold, scale_dtype=sdt))]
        for _, res in results:
            plan.weights.update(res.weights)
            if grp.fold is not None and res.alpha > 0:
                norm = next(v for v in graph_value(graph, grp.x).producer().inputs if v.name == grp.fold)
                plan.folds[grp.fold] = (load(norm).float() / res.scale, frozenset(grp.weights))
            for n in res.weights:
                plan.rows.append({"weight": n, "method": res.weights[n].method, "alpha": res.alpha,
                                  "input_scale": ("folded into " + grp.fold) if res.weights[n].fold else
                                  ("explicit Mul" if res.alpha > 0 else None),
                                  "calib_mse_rtn": res.err_rtn[n], "calib_mse_awq": res.err_awq[n],
                                  "shape": list(ws[n].shape)})
    return plan


def graph_value(graph: ir.Graph, name: str) -> ir.Value:
    for node in graph:
        for v in node.outputs:
            if v.name == name:
                return v
    for v in graph.inputs:
        if v.name == name:
            return v
    raise KeyError(name)


__all__ = ["METHODS", "DEFAULT_KEEP", "Group", "ProjectionPlan", "kept_reason", "projections", "groups",
           "plan_projections"]
